"""Where an event is committed: exactly-once's one sequence, store → commit | release, for both modes.

A flush is named by one id (`new_flush_id`): its events' dedup reservations
carry it, its archive object is named after it, and its commit record
(`flush:<id>` in Redis, the index's entry in memory) marks it stored. The step
is always the same (`flush`): insert the rows, spool the archive object (before
the commit: every acknowledged event is on disk for the archive), then write
the commit record; if the insert fails, release instead. What "commit" and
"release" write depends on the mode:

- sync (`Reserved`): the flusher's flush holds reservations in the dedup
  store; commit writes its record, release frees its keys. A flush that never
  commits (a dead process) has its ids taken over once `MF_FLUSH_TIMEOUT_S` passes;
- async (`Queued`): the worker stores stream entries; commit writes each
  entry's flush record, deletes its queued marker, acknowledges and deletes the
  entries and takes their bytes off the stream's byte count, in one script that
  runs even when Redis is at `maxmemory` (deleting is what frees it). Nothing is
  released: an entry not stored stays pending (its keys held by its queued
  flush) and is stored again later.

Owns the sequence and both modes' commit writes. Does not own grouping (the
flusher, the worker), the Redis keys' format (`ingest.dedup`) or storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from meterflow.archive import Spool
from meterflow.ingest.dedup import FLUSH_PREFIX, QUEUED_PREFIX, Dedup, DedupUnavailable
from meterflow.ingest.stream import ATTEMPTS, GROUP, STREAM, STREAM_BYTES
from meterflow.kernel.flush_ids import flush_created_ms
from meterflow.metrics import Metrics
from meterflow.redis import Redis
from meterflow.storage import Storage, StorageError

log = logging.getLogger("meterflow.commit")


@dataclass(frozen=True)
class Sink:
    """Where flushes go: storage, at most `slots` inserts at once (None: no bound), then the spool."""

    storage: Storage
    spool: Spool | None
    metrics: Metrics
    slots: asyncio.Semaphore | None = None


class Outcome(Protocol):
    """What a flush writes once its rows are stored, or once storing them failed."""

    async def commit(self) -> None: ...

    async def release(self) -> None: ...


async def flush(sink: Sink, flush_id: str, rows: bytes, archive: bytes, count: int, outcome: Outcome) -> None:
    """Stores `count` rows (none: commit only), then commits; if storing fails, releases
    and raises StorageError. Interrupted (cancelled), it does neither: the flush never commits."""
    if count:
        try:
            await _store(sink, flush_id, rows, archive, count)
        except StorageError:
            await outcome.release()
            raise
    await outcome.commit()


async def _store(sink: Sink, flush_id: str, rows: bytes, archive: bytes, count: int) -> None:
    """Inserts a flush's rows, then spools its archive object; raises StorageError."""
    metrics = sink.metrics
    async with sink.slots or contextlib.nullcontext():
        t0 = time.perf_counter()
        await sink.storage.insert_events(rows)
        t1 = time.perf_counter()
        metrics.observe("meterflow_flush_seconds", t1 - t0)
        metrics.stage("insert", t1 - t0)
        if sink.spool is not None:
            try:
                await sink.spool.put(flush_id, flush_created_ms(flush_id), archive, count)
            except OSError as e:
                raise StorageError(f"cannot write the archive spool: {e}") from e
            metrics.stage("spool", time.perf_counter() - t1)
    metrics.inc("meterflow_flushes_total")
    metrics.inc("meterflow_flushed_rows_total", count)


class Held(Protocol):
    """A sync flush, as far as its reservations go."""

    @property
    def id(self) -> str: ...

    @property
    def tainted(self) -> bool:
        """A request failed after its reservation may have reached the dedup store."""

    def reserved_keys(self) -> list[str]: ...


@dataclass(frozen=True)
class Reserved:
    """Sync mode: a flush's reservations in the dedup store."""

    dedup: Dedup
    flush: Held
    metrics: Metrics

    async def commit(self) -> None:
        """Writes the commit record; the rows are stored whatever happens here."""
        flush_id = self.flush.id
        if self.flush.tainted:
            # Some of a failed request's keys may be held by this flush, never stored:
            # without the record they are taken over after the flush timeout.
            log.warning("commit record skipped: a request failed while reserving", extra={"flush_id": flush_id})
            return
        t0 = time.perf_counter()
        try:
            await self.dedup.commit(flush_id)
            self.metrics.stage("commit", time.perf_counter() - t0)
        except DedupUnavailable as e:
            # Without the commit record the ids are taken over after the flush
            # timeout and the rows collapse in storage (queries count a transaction once).
            log.warning("commit failed", extra={"flush_id": flush_id, "error": str(e)})

    async def release(self) -> None:
        """Frees the reservations of a flush whose insert failed."""
        flush_id = self.flush.id
        try:
            await self.dedup.release(flush_id, self.flush.reserved_keys())
        except DedupUnavailable as e:
            # The reservations expire into take-overs after the flush timeout.
            log.warning("release failed", extra={"flush_id": flush_id, "error": str(e)})


# KEYS: the stream, the attempts hash, the byte count, then per entry its commit record and queued marker.
# ARGV: the group, the window, then per entry its id and its bytes. A deleted entry's bytes leave the count
# only if this XDEL deleted it (an entry committed twice, by a worker that claimed it, counts once).
# `allow-oom`: at `maxmemory` the commit still runs, and its deletions free the memory.
_COMMIT = """#!lua flags=allow-oom
local freed = 0
for i = 1, (#ARGV - 2) / 2 do
  local id = ARGV[2 * i + 1]
  redis.call('SET', KEYS[2 * i + 2], 'committed', 'EX', ARGV[2])
  redis.call('DEL', KEYS[2 * i + 3])
  redis.call('XACK', KEYS[1], ARGV[1], id)
  if redis.call('XDEL', KEYS[1], id) == 1 then
    freed = freed + tonumber(ARGV[2 * i + 2])
  end
  redis.call('HDEL', KEYS[2], id)
end
if freed > 0 then
  redis.call('DECRBY', KEYS[3], freed)
end
return freed
"""


@dataclass(frozen=True)
class Queued:
    """Async mode: stream entries (entry id, the flush id it was queued under, its bytes) stored together."""

    redis: Redis
    window_s: int
    entries: list[tuple[bytes, str, int]]

    async def commit(self) -> None:
        """Commit records (as `commit_record` writes them), queued markers gone, acknowledged, deleted and
        their bytes counted off: one script. Raises RedisError: the entries stay pending, and are stored
        and committed again."""
        keys: list[bytes | str] = [STREAM, ATTEMPTS, STREAM_BYTES]
        args: list[bytes | str | int] = [GROUP, self.window_s]
        for entry_id, flush_id, size in self.entries:
            keys += [FLUSH_PREFIX + flush_id, QUEUED_PREFIX + flush_id]
            args += [entry_id, size]
        await self.redis.register_script(_COMMIT)(keys=keys, args=args)

    async def release(self) -> None:
        return None  # the entries stay pending: retried, claimed by another worker, or dead-lettered
