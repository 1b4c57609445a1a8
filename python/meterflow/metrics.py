"""Counters, sums, gauges and latency histograms in Prometheus text format, summed over every worker
(prometheus_client's multiprocess mode), and the recent per-minute history the dashboard draws (per process)."""

from __future__ import annotations

import bisect
import math
import os
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, values
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

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


# Set by `meterflow serve` before Granian forks its workers (cli.py): each worker then keeps its values
# in files there and a scrape sums every worker's. prometheus_client reads the variable once, at import,
# so this module does too; without it (tests that build the app in-process) a Metrics reports its own.
MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
if MULTIPROC_DIR is not None:
    # Every update asks the process identifier (to notice a fork); os.getpid() there was a third of an
    # update's cost. The pid is kept here instead and renewed in a forked child (Granian forks its workers).
    _PID = [os.getpid()]
    os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))
    values.ValueClass = values.MultiProcessValue(lambda: _PID[0])  # type: ignore[no-untyped-call]

# Upper bounds in seconds, from 50 µs (a decode of a few events) to 5 s (an insert
# behind a stalled store): roughly x2.5 per step, so quantiles stay within a step.
BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


BOUNDS = (*BUCKETS, math.inf)  # what a Histogram's buckets end at, in order


# The counters kept per minute as well (for the dashboard's chart), and how much history is kept.
PER_MINUTE = ("meterflow_events_accepted_total", "meterflow_events_duplicate_total", "meterflow_events_failed_total")
HISTORY_MINUTES = 360
SAMPLES_KEPT = 1024  # latest observations per summary, for quantiles

Labels = tuple[tuple[str, str], ...]


