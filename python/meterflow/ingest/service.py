"""The ingest path of DESIGN §3: decode, rate check (the caller), reserve, then group-commit (sync) or queue (async)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from meterflow.archive import Spool, SpoolFull
from meterflow.config import Settings
from meterflow.ingest.dedup import Dedup, DedupFull, DedupUnavailable, RedisDedup, Reservation
from meterflow.ingest.flusher import Flusher, Overloaded
from meterflow.ingest.stream import STREAM, EventStream
from meterflow.kernel.clock import now_ms
from meterflow.kernel.flush_ids import new_flush_id
from meterflow.kernel.rust import STORED_LIMITS, Batch, DecodeError, Limits, conflict_fields, decode_batch
from meterflow.metrics import Metrics
from meterflow.storage import Storage, StorageError

log = logging.getLogger("meterflow.ingest")

__all__ = ["DecodeError", "IngestResult", "IngestService", "Unavailable"]


class Unavailable(Exception):
    """A backing service is down or the queue is full: answer 503 with Retry-After."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class IngestResult:
    accepted: int
    duplicates: int
    failed: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "duplicates": self.duplicates, "failed": self.failed}


LARGE_BODY = 256 * 1024

IN_FLIGHT_MESSAGE = "Another request holding this transaction_id has not finished storing it; retry later."

HOUR_MS = 3_600_000
# Warm-up reads stored events in runs of whole hours of at most this many rows
# (one hour may hold more), so its memory does not grow with the window.
WARM_CHUNK_ROWS = 50_000
WARM_BATCH = 1000


def conflict_message(index: int, differs: int) -> str:
    return (
        f"events[{index}] differs from the event stored with this customer_id and transaction_id "
        f"in: {conflict_fields(differs)}."
    )


def hour_runs(counts: list[dict[str, Any]], limit: int) -> Iterator[tuple[int, int]]:
    """[start, end) in epoch ms of consecutive hours holding at most `limit` rows together."""
    start: int | None = None
    end = rows = 0
    for c in counts:
        h, n = int(c["h"]), int(c["n"])
        if start is not None and rows + n > limit:
            yield start, end
            start = None
        if start is None:
            start, rows = h * HOUR_MS, 0
        end = (h + 1) * HOUR_MS
        rows += n
    if start is not None:
        yield start, end


def _stored_event(r: dict[str, Any]) -> bytes:
    """A stored row as the event it was accepted as (properties are canonical JSON already)."""
    head = orjson.dumps(
        {
            "transaction_id": r["transaction_id"],
            "customer_id": r["customer_id"],
            "event_type": r["event_type"],
            "timestamp": r["timestamp_ms"],
        }
    )
    return head[:-1] + b',"properties":' + str(r["properties"]).encode() + b"}"


