"""`meterflow worker`: reads the async mode's stream in a consumer group and commits it.

Each round takes up to ENTRIES_PER_ROUND entries (claimed ones of dead workers
first), keeps of each entry the events whose dedup key its flush still holds,
and group-commits them through `ingest.commit`: one insert, one archive object,
then the commit records, the queued markers' deletion, XACK and XDEL in one transaction. A
worker killed anywhere before that transaction leaves its entries pending;
another claims them after `MF_WORKER_CLAIM_IDLE_MS` and stores them again
(stored rows collapse per transaction, and the commit records are the same).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import cast

import orjson
from redis.exceptions import RedisError, ResponseError

from meterflow.archive import Spool
from meterflow.config import Settings
from meterflow.ingest import commit
from meterflow.ingest.dedup import KEY_PREFIX
from meterflow.ingest.stream import ATTEMPTS, DEAD, GROUP, STREAM, WORKERS
from meterflow.kernel.clock import now_ms
from meterflow.kernel.flush_ids import new_flush_id
from meterflow.kernel.rust import STORED_LIMITS, Batch, DecodeError, decode_batch
from meterflow.metrics import Metrics
from meterflow.redis import Redis
from meterflow.storage import Storage, StorageError

log = logging.getLogger("meterflow.worker")

ENTRIES_PER_ROUND = 200
BLOCK_MS = 200


@dataclass
class Entry:
    id: bytes
    flush_id: str
    lines: bytes
    batch: Batch | None = None
    keep: bytes | None = None
    kept: int = 0
    error: str = ""


def parse_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> Entry:
    e = Entry(id=entry_id, flush_id=fields.get(b"f", b"").decode(errors="replace"), lines=fields.get(b"e", b""))
    if not e.flush_id:
        e.error = "the entry has no flush id"
        return e
    body = b'{"events":[' + b",".join(ln for ln in e.lines.split(b"\n") if ln) + b"]}"
    try:
        e.batch = decode_batch(body, now_ms(), STORED_LIMITS)
    except DecodeError as err:
        e.error = f"the entry's events do not decode: {err.args[-1]}"
    return e


class Worker:
    def __init__(
        self, settings: Settings, redis: Redis, storage: Storage, spool: Spool | None, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.storage = storage
        self.spool = spool
        self.metrics = metrics
        self.name = f"{socket.gethostname()}-{os.getpid()}"
        self.window = settings.dedup_window_s
        self._sink = commit.Sink(storage, spool, metrics)
        self.rows_total = 0
        self.entries_total = 0
        self._retry: list[Entry] = []
        self._last_claim = 0.0
        self._stats_at = time.monotonic()
        self._stats_rows = 0

    async def create_group(self) -> None:
        try:
            await self.redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def run(self, stop: asyncio.Event) -> None:
        await self.create_group()
        backoff = 0.2
        while not stop.is_set():
            try:
                entries = await self._next()
                if entries:
                    await self._process(entries)
                backoff = 0.2
                await self._publish_stats()
            except (RedisError, OSError) as e:
                log.warning("redis unavailable; retrying", extra={"error": str(e)[:300]})
                backoff = min(backoff * 2, 5.0)
                await _sleep_unless(stop, backoff)
            except _StorageDown as e:
                log.warning("storage unavailable; retrying", extra={"error": str(e)[:300]})
                backoff = min(backoff * 2, 5.0)
                await _sleep_unless(stop, backoff)

    async def _next(self) -> list[Entry]:
        if self._retry:
            out, self._retry = self._retry, []
            return out
        entries: list[Entry] = []
        if time.monotonic() - self._last_claim > min(1.0, self.settings.worker_claim_idle_ms / 1000):
            self._last_claim = time.monotonic()
            reply = await self.redis.xautoclaim(
                STREAM, GROUP, self.name, self.settings.worker_claim_idle_ms, "0-0", count=ENTRIES_PER_ROUND
            )
            claimed = cast(list[tuple[bytes, dict[bytes, bytes] | None]], reply[1])
            if claimed:
                log.info("claimed entries of a stopped worker", extra={"entries": len(claimed)})
                self.metrics.inc("meterflow_worker_claimed_total", len(claimed))
            entries += [parse_entry(i, f) for i, f in claimed if f]
        if len(entries) < ENTRIES_PER_ROUND:
            got = await self.redis.xreadgroup(
                GROUP, self.name, {STREAM: ">"}, count=ENTRIES_PER_ROUND - len(entries), block=BLOCK_MS
            )
            for _, items in cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes] | None]]]], got or []):
                entries += [parse_entry(i, f) for i, f in items if f]
        return entries

    async def _process(self, entries: list[Entry]) -> None:
        good = [e for e in entries if not e.error]
        await self._keep(good)
        try:
            await self._store_and_commit(good)
        except StorageError as e:
            try:
                await self.storage.ping()
            except Exception:
                self._retry = entries
                raise _StorageDown(str(e)) from e
            # Storage answers: find the entries it refuses, one by one (each stored one commits).
            stored = []
            for entry in good:
                try:
                    await self._store_and_commit([entry])
                    stored.append(entry)
                except StorageError as e1:
                    entry.error = str(e1)[:500]
            good = stored
        self._count(good)
        failed = [e for e in entries if e.error]
        if failed:
            await self._fail(failed)

    async def _keep(self, entries: list[Entry]) -> None:
        """Each event is kept where its key is still held by the entry's flush."""
        keys: list[str] = []
        for e in entries:
            assert e.batch is not None
            keys += [KEY_PREFIX + e.batch.key(i) for i in range(len(e.batch))]
        values: list[bytes | None] = []
        for j in range(0, len(keys), 10_000):
            values += cast(list[bytes | None], await self.redis.mget(keys[j : j + 10_000]))
        at = 0
        for e in entries:
            assert e.batch is not None
            n = len(e.batch)
            flush = e.flush_id.encode()
            keep = bytearray(n)
            for i, v in enumerate(values[at : at + n]):
                if v is not None and (v == flush or v.startswith(flush + b"|")):
                    keep[i] = 1
            at += n
            e.keep, e.kept = bytes(keep), keep.count(1)

    async def _store_and_commit(self, entries: list[Entry]) -> None:
        """Stores the events kept of `entries` under one archive object (named like a flush), then commits them."""
        if not entries:
            return
        parts = [e for e in entries if e.kept]
        rows = b"".join(e.batch.storage_rows(e.keep) for e in parts if e.batch is not None)
        archive = b"".join(e.batch.archive_lines(e.keep) for e in parts if e.batch is not None)
        count = sum(e.kept for e in parts)
        queued = commit.Queued(self.redis, self.window, [(e.id, e.flush_id) for e in entries])
        await commit.flush(self._sink, new_flush_id(), rows, archive, count, queued)

    def _count(self, entries: list[Entry]) -> None:
        rows = sum(e.kept for e in entries)
        self.rows_total += rows
        self.entries_total += len(entries)
        self.metrics.inc("meterflow_worker_rows_total", rows)
        self.metrics.inc("meterflow_worker_entries_total", len(entries))

    async def _fail(self, entries: list[Entry]) -> None:
        """Counts a failed attempt; past MF_WORKER_MAX_ATTEMPTS the entry goes to the dead letters."""
        for e in entries:
            n = int(await self.redis.hincrby(ATTEMPTS, e.id, 1))
            log.warning("entry failed", extra={"entry": e.id.decode(), "attempt": n, "error": e.error[:300]})
            if n < self.settings.worker_max_attempts:
                continue  # stays pending: claimed again after the idle time
            async with self.redis.pipeline(transaction=True) as p:
                # The flush's keys stay held (queued marker kept): `meterflow worker retry` brings it back.
                p.xadd(DEAD, {b"f": e.flush_id.encode(), b"e": e.lines, b"src": e.id, b"n": str(n).encode(),
                              b"err": e.error.encode()})  # fmt: skip
                p.xack(STREAM, GROUP, e.id)
                p.xdel(STREAM, e.id)
                p.hdel(ATTEMPTS, e.id)
                await p.execute()
            self.metrics.inc("meterflow_worker_dead_letters_total")
            log.error("entry moved to the dead letters", extra={"entry": e.id.decode(), "attempts": n})

    async def _publish_stats(self) -> None:
        now = time.monotonic()
        if now - self._stats_at < 1.0:
            return
        rate = (self.rows_total - self._stats_rows) / (now - self._stats_at)
        self._stats_at, self._stats_rows = now, self.rows_total
        stats = {"rows_per_s": round(rate, 1), "rows_total": self.rows_total, "entries_total": self.entries_total,
                 "seen_ms": now_ms()}  # fmt: skip
        await self.redis.hset(WORKERS, self.name, orjson.dumps(stats))


class _StorageDown(Exception):
    """Storage does not answer: the round is retried, no attempt counted."""


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