class Metrics:
    """One per process. In multiprocess mode the values live in this worker's files under MULTIPROC_DIR
    (two instances in one process would write over each other); otherwise in a registry of its own."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._registry = CollectorRegistry(auto_describe=False) if MULTIPROC_DIR is None else None
        self._counters: dict[str, Counter] = {}
        self._counter_children: dict[tuple[str, Labels], Counter] = {}
        self._summaries: dict[str, Summary] = {}
        self._histograms: dict[str, Histogram] = {}
        self._histogram_children: dict[tuple[str, str], Histogram] = {}
        self._process_gauges: dict[str, Gauge] = {}
        self._samples: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=SAMPLES_KEPT))
        # minute (epoch minutes) -> counts in PER_MINUTE order; at most HISTORY_MINUTES entries
        self._minutes: dict[int, list[int]] = {}
        self._clock = clock
        # Set for each scrape from state every worker sees alike (records, stream, spool directory):
        # rendered as they are, never summed.
        self.gauges: dict[str, float] = {}

    def stage(self, stage: str, seconds: float) -> None:
        """One timing of an ingest stage, into `meterflow_stage_seconds{stage=...}`."""
        self.histogram("meterflow_stage_seconds", stage, seconds)

    def histogram(self, name: str, stage: str, seconds: float) -> None:
        h = self._histogram_children.get((name, stage))
        if h is None:
            family = self._histograms.get(name)
            if family is None:
                family = self._histograms[name] = Histogram(
                    name, HELP.get(name, name), ["stage"], buckets=BUCKETS, registry=self._registry
                )
            h = self._histogram_children[(name, stage)] = family.labels(stage=stage)
        # Histogram.observe, without its walk of the bounds in Python: the first bound >= seconds.
        h._sum.inc(seconds)
        h._buckets[bisect.bisect_left(BOUNDS, seconds)].inc(1)

    def inc(self, name: str, n: float = 1, **labels: str) -> None:
        # Called several times per request: no sorting for the common single label.
        key = (name, tuple(sorted(labels.items())) if len(labels) > 1 else tuple(labels.items()))
        c = self._counter_children.get(key)
        if c is None:
            c = self._counter_children[key] = self._counter(name, key[1])
        if n < 0:
            raise ValueError(f"counter {name} cannot go down")
        c._value.inc(n)  # Counter.inc, without its checks for exemplars
        if n and name in PER_MINUTE:
            minute = int(self._clock() // 60)
            row = self._minutes.get(minute)
            if row is None:
                row = self._minutes[minute] = [0] * len(PER_MINUTE)
                for old in [m for m in self._minutes if m <= minute - HISTORY_MINUTES]:
                    del self._minutes[old]
            row[PER_MINUTE.index(name)] += int(n)

    def _counter(self, name: str, labels: Labels) -> Counter:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        family = self._counters.get(name)
        if family is None:
            family = self._counters[name] = Counter(
                name, HELP.get(name, name), [k for k, _ in labels], registry=self._registry
            )
        return family.labels(**dict(labels)) if labels else family

    def observe(self, name: str, value: float) -> None:
        s = self._summaries.get(name)
        if s is None:
            s = self._summaries[name] = Summary(name, HELP.get(name, name), registry=self._registry)
        s.observe(value)
        self._samples[name].append(value)

    def process_gauge(self, name: str, value: float) -> None:
        """This process's share of a gauge (rows in its flush queue): a scrape sums the live workers'."""
        g = self._process_gauges.get(name)
        if g is None:
            g = self._process_gauges[name] = Gauge(
                name, HELP.get(name, name), registry=self._registry, multiprocess_mode="livesum"
            )
        g.set(value)

    def close(self) -> None:
        """At a worker's exit: its process gauges stop counting (counters stay: what it counted happened)."""
        if MULTIPROC_DIR is not None:
            mark_process_dead(os.getpid(), MULTIPROC_DIR)  # type: ignore[no-untyped-call]  # untyped upstream

    def quantile(self, name: str, q: float) -> float | None:
        """The q-quantile (nearest rank) of the latest SAMPLES_KEPT observations, None without any."""
        values = sorted(self._samples.get(name, ()))
        if not values:
            return None
        rank = math.ceil(round(q * len(values), 9))  # round: 0.99 * 100 is 99.00000000000001
        return values[min(len(values), max(1, rank)) - 1]

    def counter(self, name: str) -> dict[Labels, float]:
        """Every label set of one counter and its value in this process."""
        family = self._counters.get(name)
        if family is None:
            return {}
        return {tuple(sorted(s.labels.items())): s.value
                for m in family.collect() for s in m.samples if s.name == name}  # fmt: skip

    def per_minute(self, minutes: int) -> list[tuple[int, list[int]]]:
        """The last `minutes` minutes (epoch ms of each minute's start, counts in PER_MINUTE order), oldest first."""
        now = int(self._clock() // 60)
        first = now - min(minutes, HISTORY_MINUTES) + 1
        return [(m * 60_000, list(self._minutes.get(m, [0] * len(PER_MINUTE)))) for m in range(first, now + 1)]

    def render(self) -> str:
        """Text format 0.0.4: every worker's values summed in multiprocess mode, else this process's;
        then the gauges set for this scrape."""
        if MULTIPROC_DIR is not None:
            registry = CollectorRegistry(auto_describe=False)
            MultiProcessCollector(registry, MULTIPROC_DIR)  # type: ignore[no-untyped-call]  # untyped upstream
        else:
            assert self._registry is not None
            registry = self._registry
        return exposition(registry.collect(), self.gauges)


def _num(v: float) -> str:
    if math.isfinite(v):
        return str(int(v)) if float(v).is_integer() else repr(float(v))
    return "NaN" if math.isnan(v) else "+Inf" if v > 0 else "-Inf"


def _labels(labels: Iterable[tuple[str, str]]) -> str:
    def escape(v: str) -> str:
        return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    inner = ",".join(f'{k}="{escape(v)}"' for k, v in labels)
    return f"{{{inner}}}" if inner else ""


def exposition(families: Iterable[Metric], gauges: Mapping[str, float]) -> str:
    """Counters, summaries, histograms, then gauges, each sorted by name and labels, as MeterFlow has
    always written them (`le="1"`, not prometheus_client's `le="1.0"`; sums to the microsecond)."""
    by_kind: dict[str, list[Metric]] = defaultdict(list)
    for f in families:
        if f.samples:
            by_kind[f.type].append(f)
    lines: list[str] = []

    def head(name: str, doc: str, kind: str) -> None:
        lines.append(f"# HELP {name} {HELP.get(name, doc)}")
        lines.append(f"# TYPE {name} {kind}")

    for f in sorted(by_kind["counter"], key=lambda f: f.name):
        name = f.name + "_total"
        head(name, f.documentation, "counter")
        counts = sorted((tuple(sorted(s.labels.items())), s.value) for s in f.samples if s.name == name)
        lines.extend(f"{name}{_labels(labels)} {_num(v)}" for labels, v in counts)
    for f in sorted(by_kind["summary"], key=lambda f: f.name):
        head(f.name, f.documentation, "summary")
        values = {s.name: s.value for s in f.samples if not s.labels}
        lines.append(f"{f.name}_sum {values.get(f.name + '_sum', 0.0):.6f}")
        lines.append(f"{f.name}_count {_num(values.get(f.name + '_count', 0.0))}")
    for f in sorted(by_kind["histogram"], key=lambda f: f.name):
        head(f.name, f.documentation, "histogram")
        series: dict[Labels, dict[str, float]] = defaultdict(dict)
        buckets: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
        for s in f.samples:
            rest = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            if s.name == f.name + "_bucket":
                buckets[rest].append((float(s.labels["le"]), s.value))
            else:
                series[rest][s.name] = s.value
        for labels in sorted(buckets):
            for bound, n in sorted(buckets[labels]):
                le = "+Inf" if bound == math.inf else f"{bound:g}"
                lines.append(f"{f.name}_bucket{_labels((*labels, ('le', le)))} {_num(n)}")
            lines.append(f"{f.name}_sum{_labels(labels)} {series[labels].get(f.name + '_sum', 0.0):.6f}")
            lines.append(f"{f.name}_count{_labels(labels)} {_num(series[labels].get(f.name + '_count', 0.0))}")
    levels: list[tuple[str, str, Labels, float]] = [
        (f.name, f.documentation, tuple(sorted(s.labels.items())), s.value)
        for f in by_kind["gauge"] for s in f.samples
    ]  # fmt: skip
    levels.extend((name, name, (), v) for name, v in gauges.items())
    seen: set[str] = set()
    for name, doc, labels, v in sorted(levels):
        if name not in seen:
            seen.add(name)
            head(name, doc, "gauge")
        lines.append(f"{name}{_labels(labels)} {_num(v)}")
    return "\n".join(lines) + "\n"
