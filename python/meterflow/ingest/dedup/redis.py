"""The shared dedup: reservations, take-overs and commit records in Redis, one round trip per batch.

Its keys: `dedup:<key>` (a reservation, `<flush_id>|<fingerprint>`), `flush:<id>`
(a commit record), `queued:<id>` (async mode: the flush's stream entry is
queued, so its ids are never taken over) and `<stream>:bytes` (async mode: the
bytes of events the stream holds, incremented with every XADD in the same step,
decremented by what the workers delete). The connection is `meterflow.redis`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from redis.exceptions import OutOfMemoryError, RedisError

from meterflow.config import Settings
from meterflow.ingest.dedup.protocol import DedupFull, DedupUnavailable, Reservation
from meterflow.kernel import clock
from meterflow.kernel.flush_ids import flush_created_ms, new_flush_id
from meterflow.kernel.rust import Batch, ReplyError
from meterflow.redis import Address, Redis, Refused, SharedConnection, command, open_client

T = TypeVar("T")

KEY_PREFIX = "dedup:"
FLUSH_PREFIX = "flush:"
# Set with a queued flush's stream entry (async mode), deleted at its commit:
# while it exists, the flush's ids are never taken over, however old.
QUEUED_PREFIX = "queued:"


def stream_bytes_key(stream: str) -> str:
    """The counter of the bytes of events `stream` holds (each entry's `e` field, exactly)."""
    return stream + ":bytes"


def commit_record(flush_id: str, window_s: int) -> list[bytes]:
    """The one command that marks a flush stored: `SET flush:<id> committed EX <window>` (idempotent)."""
    return [b"SET", (FLUSH_PREFIX + flush_id).encode(), b"committed", b"EX", str(window_s).encode()]


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
  redis.call('INCRBY', ARGV[3] .. ':bytes', #ARGV[4])
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


class RedisDedup:
    """Redis: `SET dedup:<key> <flush>|<fingerprint> NX EX <window> GET` per event, one round trip per batch.

    Reservations and commit records go on the worker's shared raw connection;
    the rarer steps (take-overs, releases, reading commit records) through redis-py (`.redis`)."""

    name = "redis"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._url = settings.redis_url
        self._window = settings.dedup_window_s
        self._flush_timeout_ms = settings.flush_timeout_s * 1000
        self._redis: Redis | None = None
        self._address = Address.from_url(settings.redis_url)
        self._link = SharedConnection(self._address)

    @property
    def redis(self) -> Redis:
        if self._redis is None:
            raise DedupUnavailable("Redis dedup is not started.")
        return self._redis

    async def start(self) -> None:
        self._redis = open_client(self._url)
        self._takeover = self._redis.register_script(_TAKEOVER)
        self._release = self._redis.register_script(_RELEASE)

    async def close(self) -> None:
        await self._link.close()
        if self._redis is not None:
            await self._redis.aclose()

    def _unavailable(self, e: BaseException) -> DedupUnavailable:
        # Redis at `maxmemory` (noeviction) refuses writes with an `OOM` error reply: nothing was written.
        full = isinstance(e, OutOfMemoryError) or (isinstance(e, ReplyError) and "OOM " in str(e))
        return (DedupFull if full else DedupUnavailable)(f"Redis at {self._address}: {e}")

    async def ping(self) -> None:
        try:
            await self.redis.ping()
        except (RedisError, OSError) as e:
            raise self._unavailable(e) from e

    async def _pipeline(self, data: bytes, parse: Callable[[bytes], T | None]) -> T:
        """Sends `data` on the worker's shared connection."""
        try:
            return await self._link.send(data, parse)
        except Refused as e:
            raise DedupUnavailable(str(e)) from e

    async def reserve(self, batch: Batch, flush_id: str) -> Reservation:
        n = len(batch)
        data = batch.redis_reserve(KEY_PREFIX, flush_id, self._window)
        try:
            taken = await self._pipeline(data, batch.reserve_replies)
        except (OSError, ConnectionError, TimeoutError, ReplyError) as e:
            raise self._unavailable(e) from e
        if not taken:
            return Reservation(keep=None, accepted=n, duplicates=0)
        try:
            return await self._resolve(batch, flush_id, n, taken, "")
        except (RedisError, OSError) as e:
            raise self._unavailable(e) from e

    async def reserve_queued(self, batch: Batch, flush_id: str, stream: str, lines: bytes | None = None) -> Reservation:
        """Async mode: in one transaction (one round trip, one AOF record) the
        flush's queued marker, its stream entry (every valid event; the worker
        keeps those whose key this flush holds), the stream's length and bytes after it
        (`Reservation.stream_length`, `.stream_bytes`: the API's backpressure) and the reservations.
        Redis at `maxmemory` refuses the whole transaction: DedupFull, nothing written."""
        n = len(batch)
        window = str(self._window).encode()
        lines = batch.archive_lines() if lines is None else lines  # every valid event (`lines`: already made)
        head = (
            command([b"MULTI"])
            + command([b"SET", (QUEUED_PREFIX + flush_id).encode(), b"1", b"EX", window])
            + command([b"XADD", stream.encode(), b"*", b"f", flush_id.encode(), b"e", lines])
            + command([b"XLEN", stream.encode()])
            + command([b"INCRBY", stream_bytes_key(stream).encode(), str(len(lines)).encode()])
        )
        data = head + batch.redis_reserve(KEY_PREFIX, flush_id, self._window) + command([b"EXEC"])
        prefix = b"+OK\r\n" + b"+QUEUED\r\n" * (n + 4) + b"*%d\r\n+OK\r\n" % (n + 4)
        length = size = 0

        def parse(buf: bytes) -> list[tuple[int, bytes, int]] | None:
            nonlocal length, size
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
            start, end = end + 2, rest.find(b"\r\n", end + 2)  # the INCRBY's `:<bytes>`
            if end < 0:
                return None
            size = int(rest[start + 1 : end])
            return batch.reserve_replies(rest[end + 2 :])

        try:
            taken = await self._pipeline(data, parse)
        except (OSError, ConnectionError, TimeoutError, ReplyError, ValueError) as e:
            raise self._unavailable(e) from e
        if not taken:
            return Reservation(keep=None, accepted=n, duplicates=0, stream_length=length, stream_bytes=size)
        try:
            res = await self._resolve(batch, flush_id, n, taken, stream)
        except (RedisError, OSError) as e:
            raise self._unavailable(e) from e
        res.stream_length, res.stream_bytes = length, size
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
        now = clock.now_ms()
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
        data = command(commit_record(flush_id, self._window))
        try:
            try:
                await self._pipeline(data, _ok)
            except (ConnectionError, TimeoutError):
                await self._pipeline(data, _ok)  # the failed connection is closed: this one is new
        except (OSError, ConnectionError, TimeoutError, ReplyError) as e:
            raise self._unavailable(e) from e

    async def release(self, flush_id: str, keys: list[str]) -> None:
        if not keys:
            return
        try:
            await self._release(keys=[KEY_PREFIX + k for k in keys], args=[flush_id])
        except (RedisError, OSError) as e:
            raise self._unavailable(e) from e

    async def warm(self, batch: Batch) -> None:
        return None  # Redis keeps its own state across restarts


def _ok(replies: bytes) -> bool:
    if replies != b"+OK\r\n":
        raise ReplyError(f"Redis refused the commit record: {replies[:200].decode(errors='replace').strip()}")
    return True
