"""Exactly-once acceptance: reserve ids per flush, commit once per flush (DESIGN §3).

Idempotency is per customer: every layer keys on (customer_id, transaction_id),
as the fixed-size key the Rust core computes (`Batch.key`). Beside each
reservation sits the fingerprint of the event's content, so a retry (same
content: duplicate) is told from a conflict (other content: failed with
`idempotency_conflict`) without another lookup.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote, urlparse

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from meterflow.config import Settings
from meterflow.ingest.core import Batch, DedupIndex, ReplyError

T = TypeVar("T")

KEY_PREFIX = "dedup:"
FLUSH_PREFIX = "flush:"
# Set with a queued flush's stream entry (async mode), deleted at its commit:
# while it exists, the flush's ids are never taken over, however old.
QUEUED_PREFIX = "queued:"


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
    # (valid-event index, differing fields as bits: 1 event_type, 2 timestamp, 4 properties)
    conflicts: list[tuple[int, int]] = field(default_factory=list)
    stream_length: int | None = None  # async mode: the stream's entries right after this batch's


class Dedup(Protocol):
    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raises DedupUnavailable when the store does not answer."""

    async def reserve(self, batch: Batch, flush_id: str) -> Reservation: ...

    async def commit(self, flush_id: str) -> None: ...

    async def release(self, flush_id: str, keys: list[str]) -> None:
        """Frees the keys (`Batch.key`) this flush reserved (its insert failed)."""

    async def warm(self, batch: Batch) -> None:
        """Marks events found in storage as committed (embedded start-up)."""


class MemoryDedup:
    """The embedded mode's index, in the Rust core; authoritative in one process."""

    name = "memory"

    def __init__(self, settings: Settings) -> None:
        self._ix = DedupIndex()
        self._window_s = settings.dedup_window_s
        self._last_expiry = 0.0
        # The Rust index names a flush by a number: the flush id's, until it commits or is released.
        self._numbers: dict[str, int] = {}
        self._next = itertools.count(1)

    def _number(self, flush_id: str) -> int:
        n = self._numbers.get(flush_id)
        if n is None:
            n = self._numbers[flush_id] = next(self._next)
        return n

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._ix)

    async def reserve(self, batch: Batch, flush_id: str) -> Reservation:
        now = time.time()
        if now - self._last_expiry > 3600:
            self._last_expiry = now
            self._ix.expire(int(now) - self._window_s)
        codes = self._ix.reserve(batch, self._number(flush_id))
        n = len(codes)
        keep = codes.translate(_KEEP_NEW)
        accepted = keep.count(1)
        if accepted == n:
            return Reservation(keep=None, accepted=n, duplicates=0)
        dups = codes.count(_DUPLICATE)
        flight = [i for i, c in enumerate(codes) if c == _IN_FLIGHT] if codes.count(_IN_FLIGHT) else []
        conflicts = []
        if accepted + dups + len(flight) < n:
            conflicts = [(i, c & 0x0F) for i, c in enumerate(codes) if c & _CONFLICT]
        return Reservation(keep=keep, accepted=accepted, duplicates=dups, in_flight=flight, conflicts=conflicts)

    async def commit(self, flush_id: str) -> None:
        n = self._numbers.pop(flush_id, None)
        if n is not None:
            self._ix.commit(n, int(time.time()))

    async def release(self, flush_id: str, keys: list[str]) -> None:
        n = self._numbers.pop(flush_id, None)
        if n is not None:
            self._ix.release(n)

    async def warm(self, batch: Batch) -> None:
        self._ix.load(batch, int(time.time()))


# DedupIndex.reserve's codes: 0 new, 1 duplicate, 2 in flight, 16 | differing fields.
_DUPLICATE, _IN_FLIGHT, _CONFLICT = 1, 2, 0x10
_KEEP_NEW = bytes([1]) + bytes(255)

# A reservation's value is `<flush_id>|<fingerprint>` (`<flush_id>` alone
# before fingerprints existed); `held_by` tells whether a flush holds it.
_HELD_BY = """
local function held_by(v, flush)
  return v == flush or (v ~= false and string.sub(v, 1, #flush + 1) == flush .. '|')
end
"""

# Takes over keys whose flush died: set only if the key is still held by the
# dead flush. ARGV: new flush id, window, stream ('' in sync mode), the entry's
# lines, then per key its dead flush and the new event's fingerprint. In async
# mode the keys won go to a stream entry of their own, queued in the same step,
# so no worker can commit the new flush before its keys are held.
_TAKEOVER = _HELD_BY + """
local out = {}
local won = false
for i, key in ipairs(KEYS) do
  if held_by(redis.call('GET', key), ARGV[2 * i + 3]) then
    redis.call('SET', key, ARGV[1] .. '|' .. ARGV[2 * i + 4], 'EX', ARGV[2])
    out[i] = 1
    won = true
  else
    out[i] = 0
  end
end
if won and ARGV[3] ~= '' then
  redis.call('SET', '""" + QUEUED_PREFIX + """' .. ARGV[1], '1', 'EX', ARGV[2])
  redis.call('XADD', ARGV[3], '*', 'f', ARGV[1], 'e', ARGV[4])
end
return out
"""

