"""The one Redis client of the package, and every kind of connection it opens.

Owns: how the package reaches Redis (URLs, timeouts, pools) and the hand-written
client of the reservations' hot path (RESP encoding, one multiplexed connection).
Does not own: what is kept in Redis (dedup keys, the event stream, rate-limit
buckets, failure counts): each owner states its keys and commands.

The kinds of connection, one opener each:
- `SharedConnection`: one raw connection per worker process, multiplexed over
  every concurrent request (dedup reservations and commit records);
- `open_client`: redis-py for a process's other commands (scripts, the stream,
  the worker, command-line runs);
- `open_pool`: redis-py over a bounded pool that waits for a free connection
  (the rate limiter: hundreds of concurrent checks);
- `open_fail_fast`: redis-py with short timeouts, for counts that fall back to
  the process's own when Redis is away (failed authentications).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

import redis.asyncio as aioredis

T = TypeVar("T")

Redis = aioredis.Redis

# A reply that has not come within this long fails the requests waiting on the connection.
REPLY_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 3.0
# The request path's own checks (rate limits, failure counts) fail open rather than wait.
FAIL_FAST_S = 2.0


def open_client(url: str) -> Redis:
    """redis-py for a process's commands off the reservations' connection."""
    return aioredis.from_url(
        url, socket_timeout=REPLY_TIMEOUT_S, socket_connect_timeout=CONNECT_TIMEOUT_S, health_check_interval=10
    )


def open_pool(url: str, max_connections: int) -> Redis:
    """redis-py over a bounded pool that waits for a free connection: redis-py's default pool
    refuses past 100 connections, which at a few hundred concurrent requests would fail most
    checks open ("Too many connections"). Close with `aclose(close_connection_pool=True)`:
    the pool is passed in, so redis-py would leave it open."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=FAIL_FAST_S, socket_timeout=FAIL_FAST_S,
        socket_connect_timeout=FAIL_FAST_S,
    )  # fmt: skip
    return aioredis.Redis(connection_pool=pool)


def open_fail_fast(url: str) -> Redis:
    """redis-py with short timeouts, for a caller that has an answer of its own when Redis is slow."""
    return aioredis.from_url(url, socket_timeout=FAIL_FAST_S, socket_connect_timeout=FAIL_FAST_S)


@dataclass(frozen=True)
class Address:
    """Where a raw connection goes, read from a `redis://` URL."""

    host: str
    port: int
    username: str | None
    password: str | None
    db: int

    @classmethod
    def from_url(cls, url: str) -> Address:
        u = urlparse(url)
        return cls(
            host=u.hostname or "127.0.0.1",
            port=u.port or 6379,
            username=unquote(u.username) if u.username else None,
            password=unquote(u.password) if u.password else None,
            db=int(u.path.strip("/") or 0),
        )

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class Refused(Exception):
    """Redis answered the connection's AUTH or SELECT with an error."""


def command(args: list[bytes]) -> bytes:
    """One command in RESP."""
    out = b"*%d\r\n" % len(args)
    for a in args:
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


class Multiplexed:
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


async def connect(address: Address) -> Multiplexed:
    """A raw connection, authenticated and on its database; raises Refused, OSError or TimeoutError."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(address.host, address.port), CONNECT_TIMEOUT_S)
    hello = b""
    if address.password is not None:
        user = [address.username.encode()] if address.username else []
        hello += command([b"AUTH", *user, address.password.encode()])
    if address.db:
        hello += command([b"SELECT", str(address.db).encode()])
    if hello:
        expected = hello.count(b"*")
        writer.write(hello)
        for _ in range(expected):
            line = await asyncio.wait_for(reader.readline(), CONNECT_TIMEOUT_S)
            if not line.startswith(b"+"):
                writer.close()
                raise Refused(f"Redis refused the connection: {line.decode(errors='replace').strip()}")
    return Multiplexed(reader, writer)


class SharedConnection:
    """The worker's one raw connection, connected by the first request that needs it and
    connected anew by the first request after it closed."""

    def __init__(self, address: Address) -> None:
        self.address = address
        self._conn: Multiplexed | None = None
        self._connecting: asyncio.Task[Multiplexed] | None = None

    async def _connection(self) -> Multiplexed:
        """The connection, open when handed out."""
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        connecting = self._connecting
        if connecting is None or connecting.done():
            # A finished connect is never handed out again: it failed, or its connection may have closed since.
            if connecting is not None and not connecting.cancelled() and connecting.exception() is None:
                connecting.result().close()  # open only if its waiters were cancelled: nobody uses it
            connecting = self._connecting = asyncio.get_running_loop().create_task(connect(self.address))
        try:
            conn = await asyncio.shield(connecting)
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None
        if self._conn is None or self._conn.closed:
            self._conn = conn
        return conn

    async def send(self, data: bytes, parse: Callable[[bytes], T | None]) -> T:
        """Sends `data` (whole commands) and returns what `parse` reads of their replies."""
        conn = await self._connection()
        if conn.closed:  # the server hung up between the connect and now: connect once more
            conn = await self._connection()
        return await conn.send(data, parse)

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            await self._conn.wait_closed()
            self._conn = None
