"""The async mode's queue: a Redis Stream of accepted batches, its byte count, its consumer group and dead letters.

The stream's bytes (the sum of its entries' `e` fields, the events' lines) are
counted exactly in `meterflow:events:bytes`: every XADD adds its entry's bytes
in the same transaction or script (`ingest.dedup`, `retry_dead_letters`), and
every XDEL that deletes an entry takes them off in the same script (the
workers' commit in `ingest.commit`, `move_to_dead_letters`). When the stream is
empty the count is set to 0 (`reset_bytes_if_empty`), so entries queued before
the count existed leave no error behind once drained.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, cast

import orjson
from redis.exceptions import RedisError

from meterflow.ingest.dedup import DedupUnavailable, stream_bytes_key
from meterflow.kernel.clock import now_ms
from meterflow.redis import Redis

STREAM = "meterflow:events"
GROUP = "meterflow:workers"
DEAD = "meterflow:events:dead"
ATTEMPTS = "meterflow:events:attempts"
STREAM_BYTES = stream_bytes_key(STREAM)
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
    bytes: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "stream_length": self.length,
            "stream_bytes": self.bytes,
            "oldest_pending_age_ms": self.oldest_pending_age_ms,
            "dead_letters": self.dead_letters,
            "workers": self.workers,
        }


class EventStream:
    """What the API needs of the stream: its length and bytes (backpressure, cached briefly) and its lag."""

    def __init__(self, redis: Redis, max_entries: int, max_bytes: int) -> None:
        self.redis = redis
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._length = 0
        self._bytes = 0
        self._length_at = 0.0
        self._reading: asyncio.Task[None] | None = None
        # Bytes this process has sent to the stream whose reply has not come yet: not in `_bytes`.
        self.in_flight_bytes = 0

    async def size(self) -> tuple[int, int]:
        """(entries, bytes) queued or being processed (workers delete what they acknowledge):
        what the last reservation's reply carried (`seen`), re-read by one XLEN and GET
        that concurrent requests share only when no reply brought them within 100 ms."""
        if time.monotonic() - self._length_at > LENGTH_FRESH_S:
            if self._reading is None or self._reading.done():
                self._reading = asyncio.get_running_loop().create_task(self._read_size())
            await asyncio.shield(self._reading)
        return self._length, self._bytes

    async def _read_size(self) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as p:
                p.xlen(STREAM)
                p.get(STREAM_BYTES)
                length, size = await p.execute()
        except (RedisError, OSError) as e:
            raise DedupUnavailable(f"Redis: {e}") from e
        self._length, self._bytes = int(length), max(0, int(size or 0))
        self._length_at = time.monotonic()

    def seen(self, length: int, size: int) -> None:
        """The stream's length and bytes as a queued reservation's own reply told them."""
        self._length, self._bytes = length, max(0, size)
        self._length_at = time.monotonic()

    async def lag(self) -> Lag:
        now = now_ms()
        try:
            async with self.redis.pipeline(transaction=False) as p:
                p.xlen(STREAM)
                p.xrange(STREAM, "-", "+", count=1)
                p.xlen(DEAD)
                p.hgetall(WORKERS)
                p.get(STREAM_BYTES)
                length, first, dead, stats, size = await p.execute()
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
        return Lag(length=int(length), oldest_pending_age_ms=oldest, dead_letters=int(dead), workers=workers,
                   bytes=max(0, int(size or 0)))  # fmt: skip


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
    """Puts dead letters (all, or those named) back on the stream, their bytes counted; returns how many."""
    moved = 0
    for entry_id, fields in cast(Entries, await redis.xrange(DEAD, "-", "+")):
        if ids is not None and entry_id.decode() not in ids:
            continue
        async with redis.pipeline(transaction=True) as p:
            p.xadd(STREAM, {b"f": fields[b"f"], b"e": fields[b"e"]})
            p.incrby(STREAM_BYTES, len(fields[b"e"]))
            p.xdel(DEAD, entry_id)
            await p.execute()
        moved += 1
    return moved


# `allow-oom` on the scripts a worker needs to drain the stream: at `maxmemory` they still run.
_CREATE_GROUP = """#!lua flags=allow-oom
local ok, err = pcall(redis.call, 'XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
if not ok and not string.find(tostring(err), 'BUSYGROUP') then
  return redis.error_reply(tostring(err))
end
return 1
"""

# KEYS: the stream, the dead letters, the attempts hash, the byte count; ARGV: the group, the entry id,
# its flush id, its lines, its attempts, its error. Moved only if still in the stream (its bytes counted off once).
_TO_DEAD = """#!lua flags=allow-oom
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
if redis.call('XDEL', KEYS[1], ARGV[2]) == 0 then
  return 0
end
redis.call('DECRBY', KEYS[4], #ARGV[4])
redis.call('XADD', KEYS[2], '*', 'f', ARGV[3], 'e', ARGV[4], 'src', ARGV[2], 'n', ARGV[5], 'err', ARGV[6])
return 1
"""

# Empty, the stream holds no bytes: the count is set to 0 (only ever needed for entries queued before it existed).
_RESET_IF_EMPTY = """#!lua flags=allow-oom
if redis.call('XLEN', KEYS[1]) == 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""


async def create_group(redis: Redis) -> None:
    """The workers' consumer group (and the stream), if missing; runs at `maxmemory` too."""
    await redis.register_script(_CREATE_GROUP)(keys=[STREAM], args=[GROUP])


async def move_to_dead_letters(redis: Redis, entry_id: bytes, flush_id: str, lines: bytes, attempts: int,
                               error: str) -> bool:  # fmt: skip
    """Moves a pending entry to the dead letters (acknowledged, deleted, its bytes counted off); False if
    another worker had already deleted it."""
    moved = await redis.register_script(_TO_DEAD)(
        keys=[STREAM, DEAD, ATTEMPTS, STREAM_BYTES], args=[GROUP, entry_id, flush_id, lines, attempts, error]
    )
    return bool(moved)


async def reset_bytes_if_empty(redis: Redis) -> None:
    await redis.register_script(_RESET_IF_EMPTY)(keys=[STREAM, STREAM_BYTES])
