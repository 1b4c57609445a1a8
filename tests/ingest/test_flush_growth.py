"""Under load a flush grows past MF_FLUSH_MAX_ROWS while an insert is in flight: fewer, larger inserts."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import httpx
import orjson

from meterflow import samples
from tests.harness.backends import Backend
from tests.harness.http import JSON
from tests.harness.meterflow import MeterFlowServer

REQUESTS = 40
EVENTS = 10


def metric(text: str, name: str) -> float:
    found = re.findall(rf"^{name} (\S+)$", text, re.M)
    return float(found[0]) if found else 0.0


async def test_concurrent_requests_share_inserts_past_the_row_limit(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer]
) -> None:
    backend = make_backend("embedded")
    # A flush is due at 10 rows: without growth every 10-event request would be its own insert.
    server = start_server(backend, MF_FLUSH_MAX_ROWS="10", MF_FLUSH_MAX_WAIT_MS="50", MF_FLUSH_CONCURRENCY="1")
    headers = {**server.auth, **JSON}
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=REQUESTS)) as client:
        bodies = [orjson.dumps({"events": samples.batch(EVENTS, seed=k, prefix="grow")}) for k in range(REQUESTS)]
        answers = await asyncio.gather(*(client.post(f"{server.url}/v1/events", content=b, headers=headers)
                                         for b in bodies))  # fmt: skip
        assert [a.status_code for a in answers] == [200] * REQUESTS
        assert sum(a.json()["accepted"] for a in answers) == REQUESTS * EVENTS
        text = (await client.get(f"{server.url}/metrics", headers=server.auth)).text
    assert metric(text, "meterflow_flushed_rows_total") == REQUESTS * EVENTS
    assert metric(text, "meterflow_flushes_total") <= REQUESTS / 2
    server.stop()
    assert backend.stored() == (REQUESTS * EVENTS, REQUESTS * EVENTS)