class IngestService:
    def __init__(
        self, settings: Settings, storage: Storage, dedup: Dedup, metrics: Metrics, spool: Spool | None = None
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.dedup = dedup
        self.metrics = metrics
        self.limits = Limits(
            max_events=settings.max_events,
            max_future_ms=settings.max_future_ms,
            max_age_ms=settings.max_age_ms,
        )
        self.spool = spool
        self.flusher = Flusher(settings, storage, dedup, metrics, spool)
        # Async mode: requests queue their events in the stream `meterflow worker` commits.
        self.stream: EventStream | None = None
        if settings.ingest_mode == "async" and isinstance(dedup, RedisDedup):
            self.stream = EventStream(dedup.redis, settings.stream_max_entries, settings.stream_max_bytes)

    async def warm(self) -> None:
        """Embedded mode: load the keys and fingerprints of the events stored
        within the dedup window, a bounded run of hours at a time."""
        if self.dedup.name != "memory":
            return
        now = now_ms()
        since = now - self.settings.dedup_window_s * 1000
        # `ts` as well as `timestamp_ms`: partitions are pruned by `ts`.
        where = f"timestamp_ms >= {since} AND ts >= toDateTime({max(since, 0) // 1000})"
        counts = await self.storage.query(
            f"SELECT intDiv(timestamp_ms, {HOUR_MS}) AS h, count() AS n FROM events WHERE {where} GROUP BY h ORDER BY h"
        )
        loaded = skipped = 0
        for start, end in hour_runs(counts, WARM_CHUNK_ROWS):
            rows = await self.storage.query(
                "SELECT transaction_id, customer_id, event_type, timestamp_ms, properties FROM events "
                f"WHERE {where} AND timestamp_ms >= {start} AND timestamp_ms < {end} "
                f"AND ts >= toDateTime({max(start, 0) // 1000}) AND ts <= toDateTime({max(end, 0) // 1000})"
            )
            for j in range(0, len(rows), WARM_BATCH):
                body = b'{"events":[' + b",".join(_stored_event(r) for r in rows[j : j + WARM_BATCH]) + b"]}"
                batch = decode_batch(body, now, STORED_LIMITS)
                await self.dedup.warm(batch)
                loaded += len(batch)
                skipped += len(batch.failed)
            del rows
        log.info("dedup index warmed", extra={"events": loaded, "skipped": skipped})

    async def decode(self, body: bytes, customer_id: str | None = None) -> Batch:
        """Decodes and validates a body (raises DecodeError for the envelope);
        `customer_id` binds the batch to one customer."""
        now = now_ms()
        t0 = time.perf_counter()
        if len(body) > LARGE_BODY:
            # The core releases the GIL: a large body decodes off the event loop.
            batch = await asyncio.to_thread(decode_batch, body, now, self.limits, customer_id)
        else:
            batch = decode_batch(body, now, self.limits, customer_id)
        self.metrics.stage("decode", time.perf_counter() - t0)
        return batch

    async def accept(self, batch: Batch) -> IngestResult:
        """Reserves the batch's ids and stores (sync) or queues (async) the
        events reserved now; raises Unavailable. Per-event problems are in the result."""
        failed: list[dict[str, Any]] = [
            {"index": i, "transaction_id": t, "reason": r, "message": m}
            for (i, t, r), m in zip(batch.failed, batch.failure_messages, strict=True)
        ]
        n = len(batch)
        m = self.metrics
        m.inc("meterflow_events_received_total", batch.received)
        for f in failed:
            m.inc("meterflow_events_failed_total", reason=f["reason"].split(":")[0])
        duplicates = batch.in_batch_duplicates
        accepted = 0
        if n:
            res = await (self._queue(batch) if self.stream is not None else self._store(batch))
            accepted, duplicates = res.accepted, duplicates + res.duplicates
            for i, differs in res.conflicts:
                index = batch.request_index(i)
                message = conflict_message(index, differs)
                failed.append({"index": index, "transaction_id": batch.transaction_id(i),
                               "reason": "idempotency_conflict", "message": message})  # fmt: skip
                m.inc("meterflow_events_failed_total", reason="idempotency_conflict")
            for i in res.in_flight:
                failed.append({"index": batch.request_index(i), "transaction_id": batch.transaction_id(i),
                               "reason": "in_flight", "message": IN_FLIGHT_MESSAGE})  # fmt: skip
                m.inc("meterflow_events_failed_total", reason="in_flight")
        if len(failed) > len(batch.failed):
            failed.sort(key=lambda f: int(f["index"]))
        m.inc("meterflow_events_accepted_total", accepted)
        m.inc("meterflow_events_duplicate_total", duplicates)
        # Every event is accounted for: received = accepted + duplicates + failed.
        assert accepted + duplicates + len(failed) == batch.received
        return IngestResult(accepted=accepted, duplicates=duplicates, failed=failed)

    async def _store(self, batch: Batch) -> Reservation:
        """Sync mode: reserve under the open flush, then wait for its commit."""
        n = len(batch)
        try:
            if self.spool is not None:
                self.spool.check_room()
            flush = self.flusher.join(n)
        except SpoolFull as e:
            raise Unavailable("archive_spool_full", str(e)) from e
        except Overloaded as e:
            raise Unavailable("overloaded", str(e)) from e
        added = False
        try:
            t0 = time.perf_counter()
            try:
                res = await self.dedup.reserve(batch, flush.id)
                self.metrics.stage("dedup", time.perf_counter() - t0)
            except BaseException as e:
                # The pipeline may have reserved some keys under this flush before
                # failing: its commit record would make them duplicates never stored.
                # (The in-process index reserves all or nothing, and has no take-over.)
                flush.tainted = self.dedup.name != "memory"
                if isinstance(e, DedupUnavailable):
                    raise Unavailable("dedup_unavailable", f"The dedup store is unavailable: {e}") from e
                raise
            if res.accepted:
                self.flusher.add(flush, batch, res.keep, batch.storage_rows(res.keep), res.accepted, n)
                added = True
        finally:
            if not added:
                self.flusher.leave(flush, n)
        if added:
            t1 = time.perf_counter()
            try:
                await asyncio.shield(flush.done)
            except StorageError as e:
                raise Unavailable("storage_unavailable", f"Storage is unavailable: {e}") from e
            self.metrics.stage("flush_wait", time.perf_counter() - t1)
        return res

    async def _queue(self, batch: Batch) -> Reservation:
        """Async mode: refuse past the stream's bounds in entries and bytes (known from the previous
        reply, so under load without a round trip of its own, plus this process's bytes in flight),
        else reserve and queue in one round trip."""
        stream, dedup = self.stream, self.dedup
        assert stream is not None and isinstance(dedup, RedisDedup)
        lines = batch.archive_lines()  # the stream entry's events, as `reserve_queued` queues them
        size = len(lines)
        try:
            length, queued = await stream.size()
            if length >= stream.max_entries:
                self.metrics.inc("meterflow_stream_full_total")
                raise Unavailable(
                    "overloaded", f"The event stream holds {length} entries; the limit is {stream.max_entries}."
                )
            ahead = queued + stream.in_flight_bytes
            # An empty stream takes any batch, so one larger than the limit is never refused forever.
            if ahead and ahead + size > stream.max_bytes:
                self.metrics.inc("meterflow_stream_full_total")
                raise Unavailable(
                    "overloaded",
                    f"The event stream holds {ahead} bytes of events; this batch's {size} bytes would pass "
                    f"the limit of {stream.max_bytes} (MF_STREAM_MAX_BYTES).",
                )
            t0 = time.perf_counter()
            stream.in_flight_bytes += size
            try:
                res = await dedup.reserve_queued(batch, new_flush_id(), STREAM, lines)
            finally:
                stream.in_flight_bytes -= size
            self.metrics.stage("dedup", time.perf_counter() - t0)
            if res.stream_length is not None and res.stream_bytes is not None:
                stream.seen(res.stream_length, res.stream_bytes)
            return res
        except DedupFull as e:
            self.metrics.inc("meterflow_stream_full_total")
            log.warning("ingest refused: Redis is at maxmemory", extra={"error": str(e)[:300]})
            raise Unavailable("overloaded", "Redis is out of memory (maxmemory); nothing was queued.") from e
        except DedupUnavailable as e:
            raise Unavailable("dedup_unavailable", f"The dedup store is unavailable: {e}") from e