# Releases a failed flush's reservations, leaving keys another flush now holds.
_RELEASE = _HELD_BY + """
local n = 0
for _, key in ipairs(KEYS) do
  if held_by(redis.call('GET', key), ARGV[1]) then
    redis.call('DEL', key)
    n = n + 1
  end
end
return n
"""


# A reply that has not come within this long fails the requests waiting on the connection.
REPLY_TIMEOUT_S = 5.0


class _Multiplexed:
    """One Redis connection that carries the reservations of every concurrent
    request of a worker: what the requests of one event-loop turn send goes in
    one write, and one read serves many of them. Redis answers a connection's
    commands in order; each request's commands end with an ECHO of a marker of
    its own, so its replies are the bytes up to that marker's reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._out: list[bytes] = []
        # Per request in the order sent: its marker's reply, its parser, its future, when it was sent.
        self._waiting: deque[tuple[bytes, Callable[[bytes], Any], asyncio.Future[Any], float]] = deque()
        self._seq = itertools.count()
        self._loop = asyncio.get_running_loop()
        self._reading = self._loop.create_task(self._read())
        self.closed = False

    def send(self, data: bytes, parse: Callable[[bytes], T | None]) -> asyncio.Future[T]:
        """The parsed replies to `data` (commands whose replies `parse` reads whole);
        already failed with ConnectionError when the connection is closed (nobody reads it)."""
        done: asyncio.Future[T] = self._loop.create_future()
        if self.closed:
            done.set_exception(ConnectionError("the connection to Redis is closed"))
            return done
        # The reply looked for is the marker's whole bulk reply `$<len>\r\nmf:<n>\r\n`. Other replies hold
        # ':' only as an integer reply's first byte (XLEN's `:<n>`), right after a CRLF, never after "mf";
        # their bulk strings (flush ids, fingerprints, stream entry ids) never hold ':'.
        marker = b"mf:%d" % next(self._seq)
        self._waiting.append((b"$%d\r\n%s\r\n" % (len(marker), marker), parse, done, time.monotonic()))
        if not self._out:
            self._loop.call_soon(self._write)
        self._out.append(data + b"*2\r\n$4\r\nECHO\r\n$%d\r\n%s\r\n" % (len(marker), marker))
        return done

    def _write(self) -> None:
        if self.closed:
            return
        data = b"".join(self._out)
        self._out.clear()
        self._writer.write(data)

    async def _read(self) -> None:
        buf = bytearray()
        try:
            while True:
                try:
                    async with asyncio.timeout(1.0):
                        chunk = await self._reader.read(1 << 16)
                except TimeoutError:
                    if self._waiting and time.monotonic() - self._waiting[0][3] > REPLY_TIMEOUT_S:
                        raise ConnectionError(f"Redis did not answer within {REPLY_TIMEOUT_S:g} s") from None
                    continue
                if not chunk:
                    raise ConnectionError("Redis closed the connection")
                buf += chunk
                while self._waiting:
                    end, parse, done, _ = self._waiting[0]
                    at = buf.find(end)
                    if at < 0:
                        break
                    replies = bytes(buf[:at])
                    del buf[: at + len(end)]
                    if not done.done():  # else its request was cancelled; the replies are read all the same
                        _settle(done, parse, replies)
                    # Taken off only now: a parser that raises past Exception leaves its request to close().
                    self._waiting.popleft()
        except Exception as e:  # a broken connection, or replies out of step: no request may wait forever
            self.close(e)
        finally:
            # Whatever ended the reader (a BaseException from a parser: a Rust panic), nobody reads the
            # connection any more: it closes, its requests fail, and later ones go to a new connection.
            self.close(ConnectionError("the connection's reader stopped"))

    def close(self, error: BaseException | None = None) -> None:
        """Closes the connection; every request still waiting fails with `error`."""
        if self.closed:
            return
        self.closed = True
        self._writer.close()
        failure = error or ConnectionError("the dedup store is closing")
        while self._waiting:
            done = self._waiting.popleft()[2]
            if not done.done():
                done.set_exception(ConnectionError(str(failure)))
        if asyncio.current_task() is not self._reading:
            self._reading.cancel()

    async def wait_closed(self) -> None:
        await asyncio.gather(self._reading, return_exceptions=True)


def _settle(done: asyncio.Future[Any], parse: Callable[[bytes], Any], replies: bytes) -> None:
    """Gives a request its parsed replies, or its own error (a refused command)."""
    try:
        taken = parse(replies)
    except Exception as e:
        done.set_exception(e)
        return
    if taken is None:
        done.set_exception(ConnectionError("Redis sent a truncated reply"))
    else:
        done.set_result(taken)


class RedisDedup:
    """Redis: `SET dedup:<key> <flush>|<fingerprint> NX EX <window> GET` per event, one round trip per batch."""

    name = "redis"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._url = settings.redis_url
        self._window = settings.dedup_window_s
        self._flush_timeout_ms = settings.flush_timeout_s * 1000
        self._redis: aioredis.Redis | None = None
        self._conn: _Multiplexed | None = None
        self._connecting: asyncio.Task[_Multiplexed] | None = None
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
        if self._conn is not None:
            self._conn.close()
            await self._conn.wait_closed()
            self._conn = None
        if self._redis is not None:
            await self._redis.aclose()

    async def ping(self) -> None:
        try:
            await self.redis.ping()
        except (RedisError, OSError) as e:
            raise DedupUnavailable(f"Redis at {self._host}:{self._port}: {e}") from e

    async def _connect(self) -> _Multiplexed:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(self._host, self._port), 3)
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
                    writer.close()
                    raise DedupUnavailable(f"Redis refused the connection: {line.decode(errors='replace').strip()}")
        return _Multiplexed(reader, writer)

    async def _connection(self) -> _Multiplexed:
        """The worker's shared connection, open when handed out (connected once, by the first request that needs it)."""
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        connecting = self._connecting
        if connecting is None or connecting.done():
            # A finished connect is never handed out again: it failed, or its connection may have closed since.
            if connecting is not None and not connecting.cancelled() and connecting.exception() is None:
                connecting.result().close()  # open only if its waiters were cancelled: nobody uses it
            connecting = self._connecting = asyncio.get_running_loop().create_task(self._connect())
        try:
            conn = await asyncio.shield(connecting)
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None
        if self._conn is None or self._conn.closed:
            self._conn = conn
        return conn

    async def _pipeline(self, data: bytes, parse: Callable[[bytes], T | None]) -> T:
        """Sends `data` on the worker's shared connection."""
        conn = await self._connection()
        if conn.closed:  # the server hung up between the connect and now: connect once more
            conn = await self._connection()
        return await conn.send(data, parse)

    async def reserve(self, batch: Batch, flush_id: str) -> Reservation:
        n = len(batch)
        data = batch.redis_reserve(KEY_PREFIX, flush_id, self._window)
        try:
            taken = await self._pipeline(data, batch.reserve_replies)
        except (OSError, ConnectionError, TimeoutError, ReplyError) as e:
            raise DedupUnavailable(f"Redis at {self._host}:{self._port}: {e}") from e
        if not taken:
            return Reservation(keep=None, accepted=n, duplicates=0)
        try:
            return await self._resolve(batch, flush_id, n, taken, "")
        except (RedisError, OSError) as e:
            raise DedupUnavailable(f"Redis at {self._host}:{self._port}: {e}") from e

    async def reserve_queued(self, batch: Batch, flush_id: str, stream: str) -> Reservation:
        """Async mode: in one transaction (one round trip, one AOF record) the
        flush's queued marker, its stream entry (every valid event; the worker
        keeps those whose key this flush holds), the stream's length after it
        (`Reservation.stream_length`, the API's backpressure) and the reservations."""
        n = len(batch)
        window = str(self._window).encode()
        head = (
            _resp([b"MULTI"])
            + _resp([b"SET", (QUEUED_PREFIX + flush_id).encode(), b"1", b"EX", window])
            + _resp([b"XADD", stream.encode(), b"*", b"f", flush_id.encode(), b"e", batch.archive_lines()])
            + _resp([b"XLEN", stream.encode()])
        )
        data = head + batch.redis_reserve(KEY_PREFIX, flush_id, self._window) + _resp([b"EXEC"])
        prefix = b"+OK\r\n" + b"+QUEUED\r\n" * (n + 3) + b"*%d\r\n+OK\r\n" % (n + 3)
        length = 0

        def parse(buf: bytes) -> list[tuple[int, bytes, int]] | None:
            nonlocal length
            m = min(len(buf), len(prefix))
            if buf[:m] != prefix[:m]:
                error = next((ln for ln in buf.split(b"\r\n") if ln.startswith(b"-")), b"an unexpected reply")
                raise ReplyError(f"the queued reservation failed: {error.decode(errors='replace')[:200]}")
            if len(buf) < len(prefix):
                return None
            rest = buf[len(prefix) :]
            end = rest.find(b"\r\n")  # the XADD's entry id
            if end < 0:
                return None
            size = int(rest[1:end])
            start = end + 2 + size + 2
            end = rest.find(b"\r\n", start)  # the XLEN's `:<entries>`
            if end < 0:
                return None
            length = int(rest[start + 1 : end])
            return batch.reserve_replies(rest[end + 2 :])

        try:
            taken = await self._pipeline(data, parse)
        except (OSError, ConnectionError, TimeoutError, ReplyError, ValueError) as e:
            raise DedupUnavailable(f"Redis at {self._host}:{self._port}: {e}") from e
        if not taken:
            return Reservation(keep=None, accepted=n, duplicates=0, stream_length=length)
        try:
            res = await self._resolve(batch, flush_id, n, taken, stream)
        except (RedisError, OSError) as e:
            raise DedupUnavailable(f"Redis at {self._host}:{self._port}: {e}") from e
        res.stream_length = length
        return res

    async def _resolve(
        self, batch: Batch, flush_id: str, n: int, taken: list[tuple[int, bytes, int]], stream: str
    ) -> Reservation:
        """Sorts keys already held by another flush into duplicates and
        conflicts (its flush committed), take-overs (its flush died) and
        in-flight ones."""
        holders = sorted({holder for _, holder, _ in taken})
        states = await self.redis.mget(
            [FLUSH_PREFIX + h.decode() for h in holders] + [QUEUED_PREFIX + h.decode() for h in holders]
        )
        # A queued flush (async mode) is as good as committed: its entry is
        # durably in the stream, and a worker stores every key it holds.
        committed = {h for h, s in zip(holders, states, strict=False) if s is not None}
        committed |= {h for h, s in zip(holders, states[len(holders) :], strict=True) if s is not None}
        now = time.time_ns() // 1_000_000
        keep = bytearray(b"\x01") * n
        duplicates = 0
        stale: list[tuple[int, bytes]] = []
        in_flight: list[int] = []
        conflicts: list[tuple[int, int]] = []
        for i, holder, differs in taken:
            keep[i] = 0
            if holder in committed:
                if differs:
                    conflicts.append((i, differs))
                else:
                    duplicates += 1
            elif now - flush_created_ms(holder.decode()) > self._flush_timeout_ms:
                # Never committed, so never acknowledged: this event takes its place.
                stale.append((i, holder))
            else:
                in_flight.append(i)
        if stale:
            keys = [KEY_PREFIX + batch.key(i) for i, _ in stale]
            lines = b""
            if stream:
                # Queued mode: the keys won go to a flush and stream entry of their own.
                flush_id = new_flush_id()
                mask = bytearray(n)
                for i, _ in stale:
                    mask[i] = 1
                lines = batch.archive_lines(bytes(mask))
            args: list[bytes | str | int] = [flush_id, self._window, stream, lines]
            for i, holder in stale:
                args += [holder, batch.fingerprint(i)]
            won = await self._takeover(keys=keys, args=args)
            for (i, _), ok in zip(stale, won, strict=True):
                if ok:
                    keep[i] = 1
                else:
                    in_flight.append(i)
        accepted = n - duplicates - len(in_flight) - len(conflicts)
        return Reservation(
            keep=bytes(keep), accepted=accepted, duplicates=duplicates, in_flight=sorted(in_flight), conflicts=conflicts
        )

    async def commit(self, flush_id: str) -> None:
        """The commit record, on the reservations' connection: it goes in the same write as theirs.
        `SET … EX` is idempotent, so a lost connection is retried once, on a fresh one."""
        data = _resp([b"SET", (FLUSH_PREFIX + flush_id).encode(), b"committed", b"EX", str(self._window).encode()])
        try:
            try:
                await self._pipeline(data, _ok)
            except (ConnectionError, TimeoutError):
                await self._pipeline(data, _ok)  # the failed connection is closed: this one is new
        except (OSError, ConnectionError, TimeoutError, ReplyError) as e:
            raise DedupUnavailable(f"Redis at {self._host}:{self._port}: {e}") from e

    async def release(self, flush_id: str, keys: list[str]) -> None:
        if not keys:
            return
        try:
            await self._release(keys=[KEY_PREFIX + k for k in keys], args=[flush_id])
        except (RedisError, OSError) as e:
            raise DedupUnavailable(f"Redis at {self._host}:{self._port}: {e}") from e

    async def warm(self, batch: Batch) -> None:
        return None  # Redis keeps its own state across restarts


def _ok(replies: bytes) -> bool:
    if replies != b"+OK\r\n":
        raise ReplyError(f"Redis refused the commit record: {replies[:200].decode(errors='replace').strip()}")
    return True


def _resp(args: list[bytes]) -> bytes:
    out = b"*%d\r\n" % len(args)
    for a in args:
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


def open_dedup(settings: Settings) -> Dedup:
    if settings.dedup == "redis":
        return RedisDedup(settings)
    return MemoryDedup(settings)
