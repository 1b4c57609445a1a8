"""Failure paths: stop or kill the real services and MeterFlow itself, then count."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from meterflow import samples
from tests.harness.backends import Backend
from tests.harness.http import JSON, post_events
from tests.harness.meterflow import MeterFlowServer
from tests.harness.processes import ClickHouse, Redis, until

pytestmark = pytest.mark.slow


def test_clickhouse_down_answers_503_and_marks_nothing(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer], clickhouse: ClickHouse
) -> None:
    backend = make_backend("full")
    server = start_server(backend)
    events = samples.batch(200, seed=31)
    clickhouse.stop()
    try:
        r = post_events(server, events)
        assert r.status_code == 503
        assert r.headers["Retry-After"] == "1"
        assert r.json()["error"] == "storage_unavailable"
        usage = httpx.get(f"{server.url}/v1/usage", params={"customer_id": "c", "meter": "api_calls", "start": 1,
                                                           "end": 2}, headers=server.auth)  # fmt: skip
        assert usage.status_code == 503 and usage.headers["Retry-After"] == "1"
        # The store's own text (hosts, ports, SQL) goes to the log, never to the client.
        for answer in (r, usage):
            assert answer.json()["error"] == "storage_unavailable"
            assert str(clickhouse.http_port) not in answer.text and "ClickHouse" not in answer.text
        assert str(clickhouse.http_port) in server.logs()
        ready = httpx.get(f"{server.url}/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["storage:clickhouse"] == {"status": "down"}
        assert str(clickhouse.http_port) not in ready.text
    finally:
        clickhouse.start()
    r = post_events(server, events)
    assert r.json() == {"accepted": 200, "duplicates": 0, "failed": []}
    assert backend.stored() == (200, 200)


def test_redis_down_answers_503_and_stores_nothing(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer], redis_server: Redis
) -> None:
    backend = make_backend("full")
    server = start_server(backend)
    events = samples.batch(100, seed=32)
    redis_server.stop()
    try:
        r = post_events(server, events)
        assert r.status_code == 503
        # The rate limiter fails open; dedup cannot, and answers.
        assert r.json()["error"] == "dedup_unavailable"
        # Reads do not need Redis: usage still answers while it is down.
        usage = httpx.get(f"{server.url}/v1/usage", params={"customer_id": "c", "meter": "api_calls", "start": 1,
                                                           "end": 2}, headers=server.auth)  # fmt: skip
        assert usage.status_code == 200
        assert "Retry-After" in r.headers
    finally:
        redis_server.start()
    assert backend.stored() == (0, 0)
    assert post_events(server, events).json()["accepted"] == 100
    assert post_events(server, events).json()["duplicates"] == 100


class Load:
    """Clients posting fresh 200-event batches until stopped; records every answer."""

    def __init__(self, server: MeterFlowServer, clients: int = 4, timeout: float = 120) -> None:
        self.server = server
        self.clients = clients
        self.ok: list[list[str]] = []  # ids of batches answered 200
        self.unanswered: list[list[dict[str, Any]]] = []
        self.running = True
        self.deadline = time.monotonic() + timeout
        self._seq = 0

    async def _client(self, n: int) -> None:
        async with httpx.AsyncClient(timeout=20) as c:
            while self.running and time.monotonic() < self.deadline:
                self._seq += 1
                events = samples.batch(200, seed=n * 100_000 + self._seq, prefix=f"load{n}")
                try:
                    r = await c.post(
                        f"{self.server.url}/v1/events", content=samples.body(events), headers={**JSON, **self.server.auth}
                    )
                except httpx.HTTPError:
                    self.unanswered.append(events)
                    await asyncio.sleep(0.05)  # a pause between retries against a server that is gone
                    continue
                if r.status_code == 200:
                    body = r.json()
                    assert body["failed"] == [] and body["accepted"] == 200, body
                    self.ok.append([e["transaction_id"] for e in events])
                else:
                    self.unanswered.append(events)

    async def run(self, batches: int, action: Callable[[], None]) -> None:
        """Once `batches` batches are acknowledged, `action` (stop, kill); then until every client saw it."""
        tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]
        try:
            await until(lambda: len(self.ok) >= batches, f"{batches} batches acknowledged under load", 60)
            await asyncio.to_thread(action)
            seen = len(self.unanswered)
            await until(lambda: len(self.unanswered) >= seen + self.clients, "the clients meeting the stopped server")
        finally:
            self.running = False
            await asyncio.gather(*tasks)


@pytest.mark.parametrize("kind", ["embedded", "full"])
async def test_sigterm_during_load_keeps_every_acknowledged_event(
    kind: str, make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer]
) -> None:
    backend = make_backend(kind)
    server = start_server(backend)
    load = Load(server)
    await load.run(10, lambda: server.stop(signal.SIGTERM))
    acked = {i for ids in load.ok for i in ids}
    assert len(acked) > 1000, "the load did not get going"
    stored = set(backend.stored_ids())
    assert acked <= stored
    n, distinct = backend.stored()
    assert n == distinct == len(stored)


@pytest.mark.parametrize("kind", ["embedded", "full"])
async def test_kill_9_then_retry_counts_every_event_once(
    kind: str, make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer]
) -> None:
    backend = make_backend(kind)
    server = start_server(backend, MF_FLUSH_TIMEOUT_S="2")
    load = Load(server)
    await load.run(10, server.kill)
    assert load.unanswered, "kill -9 left no batch unanswered"
    server2 = start_server(backend, MF_FLUSH_TIMEOUT_S="2")
    # After the flush timeout every unanswered batch is taken over (Redis) or
    # found stored (embedded): none stays in flight.
    deadline = time.monotonic() + 30
    pending = load.unanswered
    while pending and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        still = []
        for events in pending:
            r = post_events(server2, events)
            assert r.status_code == 200, r.text
            body = r.json()
            if body["failed"]:
                assert {f["reason"] for f in body["failed"]} == {"in_flight"}
                still.append(events)
            elif kind == "full":
                # Redis: ids of the dead flush are taken over and accepted.
                assert body["accepted"] + body["duplicates"] == len(events)
        pending = still
    assert not pending
    every = {e["transaction_id"] for events in load.unanswered for e in events}
    every |= {i for ids in load.ok for i in ids}
    server2.stop()
    n, distinct = backend.stored()
    assert distinct == len(every)
    assert n == distinct  # a re-inserted transaction collapses


def test_flush_queue_full_answers_503(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer]
) -> None:
    backend = make_backend("embedded")
    server = start_server(backend, MF_FLUSH_QUEUE_MAX_ROWS="100")
    r = post_events(server, samples.batch(101, seed=41))
    assert r.status_code == 503
    assert r.json()["error"] == "overloaded"
    assert post_events(server, samples.batch(100, seed=41)).json()["accepted"] == 100
    assert orjson.loads(httpx.get(f"{server.url}/ready").content)["flush_queue_rows"] == 0
