"""The commit step of exactly-once, shared by the sync flusher and the async worker.

A flush is named by one id (`new_flush_id`): its events' dedup reservations
carry it, its archive object is named after it, and its commit record
(`flush:<id>` in Redis, the index's entry in memory) marks it stored. The step
is always the same: insert the rows, spool the archive object (before the
commit: every acknowledged event is on disk for the archive), then write the
commit record. A flush whose insert fails releases its reservations; one that
never commits (a dead process) has its ids taken over once
`MF_FLUSH_TIMEOUT_S` passes, unless its stream entry is still queued.
"""

from __future__ import annotations

import logging
import time

from meterflow.archive import Spool
from meterflow.ingest.dedup import Dedup, DedupUnavailable, flush_created_ms
from meterflow.metrics import Metrics
from meterflow.storage import Storage, StorageError

log = logging.getLogger("meterflow.commit")


async def store(
    storage: Storage, spool: Spool | None, metrics: Metrics, flush_id: str, rows: bytes, archive: bytes, count: int
) -> None:
    """Inserts a flush's rows, then spools its archive object; raises StorageError."""
    t0 = time.perf_counter()
    await storage.insert_events(rows)
    t1 = time.perf_counter()
    metrics.observe("meterflow_flush_seconds", t1 - t0)
    metrics.stage("insert", t1 - t0)
    if spool is not None:
        try:
            await spool.put(flush_id, flush_created_ms(flush_id), archive, count)
        except OSError as e:
            raise StorageError(f"cannot write the archive spool: {e}") from e
        metrics.stage("spool", time.perf_counter() - t1)
    metrics.inc("meterflow_flushes_total")
    metrics.inc("meterflow_flushed_rows_total", count)


async def commit(dedup: Dedup, flush_id: str, metrics: Metrics | None = None) -> None:
    """Writes the commit record; the rows are stored whatever happens here."""
    t0 = time.perf_counter()
    try:
        await dedup.commit(flush_id)
        if metrics is not None:
            metrics.stage("commit", time.perf_counter() - t0)
    except DedupUnavailable as e:
        # Without the commit record the ids are taken over after the flush
        # timeout and the rows collapse in storage (queries count a transaction once).
        log.warning("commit failed", extra={"flush_id": flush_id, "error": str(e)})


async def release(dedup: Dedup, flush_id: str, keys: list[str]) -> None:
    """Frees the reservations of a flush whose insert failed."""
    try:
        await dedup.release(flush_id, keys)
    except DedupUnavailable as e:
        # The reservations expire into take-overs after the flush timeout.
        log.warning("release failed", extra={"flush_id": flush_id, "error": str(e)})
