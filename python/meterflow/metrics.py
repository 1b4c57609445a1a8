"""Counters, sums, gauges and latency histograms in Prometheus text format, per process, and the
recent per-minute history the dashboard draws."""

from __future__ import annotations

import bisect
import math
import time
from collections import defaultdict, deque
from collections.abc import Callable

HELP = {
    "meterflow_events_received_total": "Events received in accepted-for-processing requests.",
    "meterflow_events_accepted_total": "Events stored for the first time.",
    "meterflow_events_duplicate_total": "Events answered as duplicates.",
    "meterflow_events_failed_total": "Events rejected one by one, by reason.",
    "meterflow_requests_total": "Requests to POST /v1/events by status.",
    "meterflow_flushes_total": "Inserts into storage.",
    "meterflow_flushed_rows_total": "Rows inserted into storage.",
    "meterflow_flush_failures_total": "Inserts that failed.",
    "meterflow_flush_queue_full_total": "Requests refused because the flush queue was full.",
    "meterflow_flush_seconds": "Time spent in storage inserts.",
    "meterflow_stage_seconds": "Time spent in each stage of the ingest path (decode, rate_check, dedup, flush_wait, "
    "insert, spool, commit, upload).",
    "meterflow_flush_queue_rows": "Rows waiting for a flush.",
    "meterflow_archive_spooled_total": "Archive objects written to the local spool.",
    "meterflow_archive_uploaded_total": "Archive objects uploaded to the store.",
    "meterflow_archive_uploaded_rows_total": "Events in uploaded archive objects.",
    "meterflow_archive_upload_failures_total": "Failed upload attempts (retried with backoff).",
    "meterflow_archive_spool_full_total": "Requests refused because the archive spool was full.",
    "meterflow_archive_spool_objects": "Archive objects waiting in the spool.",
    "meterflow_archive_spool_bytes": "Bytes waiting in the spool.",
    "meterflow_closing_failures": "Subscriptions whose last closing pass failed (GET /v1/closing/failures).",
    "meterflow_stream_full_total": "Requests refused because the event stream was full (async mode).",
    "meterflow_stream_length": "Entries in the event stream: queued or being committed (async mode).",
    "meterflow_stream_oldest_pending_seconds": "Age of the oldest entry in the event stream (async mode).",
    "meterflow_stream_dead_letters": "Entries in the dead-letter stream (async mode).",
    "meterflow_worker_rows_per_second": "Rows each worker committed per second, as it last reported (async mode).",
}


# Upper bounds in seconds, from 50 µs (a decode of a few events) to 5 s (an insert
# behind a stalled store): roughly x2.5 per step, so quantiles stay within a step.
BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


class Histogram:
    """Cumulative-on-render bucket counts with a sum, one per (name, stage)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last slot is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)


# The counters kept per minute as well (for the dashboard's chart), and how much history is kept.
PER_MINUTE = ("meterflow_events_accepted_total", "meterflow_events_duplicate_total", "meterflow_events_failed_total")
HISTORY_MINUTES = 360
SAMPLES_KEPT = 1024  # latest observations per summary, for quantiles


class Metrics:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self._sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self._histograms: dict[tuple[str, str], Histogram] = {}
        self._samples: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=SAMPLES_KEPT))
        # minute (epoch minutes) -> counts in PER_MINUTE order; at most HISTORY_MINUTES entries
        self._minutes: dict[int, list[int]] = {}
        self._clock = clock
        self.gauges: dict[str, float] = {}

    def stage(self, stage: str, seconds: float) -> None:
        """One timing of an ingest stage, into `meterflow_stage_seconds{stage=...}`."""
        self.histogram("meterflow_stage_seconds", stage, seconds)

    def histogram(self, name: str, stage: str, seconds: float) -> None:
        h = self._histograms.get((name, stage))
        if h is None:
            h = self._histograms[(name, stage)] = Histogram()
        h.observe(seconds)

    def inc(self, name: str, n: float = 1, **labels: str) -> None:
        # Called several times per request: no sorting for the common single label.
        key = (name, tuple(sorted(labels.items())) if len(labels) > 1 else tuple(labels.items()))
        self._counters[key] += n
        if n and name in PER_MINUTE:
            minute = int(self._clock() // 60)
            row = self._minutes.get(minute)
            if row is None:
                row = self._minutes[minute] = [0] * len(PER_MINUTE)
                for old in [m for m in self._minutes if m <= minute - HISTORY_MINUTES]:
                    del self._minutes[old]
            row[PER_MINUTE.index(name)] += int(n)

    def observe(self, name: str, value: float) -> None:
        s = self._sums[name]
        s[0] += value
        s[1] += 1
        self._samples[name].append(value)

    def quantile(self, name: str, q: float) -> float | None:
        """The q-quantile (nearest rank) of the latest SAMPLES_KEPT observations, None without any."""
        values = sorted(self._samples.get(name, ()))
        if not values:
            return None
        rank = math.ceil(round(q * len(values), 9))  # round: 0.99 * 100 is 99.00000000000001
        return values[min(len(values), max(1, rank)) - 1]

    def counter(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Every label set of one counter and its value."""
        return {labels: v for (n, labels), v in self._counters.items() if n == name}

    def per_minute(self, minutes: int) -> list[tuple[int, list[int]]]:
        """The last `minutes` minutes (epoch ms of each minute's start, counts in PER_MINUTE order), oldest first."""
        now = int(self._clock() // 60)
        first = now - min(minutes, HISTORY_MINUTES) + 1
        return [(m * 60_000, list(self._minutes.get(m, [0] * len(PER_MINUTE)))) for m in range(first, now + 1)]

    def render(self) -> str:
        lines: list[str] = []
        seen: set[str] = set()

        def head(name: str, kind: str) -> None:
            if name not in seen:
                seen.add(name)
                lines.append(f"# HELP {name} {HELP.get(name, name)}")
                lines.append(f"# TYPE {name} {kind}")

        for (name, labels), v in sorted(self._counters.items()):
            head(name, "counter")
            lab = ",".join(f'{k}="{val}"' for k, val in labels)
            lines.append(f"{name}{{{lab}}} {v:g}" if lab else f"{name} {v:g}")
        for name, (total, count) in sorted(self._sums.items()):
            head(name, "summary")
            lines.append(f"{name}_sum {total:.6f}")
            lines.append(f"{name}_count {count:g}")
        for (name, stage), h in sorted(self._histograms.items()):
            head(name, "histogram")
            running = 0
            for bound, n in zip((*BUCKETS, float("inf")), h.counts, strict=True):
                running += n
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(f'{name}_bucket{{stage="{stage}",le="{le}"}} {running}')
            lines.append(f'{name}_sum{{stage="{stage}"}} {h.total:.6f}')
            lines.append(f'{name}_count{{stage="{stage}"}} {running}')
        for name, v in sorted(self.gauges.items()):
            head(name, "gauge")
            lines.append(f"{name} {v:g}")
        return "\n".join(lines) + "\n"
