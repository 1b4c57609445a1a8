"""Throughput driver: posts batches for a fixed time and reports acknowledged events/s
and the p50/p99 latency of acknowledgements.

    python loadtest/drive.py --url http://127.0.0.1:3000 --key $KEY --batch-size 1000 --concurrency 8 --seconds 10

Closed loop by default (each connection sends its next request when the last one is
answered: the saturation rate). With `--rate R` it is open loop: request i is due at
start + i/R whatever the answers, and its latency counts from when it was due, so a
slow server shows in the latency rather than in a slower client (no coordinated
omission). `--out FILE` writes the full result, with `acked`: the request numbers whose
every event was accepted. Request k carries the transaction ids `<run>_<k:010d>_<i:04d>`, which is how the load
test checks storage afterwards.

The client is lean so that it is not the bottleneck on a small machine: raw
`asyncio.Protocol` HTTP/1.1 keep-alive connections, one request in flight each, driven
by callbacks (no coroutine, future or header dict per request). It reads a response's
status line, its Content-Length and its body, nothing else, and so expects
Content-Length responses (no chunked encoding), which MeterFlow and the naive server
send. Requests are rendered once from a template, split at the placeholders, and made
unique by joining the pieces with the request number, so the client spends its CPU on
sending, not on building JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import secrets
import statistics
import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from meterflow import samples

PLACEHOLDER = b"NNNNNNNNNN"


def template(batch_size: int, run: str) -> bytes:
    events = samples.batch(batch_size, seed=1)
    for i, e in enumerate(events):
        e["transaction_id"] = f"{run}_{PLACEHOLDER.decode()}_{i:04d}"
    return orjson.dumps({"events": events})


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class ResponseParser:
    """Splits a byte stream of HTTP/1.1 responses into (status, body); Content-Length framing only."""

    def __init__(self) -> None:
        self.buf = b""
        self.head_end = -1  # index of the blank line ending the current response's head
        self.end = -1  # index just past the current response's body

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Adds received bytes; returns the responses they complete, in order."""
        self.buf = self.buf + data if self.buf else data
        done: list[tuple[int, bytes]] = []
        while True:
            if self.end < 0:
                self.head_end = self.buf.find(b"\r\n\r\n")
                if self.head_end < 0:
                    return done
                head = self.buf[: self.head_end].lower()
                at = head.find(b"\r\ncontent-length:")
                if at < 0:
                    raise ValueError(f"response without Content-Length: {bytes(head[:200])!r}")
                line_end = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : line_end if line_end > 0 else len(head)])
                self.end = self.head_end + 4 + length
            if len(self.buf) < self.end:
                return done
            status = int(self.buf[9:12])  # "HTTP/1.1 200 OK"
            done.append((status, self.buf[self.head_end + 4 : self.end]))
            self.buf = self.buf[self.end :]
            self.end = -1


@dataclass
class Tally:
    """What every connection of one run adds to."""

    batch_size: int
    latencies: list[float] = field(default_factory=list)
    acked: list[int] = field(default_factory=list)
    accepted: int = 0
    errors: int = 0
    partial: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    def record(self, k: int, due: float, status: int, body: bytes) -> None:
        self.latencies.append(time.monotonic() - due)
        if status in (200, 202):  # 202: async mode, durably queued
            n = orjson.loads(body)["accepted"]
            self.accepted += n
            if n == self.batch_size:
                self.acked.append(k)
            else:
                self.partial += 1
        else:
            self.error(str(status))

    def error(self, what: str) -> None:
        self.errors += 1
        self.statuses[what] = self.statuses.get(what, 0) + 1


