"""/metrics sums every worker's counters (prometheus_client's multiprocess mode): each scrape reads the same totals."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Callable

import httpx
import orjson

from meterflow import samples
from tests.harness.backends import Backend
from tests.harness.http import JSON
from tests.harness.meterflow import MeterFlowServer

REQUESTS = 1000
CONNECTIONS = 8
SCRAPES = 10


def metric(text: str, name: str) -> float | None:
    found = re.findall(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found[0]) if found else None


async def pid_of(client: httpx.AsyncClient) -> int:
    """The worker behind the client's one keep-alive connection."""
    pid = (await client.get("/health")).json()["pid"]
    assert isinstance(pid, int)
    return pid


async def pinned_clients(server: MeterFlowServer) -> list[tuple[httpx.AsyncClient, int]]:
    """CONNECTIONS clients of one connection each, between them on both workers."""
    clients: list[tuple[httpx.AsyncClient, int]] = []
    deadline = time.monotonic() + 60
    while len(clients) < CONNECTIONS or len({pid for _, pid in clients}) < 2:
        assert time.monotonic() < deadline, f"every connection went to one worker: {[p for _, p in clients]}"
        c = httpx.AsyncClient(base_url=server.url, headers=server.auth, timeout=60,
                              limits=httpx.Limits(max_connections=1))  # fmt: skip
        clients.append((c, await pid_of(c)))
    return clients


async def test_every_scrape_of_two_workers_reads_the_totals_of_both(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer]
) -> None:
    server = start_server(make_backend("full"), MF_WORKERS="2", MF_RATE_REQUESTS_PER_S="100000",
                          MF_RATE_REQUESTS_BURST="100000")  # fmt: skip
    clients = await pinned_clients(server)
    try:
        events = samples.batch(REQUESTS, seed=22, prefix="mp")
        served: Counter[int] = Counter()

        async def send(client: httpx.AsyncClient, pid: int, share: list[dict[str, object]]) -> None:
            for e in share:
                r = await client.post("/v1/events", content=orjson.dumps({"events": [e]}), headers=JSON)
                assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
                served[pid] += 1

        n = len(clients)
        await asyncio.gather(*(send(c, pid, events[k::n]) for k, (c, pid) in enumerate(clients)))
        # Each connection stayed on its worker, so both workers served a good share of the requests.
        assert [await pid_of(c) for c, _ in clients] == [pid for _, pid in clients]
        assert len(served) == 2 and min(served.values()) >= REQUESTS // n, served

        # Scrapes alternate between the workers: each answers with the totals of both.
        by_worker = {pid: c for c, pid in clients}
        for i in range(SCRAPES):
            client = list(by_worker.values())[i % 2]
            text = (await client.get("/metrics")).text
            read = {name: metric(text, name) for name in
                    ("meterflow_events_received_total", "meterflow_events_accepted_total")}  # fmt: skip
            read["requests 200"] = metric(text, 'meterflow_requests_total{status="200"}')
            assert read == {"meterflow_events_received_total": REQUESTS, "meterflow_events_accepted_total": REQUESTS,
                            "requests 200": REQUESTS}, f"scrape {i} by worker {list(by_worker)[i % 2]}"  # fmt: skip
            assert "# HELP meterflow_events_accepted_total Events stored for the first time." in text
    finally:
        for c, _ in clients:
            await c.aclose()
