"""The async mode's queue: a Redis Stream of accepted batches, its consumer group and dead letters."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, cast

import orjson
from redis.exceptions import RedisError

from meterflow.ingest.dedup import DedupUnavailable
from meterflow.kernel.clock import now_ms
from meterflow.redis import Redis

STREAM = "meterflow:events"
GROUP = "meterflow:workers"
DEAD = "meterflow:events:dead"
ATTEMPTS = "meterflow:events:attempts"
WORKERS = "meterflow:workers:stats"
# A worker's statistics older than this are dropped from the lag report.
WORKER_STATS_TTL_MS = 3_600_000
# The API's cached stream length is re-read when no reply refreshed it for this long.
LENGTH_FRESH_S = 0.1


def entry_ms(entry_id: bytes | str) -> int:
    """The epoch ms a stream entry id carries."""
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(raw.split("-", 1)[0])


@dataclass
class Lag:
    length: int
    oldest_pending_age_ms: int
    dead_letters: int
    workers: dict[str, dict[str, Any]]

    def as_json(self) -> dict[str, Any]:
        return {
            "stream_length": self.length,
            "oldest_pending_age_ms": self.oldest_pending_age_ms,
            "dead_letters": self.dead_letters,
            "workers": self.workers,
        }


class EventStream:
    """What the API needs of the stream: its length (backpressure, cached briefly) and its lag."""

    def __init__(self, redis: Redis, max_entries: int) -> None:
        self.redis = redis
        self.max_entries = max_entries
        self._length = 0
        self._length_at = 0.0
        self._reading: asyncio.Task[None] | None = None

    async def length(self) -> int:
        """Entries queued or being processed (workers delete what they acknowledge):
        the length the last reservation's reply carried (`seen`), re-read by one XLEN
        that concurrent requests share only when no reply brought it within 100 ms."""
        if time.monotonic() - self._length_at > LENGTH_FRESH_S:
            if self._reading is None or self._reading.done():
                self._reading = asyncio.get_running_loop().create_task(self._read_length())
            await asyncio.shield(self._reading)
        return self._length

    async def _read_length(self) -> None:
        try:
            self._length = int(await self.redis.xlen(STREAM))
        except (RedisError, OSError) as e:
            raise DedupUnavailable(f"Redis: {e}") from e
        self._length_at = time.monotonic()

    def seen(self, length: int) -> None:
        """The stream's length as a queued reservation's own reply told it."""
        self._length = length
        self._length_at = time.monotonic()

    async def lag(self) -> Lag:
        now = now_ms()
        try:
            async with self.redis.pipeline(transaction=False) as p:
                p.xlen(STREAM)
                p.xrange(STREAM, "-", "+", count=1)
                p.xlen(DEAD)
                p.hgetall(WORKERS)
                length, first, dead, stats = await p.execute()
            workers: dict[str, dict[str, Any]] = {}
            gone = []
            for name, raw in stats.items():
                s = orjson.loads(raw)
                if now - int(s["seen_ms"]) > WORKER_STATS_TTL_MS:
                    gone.append(name)
                    continue
                workers[name.decode()] = {**s, "seen_age_ms": max(0, now - int(s["seen_ms"]))}
            if gone:
                await self.redis.hdel(WORKERS, *gone)
        except (RedisError, OSError) as e:
            raise DedupUnavailable(f"Redis: {e}") from e
        oldest = max(0, now - entry_ms(first[0][0])) if first else 0
        return Lag(length=int(length), oldest_pending_age_ms=oldest, dead_letters=int(dead), workers=workers)


Entries = list[tuple[bytes, dict[bytes, bytes]]]


async def dead_letters(redis: Redis, count: int = 1000) -> list[dict[str, Any]]:
    """The dead-letter stream's entries, oldest first, without their events."""
    out = []
    for entry_id, fields in cast(Entries, await redis.xrange(DEAD, "-", "+", count=count)):
        out.append({
            "id": entry_id.decode(),
            "flush_id": fields[b"f"].decode(),
            "source_id": fields.get(b"src", b"").decode(),
            "events": fields[b"e"].count(b"\n"),
            "attempts": int(fields.get(b"n", b"0")),
            "error": fields.get(b"err", b"").decode(errors="replace"),
        })  # fmt: skip
    return out


async def retry_dead_letters(redis: Redis, ids: list[str] | None = None) -> int:
    """Puts dead letters (all, or those named) back on the stream; returns how many."""
    moved = 0
    for entry_id, fields in cast(Entries, await redis.xrange(DEAD, "-", "+")):
        if ids is not None and entry_id.decode() not in ids:
            continue
        async with redis.pipeline(transaction=True) as p:
            p.xadd(STREAM, {b"f": fields[b"f"], b"e": fields[b"e"]})
            p.xdel(DEAD, entry_id)
            await p.execute()
        moved += 1
    return moved