class Plan:
    """Hands out request numbers and when each is due (open loop: start + k/rate)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float, rate: float) -> None:
        self.loop, self.rate = loop, rate
        self.start = loop.time()  # the loop's clock is time.monotonic()
        self.deadline = self.start + seconds
        self.next = 0

    def take(self) -> tuple[int, float] | None:
        k = self.next
        due = self.start + k / self.rate if self.rate else self.loop.time()
        if due >= self.deadline:
            return None
        self.next += 1
        return k, due


class Connection(asyncio.Protocol):
    """One keep-alive connection with one request in flight; sends the next from its callbacks."""

    def __init__(self, plan: Plan, tally: Tally, pieces: list[bytes], finished: asyncio.Future[None],
                 reopen: Callable[[asyncio.Future[None]], None]) -> None:  # fmt: skip
        self.plan, self.tally, self.pieces, self.finished = plan, tally, pieces, finished
        self.reopen = reopen
        self.parser = ResponseParser()
        self.transport: asyncio.Transport | None = None
        self.inflight: tuple[int, float] | None = None
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.send_next()

    def send_next(self) -> None:
        job = self.plan.take()
        if job is None:
            self.close()
            return
        self.inflight = job
        wait = job[1] - self.plan.loop.time()
        if wait > 0:
            self.plan.loop.call_later(wait, self.send)
        else:
            self.send()

    def send(self) -> None:
        if self.transport is None or self.inflight is None or self.transport.is_closing():
            return  # lost while it waited for its due time: connection_lost counted it
        self.transport.write((b"%010d" % self.inflight[0]).join(self.pieces))

    def data_received(self, data: bytes) -> None:
        try:
            responses = self.parser.feed(data)
        except ValueError as e:
            self.fail(e)
            return
        for status, body in responses:
            if self.inflight is None:
                self.fail(ValueError("a response to no request"))
                return
            k, due = self.inflight
            self.inflight = None
            self.tally.record(k, due, status, body)
        if responses:
            self.send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closing or self.finished.done():
            return
        if self.inflight is not None:  # the server closed with a request unanswered (or due)
            self.tally.error("connection_lost")
            self.inflight = None
        self.reopen(self.finished)  # the server closed it: carry on over a new connection

    def fail(self, exc: Exception) -> None:
        if not self.finished.done():
            self.finished.set_exception(exc)
        self.close()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()
        if not self.finished.done():
            self.finished.set_result(None)


async def drive(url: str, key: str, batch_size: int, concurrency: int, seconds: float,
                rate: float = 0, run: str = "") -> dict[str, Any]:  # fmt: skip
    run = run or "lt" + secrets.token_hex(4)
    tpl = template(batch_size, run)
    u = urllib.parse.urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    head = (f"POST {u.path.rstrip('/')}/v1/events HTTP/1.1\r\nHost: {u.netloc}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(tpl)}\r\n\r\n").encode()  # fmt: skip
    pieces = tpl.split(PLACEHOLDER)  # joined with a request's number, the whole request
    pieces[0] = head + pieces[0]
    loop = asyncio.get_running_loop()
    tally = Tally(batch_size)
    cpu0 = cpu_seconds()
    t_start = time.monotonic()
    plan = Plan(loop, seconds, rate)
    reopening: set[asyncio.Task[Any]] = set()

    async def connect(finished: asyncio.Future[None]) -> None:
        try:
            await loop.create_connection(lambda: Connection(plan, tally, pieces, finished, reopen), host, port)
        except OSError as e:
            if not finished.done():
                finished.set_exception(e)

    def reopen(finished: asyncio.Future[None]) -> None:
        task = loop.create_task(connect(finished))
        reopening.add(task)
        task.add_done_callback(reopening.discard)

    dones: list[asyncio.Future[None]] = [loop.create_future() for _ in range(concurrency)]
    for finished in dones:
        await connect(finished)
    await asyncio.gather(*dones)
    elapsed = time.monotonic() - t_start
    lat = tally.latencies or [0.0]
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0]] * 99
    return {
        "run": run, "batch_size": batch_size, "concurrency": concurrency, "rate": rate,
        "seconds": round(elapsed, 2), "requests": len(tally.latencies), "errors": tally.errors,
        "statuses": tally.statuses, "partial": tally.partial, "accepted": tally.accepted,
        "events_per_s": round(tally.accepted / elapsed), "p50_ms": round(q[49] * 1000, 2),
        "p99_ms": round(q[98] * 1000, 2), "cpu_s": round(cpu_seconds() - cpu0, 3), "acked": tally.acked,
        "latencies": [round(x, 5) for x in tally.latencies],
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:3000")
    p.add_argument("--key", required=True, help="an API key with the ingest scope")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--rate", type=float, default=0, help="requests/s, open loop (0: closed loop)")
    p.add_argument("--run", default="", help="transaction id prefix (default: random)")
    p.add_argument("--out", default="", help="write the full result (acks, latencies) here as JSON")
    a = p.parse_args()
    result = asyncio.run(drive(a.url, a.key, a.batch_size, a.concurrency, a.seconds, a.rate, a.run))
    if a.out:
        with open(a.out, "wb") as f:
            f.write(orjson.dumps(result))
    summary = {k: v for k, v in result.items() if k not in ("acked", "latencies")}
    sys.stdout.write(orjson.dumps(summary).decode() + "\n")


if __name__ == "__main__":
    main()
