"""Fault drills (issue 14): a known load with duplicates, a real fault mid-load, recovery, then the count.

Every drill ends with the same check: each event answered 200/202 (accepted or
duplicate) is stored exactly once, the usage count of each customer equals its
acknowledged events, nothing acknowledged is missing from the archive, and no
request got a 5xx other than 503. The clients retry every batch they did not
see answered (connection closed, 503, in_flight), as a careful client does.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import socket
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from meterflow import samples
from meterflow.archive import Store
from meterflow.archive.format import decompress
from tests.harness.backends import Backend, archive_store
from tests.harness.http import JSON
from tests.harness.meterflow import ASYNC, MeterFlowServer, MeterFlowWorker
from tests.harness.processes import ClickHouse, Garage, Redis, until

# Limits protect a service from its clients; the drills measure correctness, not them.
OPEN = {"MF_RATE_REQUESTS_PER_S": "100000", "MF_RATE_REQUESTS_BURST": "100000"}
_bucket = itertools.count(1)
pytestmark = pytest.mark.slow


class Traffic:
    """Clients posting 100-event batches, a fifth of each a repeat of events sent before
    (same content); every batch not answered, or answered in part, is sent again."""

    def __init__(self, url: str, auth: dict[str, str], clients: int = 4, hang_up: float = 0.0) -> None:
        self.url = url
        self.auth = auth
        self.clients = clients
        self.hang_up = hang_up  # the share of requests whose connection the client closes before the answer
        self.hung_up = 0
        self.busy = 0  # batches a client has taken and not yet settled
        self.acked: dict[str, dict[str, Any]] = {}
        self.sent: list[dict[str, Any]] = []
        self.pending: list[list[dict[str, Any]]] = []
        self.statuses: Counter[int] = Counter()
        self.cut = 0  # requests that saw no answer
        self.fresh = True
        self.running = True
        self._seq = itertools.count(1)
        self._rng = random.Random(7)

    def _next(self) -> list[dict[str, Any]] | None:
        if self.pending:
            return self.pending.pop(0)
        if not self.fresh:
            return None
        n = next(self._seq)
        events = samples.batch(80, seed=n, prefix="drill")
        if self.sent:
            events += [self._rng.choice(self.sent) for _ in range(20)]
            events = list({e["transaction_id"]: e for e in events}.values())
        return events

    async def _client(self) -> None:
        async with httpx.AsyncClient(timeout=15) as c:
            while self.running:
                events = self._next()
                if events is None:
                    if not self.pending:
                        await asyncio.sleep(0.02)  # another client may still hand a batch back
                    continue
                self.busy += 1  # taken with no await since the pop: "all answered" waits for it
                try:
                    await self._send(c, events)
                finally:
                    self.busy -= 1

    async def _send(self, c: httpx.AsyncClient, events: list[dict[str, Any]]) -> None:
        if self.hang_up and self._rng.random() < self.hang_up:
            await self._send_and_hang_up(events)
            self.cut += 1
            self.pending.append(events)  # no answer seen: sent again
            return
        try:
            r = await c.post(f"{self.url}/v1/events", content=samples.body(events), headers={**JSON, **self.auth})
        except httpx.HTTPError:
            self.cut += 1
            self.pending.append(events)
            await asyncio.sleep(0.05)  # a pause before retrying against a server that is gone
            return
        self.statuses[r.status_code] += 1
        if r.status_code not in (200, 202):
            assert r.status_code in (503, 429), r.text
            self.pending.append(events)
            await asyncio.sleep(0.05)
            return
        body = r.json()
        retry = {f["index"] for f in body["failed"]}
        assert {f["reason"] for f in body["failed"]} <= {"in_flight"}, body
        for i, e in enumerate(events):
            if i not in retry:
                self.acked[e["transaction_id"]] = e
        self.sent += events
        if retry:
            self.pending.append([events[i] for i in sorted(retry)])

    async def _send_and_hang_up(self, events: list[dict[str, Any]]) -> None:
        """The whole request written, then the connection closed before any answer: a network cut."""
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        body = samples.body(events)
        head = (f"POST /v1/events HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Authorization: {self.auth['Authorization']}\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(head.encode() + body)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        self.hung_up += 1

    async def run(self, batches: int, fault: Callable[[], Any], recover: Callable[[], Any]) -> None:
        """`batches` answered, the fault, recovery, 20 more batches; then every batch answered."""
        tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]
        try:
            await until(lambda: sum(self.statuses[s] for s in (200, 202)) >= batches, "load before the fault", 60)
            await fault()
            await recover()
            seen = sum(self.statuses.values())
            await until(lambda: sum(self.statuses.values()) >= seen + 20, "load after recovery", 90)
            self.fresh = False
            await until(lambda: not self.pending and not self.busy, "every batch answered", 90)
        finally:
            self.running = False
            await asyncio.gather(*tasks)
        assert not [s for s in self.statuses if s >= 500 and s != 503], self.statuses


async def archived(store: Store) -> set[str]:
    await store.start()
    ids: set[str] = set()
    try:
        async for key in store.list("events/"):
            ids.update(orjson.loads(x)["transaction_id"] for x in decompress(await store.get(key)))
    finally:
        await store.close()
    return ids


async def settle(server: MeterFlowServer, async_mode: bool) -> None:
    """The stream drained (async) and the spool uploaded."""

    async def done() -> bool:
        async with httpx.AsyncClient(timeout=10) as c:
            ready = (await c.get(f"{server.url}/ready")).json()
        stream = ready.get("stream", {"length": 0})
        return bool(ready["archive"]["spool_objects"] == 0 and stream.get("length") == 0)

    await until(done, "stream drained and archive uploaded", 90, every=0.2)


async def check(traffic: Traffic, backend: Backend, server: MeterFlowServer, env: dict[str, str]) -> None:
    assert len(traffic.acked) > 500, "the load did not get going"
    per_id = backend.query_json("SELECT transaction_id AS id, count() AS n FROM events FINAL GROUP BY id")
    stored = {str(r["id"]): int(r["n"]) for r in per_id}  # type: ignore[call-overload]
    # Every batch was finally answered, so what is stored is exactly what was acknowledged, once.
    assert set(stored) == set(traffic.acked)
    assert {n for n in stored.values()} == {1}
    # Usage (per-transaction counting) per customer equals the acknowledged events.
    expected = Counter(e["customer_id"] for e in traffic.acked.values())
    start, end = samples.now_ms() - 3_600_000, samples.now_ms() + 600_000
    async with httpx.AsyncClient(timeout=30, headers=server.auth) as c:
        for customer in sorted(expected)[:40]:
            r = await c.get(f"{server.url}/v1/usage", params={"customer_id": customer, "meter": "api_calls",
                                                               "start": start, "end": end})  # fmt: skip
            assert r.status_code == 200 and r.json()["value"] == expected[customer], (customer, r.text)
    missing = set(traffic.acked) - await archived(archive_store(backend, env))
    assert not missing, f"{len(missing)} acknowledged events missing from the archive"


def stack(make_backend: Callable[[str], Backend], mode: str, **extra: str) -> tuple[Backend, dict[str, str]]:
    backend = make_backend("full")
    env = {**OPEN, "MF_FLUSH_TIMEOUT_S": "2", **(ASYNC if mode == "async" else {}), **extra}
    return backend, env


def served(mode: str, make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer],
           start_worker: Callable[..., MeterFlowWorker]) -> tuple[Backend, dict[str, str], MeterFlowServer]:  # fmt: skip
    """The full stack in `mode`: a server and, in async mode, one worker."""
    backend, env = stack(make_backend, mode)
    server = start_server(backend, **env)
    if mode == "async":
        start_worker(backend, **env)
    return backend, env, server


async def test_kill_9_of_a_worker_mid_batch(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer],
    start_worker: Callable[..., MeterFlowWorker],
) -> None:  # fmt: skip
    backend, env = stack(make_backend, "async")
    server = start_server(backend, **env)
    doomed, _ = start_worker(backend, **env), start_worker(backend, **env)
    traffic = Traffic(server.url, server.auth)

    assert doomed.proc.proc is not None
    name = f"{socket.gethostname()}-{doomed.proc.proc.pid}"

    async def committing() -> bool:
        async with httpx.AsyncClient(timeout=10, headers=server.auth) as c:
            workers = (await c.get(f"{server.url}/v1/events/lag")).json()["workers"]
        return bool(workers.get(name, {}).get("rows_total", 0) > 0)

    async def fault() -> None:
        await until(committing, "the doomed worker committing", 30)
        doomed.kill()

    async def recover() -> None:
        return None  # the other worker claims the dead one's entries after MF_WORKER_CLAIM_IDLE_MS

    await traffic.run(30, fault, recover)
    await settle(server, True)
    await check(traffic, backend, server, env)


async def test_kill_9_of_the_server_with_retrying_clients(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer]
) -> None:
    backend, env = stack(make_backend, "sync")
    server = start_server(backend, **env)
    traffic = Traffic(server.url, server.auth)
    holder: list[MeterFlowServer] = [server]

    async def fault() -> None:
        await asyncio.to_thread(server.kill)
        await until(lambda: traffic.cut >= traffic.clients, "the clients cut off")

    async def recover() -> None:
        again = await asyncio.to_thread(start_server, backend, **env)
        holder.append(again)
        traffic.url = again.url

    await traffic.run(30, fault, recover)
    await settle(holder[-1], False)
    await check(traffic, backend, holder[-1], env)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_clients_that_hang_up_before_the_answer_and_resend(
    mode: str, make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer],
    start_worker: Callable[..., MeterFlowWorker],
) -> None:  # fmt: skip
    """A third of the requests are cut (the client closes its connection once the body is sent) and sent
    again: whatever the server did with the cut one, each event ends stored once."""
    backend, env, server = served(mode, make_backend, start_server, start_worker)
    traffic = Traffic(server.url, server.auth, hang_up=0.3)

    async def fault() -> None:
        await until(lambda: traffic.hung_up >= 10, "ten requests cut")

    async def recover() -> None:
        traffic.hang_up = 0.0  # the resends are answered

    await traffic.run(30, fault, recover)
    await settle(server, mode == "async")
    await check(traffic, backend, server, env)
    assert traffic.hung_up >= 10


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_redis_restarted_with_its_aof_mid_load(
    mode: str, make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer],
    start_worker: Callable[..., MeterFlowWorker], redis_server: Redis,
) -> None:  # fmt: skip
    backend, env, server = served(mode, make_backend, start_server, start_worker)
    traffic = Traffic(server.url, server.auth)

    async def fault() -> None:
        # kill -9: only what appendfsync always wrote to the AOF survives.
        await asyncio.to_thread(redis_server.proc.kill)

    async def recover() -> None:
        await asyncio.to_thread(redis_server.start)

    await traffic.run(30, fault, recover)
    await settle(server, mode == "async")
    await check(traffic, backend, server, env)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_clickhouse_stopped_10_s(
    mode: str, make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer],
    start_worker: Callable[..., MeterFlowWorker], clickhouse: ClickHouse,
) -> None:  # fmt: skip
    backend, env, server = served(mode, make_backend, start_server, start_worker)
    traffic = Traffic(server.url, server.auth)

    async def fault() -> None:
        await asyncio.to_thread(clickhouse.stop)
        # The outage itself lasts 10 s, as the drill says; the load goes on meanwhile.
        await asyncio.sleep(10)

    async def recover() -> None:
        await asyncio.to_thread(clickhouse.start)

    await traffic.run(20, fault, recover)
    if mode == "async":
        assert traffic.statuses[503] == 0, traffic.statuses  # the stream took every batch during the outage
    await settle(server, mode == "async")
    await check(traffic, backend, server, env)


async def test_s3_stopped_10_s_async(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer],
    start_worker: Callable[..., MeterFlowWorker], garage: Garage,
) -> None:  # fmt: skip
    backend, env = stack(make_backend, "async", **garage.env(f"mf-drill-{next(_bucket)}"))
    server = start_server(backend, **env)
    start_worker(backend, **env)
    traffic = Traffic(server.url, server.auth)

    async def fault() -> None:
        await asyncio.to_thread(garage.stop)
        await asyncio.sleep(10)  # the outage's length

    async def recover() -> None:
        await asyncio.to_thread(garage.start)

    await traffic.run(20, fault, recover)
    assert traffic.statuses[503] == 0, traffic.statuses  # the archive spools; ingestion never stops for it
    await settle(server, True)
    await check(traffic, backend, server, env)


async def test_sigterm_of_every_process_under_load_async(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer],
    start_worker: Callable[..., MeterFlowWorker],
) -> None:  # fmt: skip
    backend, env = stack(make_backend, "async")
    server = start_server(backend, **env)
    workers = [start_worker(backend, **env), start_worker(backend, **env)]
    traffic = Traffic(server.url, server.auth)
    holder: list[MeterFlowServer] = [server]

    async def fault() -> None:
        stopped = await asyncio.gather(asyncio.to_thread(server.stop, signal.SIGTERM),
                                       *(asyncio.to_thread(w.stop, signal.SIGTERM) for w in workers))  # fmt: skip
        assert stopped[1:] == [0, 0], stopped  # each worker committed its round and exited cleanly

    async def recover() -> None:
        holder.append(await asyncio.to_thread(start_server, backend, **env))
        traffic.url = holder[-1].url
        await asyncio.to_thread(start_worker, backend, **env)

    await traffic.run(30, fault, recover)
    await settle(holder[-1], True)
    await check(traffic, backend, holder[-1], env)
