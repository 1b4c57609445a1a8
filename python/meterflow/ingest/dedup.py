"""Exactly-once acceptance: reserve ids per flush, commit once per flush (DESIGN §3)."""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import unquote, urlparse

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from meterflow.config import Settings
from meterflow.ingest.core import Batch, DedupIndex, ReplyError, parse_reserve_replies

KEY_PREFIX = "dedup:"
FLUSH_PREFIX = "flush:"


class DedupUnavailable(Exception):
    """The dedup store cannot be reached; nothing of the request was accepted."""


def new_flush_id(now_ms: int | None = None) -> str:
    """A flush id that carries its creation time: 12 hex digits of epoch ms, then 12 random."""
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    return f"{ms:012x}{secrets.token_hex(6)}"


def flush_created_ms(flush_id: str) -> int:
    try:
        return int(flush_id[:12], 16)
    except ValueError:
        return 0


@dataclass
class Reservation:
    """The dedup verdict for one batch's valid events."""

    keep: bytes | None  # one byte per valid event, non-zero = reserved now; None = all
    accepted: int
    duplicates: int
    in_flight: list[int] = field(default_factory=list)  # valid-event indexes


class Dedup(Protocol):
    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raises DedupUnavailable when the store does not answer."""

    async def reserve(self, batch: Batch, flush_id: str, flush_seq: int) -> Reservation: ...

    async def commit(self, flush_id: str, flush_seq: int) -> None: ...

    async def release(self, flush_id: str, flush_seq: int, ids: list[str]) -> None:
        """Frees the ids this flush reserved (its insert failed)."""

    async def warm(self, ids: list[str]) -> None:
        """Marks ids found in storage as committed (embedded start-up)."""


class MemoryDedup:
    """The embedded mode's index, in the Rust core; authoritative in one process."""

    name = "memory"

    def __init__(self, settings: Settings) -> None:
        self._ix = DedupIndex()
        self._window_s = settings.dedup_window_s
        self._last_expiry = 0.0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._ix)

    async def reserve(self, batch: Batch, flush_id: str, flush_seq: int) -> Reservation:
        now = time.time()
        if now - self._last_expiry > 3600:
            self._last_expiry = now
            self._ix.expire(int(now) - self._window_s)
        codes = self._ix.reserve(batch, flush_seq)
        n = len(codes)
        dups = codes.count(1)
        in_flight = codes.count(2)
        if dups == 0 and in_flight == 0:
            return Reservation(keep=None, accepted=n, duplicates=0)
        keep = codes.translate(_KEEP_NEW)
        flight = [i for i, c in enumerate(codes) if c == 2] if in_flight else []
        return Reservation(keep=keep, accepted=n - dups - in_flight, duplicates=dups, in_flight=flight)

    async def commit(self, flush_id: str, flush_seq: int) -> None:
        self._ix.commit(flush_seq, int(time.time()))

    async def release(self, flush_id: str, flush_seq: int, ids: list[str]) -> None:
        self._ix.release(flush_seq)

    async def warm(self, ids: list[str]) -> None:
        self._ix.load(ids, int(time.time()))


_KEEP_NEW = bytes([1, 0, 0]) + bytes(253)

# Takes over ids whose flush died: set only if the key still holds the dead flush id.
_TAKEOVER = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 2] then
    redis.call('SET', key, ARGV[1], 'EX', ARGV[2])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

# Releases a failed flush's reservations, leaving keys another flush now holds.
_RELEASE = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
    n = n + 1
  end
end
return n
"""


class _RespConnection:
    """A raw connection for the reservation pipeline: one write, replies parsed in Rust."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


