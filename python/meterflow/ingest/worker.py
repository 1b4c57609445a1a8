"""`meterflow worker`: reads the async mode's stream in a consumer group and commits it.

Each round takes up to ENTRIES_PER_ROUND entries and MF_WORKER_ROUND_MAX_BYTES
bytes of events (claimed ones of dead workers first; one entry at least, however
large), keeps of each entry the events whose dedup key its flush still holds,
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
from redis.exceptions import OutOfMemoryError, RedisError

from meterflow.archive import Spool
from meterflow.config import Settings
from meterflow.ingest import commit
from meterflow.ingest.dedup import KEY_PREFIX
from meterflow.ingest.stream import (
    ATTEMPTS,
    GROUP,
    STREAM,
    WORKERS,
    create_group,
    move_to_dead_letters,
    reset_bytes_if_empty,
)
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
        self.round_max_bytes = settings.worker_round_max_bytes
        # No entry is larger than this (a request's body; raised by any larger one seen): a read of
        # `room // _entry_bound` entries never takes the round past its bytes.
        self._entry_bound = settings.max_body_bytes
        self.largest_round_bytes = 0  # published with the stats

    async def create_group(self) -> None:
        await create_group(self.redis)

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 0.2
        grouped = False
        while not stop.is_set():
            try:
                if not grouped:
                    await self.create_group()
                    grouped = True
                entries = await self._next()
                if entries:
                    await self._process(entries)
                else:
                    await reset_bytes_if_empty(self.redis)
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

    def _room(self, entries: list[Entry], size: int) -> int:
        """How many entries the round may still read: within ENTRIES_PER_ROUND, and within its bytes
        however large each is (one at least, for a round still empty)."""
        fits = (self.round_max_bytes - size) // self._entry_bound
        return min(ENTRIES_PER_ROUND - len(entries), max(fits, 0 if entries else 1))

    def _take(self, entries: list[Entry], items: list[tuple[bytes, dict[bytes, bytes] | None]]) -> int:
        """Parses `items` into `entries`; returns their bytes (an entry's events, as counted in the stream)."""
        size = 0
        for i, f in items:
            if f:
                e = parse_entry(i, f)
                entries.append(e)
                size += len(e.lines)
                self._entry_bound = max(self._entry_bound, len(e.lines))
        return size

    async def _next(self) -> list[Entry]:
        if self._retry:
            out, self._retry = self._retry, []
            return out
        entries: list[Entry] = []
        size = 0
        if time.monotonic() - self._last_claim > min(1.0, self.settings.worker_claim_idle_ms / 1000):
            self._last_claim = time.monotonic()
            cursor: bytes | str = "0-0"
            while (want := self._room(entries, size)) > 0:
                reply = await self.redis.xautoclaim(
                    STREAM, GROUP, self.name, self.settings.worker_claim_idle_ms, cursor, count=want
                )
                cursor = reply[0]
                claimed = cast(list[tuple[bytes, dict[bytes, bytes] | None]], reply[1])
                if claimed:
                    log.info("claimed entries of a stopped worker", extra={"entries": len(claimed)})
                    self.metrics.inc("meterflow_worker_claimed_total", len(claimed))
                size += self._take(entries, claimed)
                if cursor in (b"0-0", "0-0") or not claimed:
                    break
        block: int | None = None if entries else BLOCK_MS
        while (want := self._room(entries, size)) > 0:
            got = await self.redis.xreadgroup(GROUP, self.name, {STREAM: ">"}, count=want, block=block)
            items = [item for _, its in cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes] | None]]]],
                                              got or []) for item in its]  # fmt: skip
            size += self._take(entries, items)
            if len(items) < want:
                break
            block = None  # the first read waits for entries; the rest take what is there
        self.largest_round_bytes = max(self.largest_round_bytes, size)
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
        queued = commit.Queued(self.redis, self.window, [(e.id, e.flush_id, len(e.lines)) for e in entries])
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
            # The flush's keys stay held (queued marker kept): `meterflow worker retry` brings it back.
            if not await move_to_dead_letters(self.redis, e.id, e.flush_id, e.lines, n, e.error):
                continue  # another worker committed or moved it meanwhile
            self.metrics.inc("meterflow_worker_dead_letters_total")
            log.error("entry moved to the dead letters", extra={"entry": e.id.decode(), "attempts": n})

    async def _publish_stats(self) -> None:
        now = time.monotonic()
        if now - self._stats_at < 1.0:
            return
        rate = (self.rows_total - self._stats_rows) / (now - self._stats_at)
        self._stats_at, self._stats_rows = now, self.rows_total
        stats = {"rows_per_s": round(rate, 1), "rows_total": self.rows_total, "entries_total": self.entries_total,
                 "largest_round_bytes": self.largest_round_bytes, "seen_ms": now_ms()}  # fmt: skip
        with contextlib.suppress(OutOfMemoryError):  # Redis at maxmemory: statistics wait, the rounds go on
            await self.redis.hset(WORKERS, self.name, orjson.dumps(stats))


class _StorageDown(Exception):
    """Storage does not answer: the round is retried, no attempt counted."""


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