class RedisDedup:
    """Redis: `SET dedup:<id> <flush> NX EX <window> GET` per id, one round trip per batch."""

    name = "redis"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._url = settings.redis_url
        self._window = settings.dedup_window_s
        self._flush_timeout_ms = settings.flush_timeout_s * 1000
        self._redis: aioredis.Redis | None = None
        self._idle: list[_RespConnection] = []
        u = urlparse(settings.redis_url)
        self._host = u.hostname or "127.0.0.1"
        self._port = u.port or 6379
        self._password = unquote(u.password) if u.password else None
        self._username = unquote(u.username) if u.username else None
        self._db = int(u.path.strip("/") or 0)

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise DedupUnavailable("Redis dedup is not started.")
        return self._redis

    async def start(self) -> None:
        self._redis = aioredis.from_url(self._url, socket_timeout=5, socket_connect_timeout=3, health_check_interval=10)
        self._takeover = self._redis.register_script(_TAKEOVER)
        self._release = self._redis.register_script(_RELEASE)

    async def close(self) -> None:
        for c in self._idle:
            c.close()
        self._idle.clear()
        if self._redis is not None:
            await self._redis.aclose()

    async def ping(self) -> None:
        try:
            await self.redis.ping()
        except (RedisError, OSError) as e:
            raise DedupUnavailable(f"Redis at {self._host}:{self._port}: {e}") from e

    async def _connect(self) -> _RespConnection:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(self._host, self._port), 3)
        conn = _RespConnection(reader, writer)
        hello = b""
        if self._password is not None:
            args = [b"AUTH"] + ([self._username.encode()] if self._username else []) + [self._password.encode()]
            hello += _resp(args)
        if self._db:
            hello += _resp([b"SELECT", str(self._db).encode()])
        if hello:
            expected = hello.count(b"*")
            writer.write(hello)
            for _ in range(expected):
                line = await asyncio.wait_for(reader.readline(), 3)
                if not line.startswith(b"+"):
                    conn.close()
                    raise DedupUnavailable(f"Redis refused the connection: {line.decode(errors='replace').strip()}")
        return conn

    async def _pipeline(self, data: bytes, count: int) -> list[tuple[int, bytes]]:
        conn = self._idle.pop() if self._idle else await self._connect()
        try:
            conn.writer.write(data)
            await conn.writer.drain()
            buf = b""
            while True:
                chunk = await asyncio.wait_for(conn.reader.read(1 << 16), 5)
                if not chunk:
                    raise ConnectionError("Redis closed the connection")
                buf += chunk
                taken = parse_reserve_replies(buf, count)
                if taken is not None:
                    break
        except BaseException:
            conn.close()
            raise
        self._idle.append(conn)
        return taken

    async def reserve(self, batch: Batch, flush_id: str, flush_seq: int) -> Reservation:
        n = len(batch)
        data = batch.redis_reserve(KEY_PREFIX, flush_id, self._window)
        try:
            taken = await self._pipeline(data, n)
        except (OSError, ConnectionError, TimeoutError, ReplyError) as e:
            raise DedupUnavailable(f"Redis at {self._host}:{self._port}: {e}") from e
        if not taken:
            return Reservation(keep=None, accepted=n, duplicates=0)
        try:
            return await self._resolve(batch, flush_id, n, taken)
        except (RedisError, OSError) as e:
            raise DedupUnavailable(f"Redis at {self._host}:{self._port}: {e}") from e

    async def _resolve(self, batch: Batch, flush_id: str, n: int, taken: list[tuple[int, bytes]]) -> Reservation:
        """Sorts ids already held by another flush into duplicates (its flush
        committed), take-overs (its flush died) and in-flight ones."""
        holders = sorted({old for _, old in taken})
        states = await self.redis.mget([FLUSH_PREFIX + h.decode() for h in holders])
        committed = {h for h, s in zip(holders, states, strict=True) if s is not None}
        now = time.time_ns() // 1_000_000
        keep = bytearray(b"\x01") * n
        duplicates = 0
        stale: list[tuple[int, bytes]] = []
        in_flight: list[int] = []
        for i, old in taken:
            keep[i] = 0
            if old in committed:
                duplicates += 1
            elif now - flush_created_ms(old.decode()) > self._flush_timeout_ms:
                stale.append((i, old))
            else:
                in_flight.append(i)
        if stale:
            keys = [KEY_PREFIX + batch.transaction_id(i) for i, _ in stale]
            won = await self._takeover(keys=keys, args=[flush_id, self._window, *[o for _, o in stale]])
            for (i, _), ok in zip(stale, won, strict=True):
                if ok:
                    keep[i] = 1
                else:
                    in_flight.append(i)
        accepted = n - duplicates - len(in_flight)
        return Reservation(keep=bytes(keep), accepted=accepted, duplicates=duplicates, in_flight=sorted(in_flight))

    async def commit(self, flush_id: str, flush_seq: int) -> None:
        try:
            await self.redis.set(FLUSH_PREFIX + flush_id, b"committed", ex=self._window)
        except (RedisError, OSError) as e:
            raise DedupUnavailable(f"Redis at {self._host}:{self._port}: {e}") from e

    async def release(self, flush_id: str, flush_seq: int, ids: list[str]) -> None:
        if not ids:
            return
        try:
            await self._release(keys=[KEY_PREFIX + i for i in ids], args=[flush_id])
        except (RedisError, OSError) as e:
            raise DedupUnavailable(f"Redis at {self._host}:{self._port}: {e}") from e

    async def warm(self, ids: list[str]) -> None:
        return None  # Redis keeps its own state across restarts


def _resp(args: list[bytes]) -> bytes:
    out = b"*%d\r\n" % len(args)
    for a in args:
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


def open_dedup(settings: Settings) -> Dedup:
    if settings.dedup == "redis":
        return RedisDedup(settings)
    return MemoryDedup(settings)
