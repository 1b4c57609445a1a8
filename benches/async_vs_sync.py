"""Async against sync ingestion on the same full stack, in one run (issue 14).

    .venv/bin/python -m benches.async_vs_sync [--seconds 8]

Starts its own redis-server (AOF, appendfsync always), clickhouse-server and
PostgreSQL as the tests do, then for each mode one `meterflow serve` (one
worker process) and `loadtest/drive.py`'s client: acknowledged events/s at
batch 1 (256 connections) and batch 1000 (8 connections). In async mode no
`meterflow worker` runs while the client acknowledges; then two start and
their drain rate is the queued events over the time from both reading the
stream to an empty stream.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from loadtest.drive import drive
from tests.harness.backends import Backend
from tests.harness.meterflow import ASYNC, MeterFlowServer, MeterFlowWorker
from tests.harness.processes import ClickHouse, PostgreSQL, Redis, running, wait_for

OPEN = {"MF_RATE_REQUESTS_PER_S": "10000000", "MF_RATE_REQUESTS_BURST": "10000000",
        "MF_RATE_EVENTS_PER_S": "100000000", "MF_RATE_EVENTS_BURST": "100000000",
        "MF_STREAM_MAX_ENTRIES": "10000000", "MF_LOG_LEVEL": "warning", "MF_ARCHIVE": "none"}  # fmt: skip


def stream_length(server: MeterFlowServer) -> int:
    r = httpx.get(f"{server.url}/v1/events/lag", headers=server.auth, timeout=10)
    return int(r.json()["stream_length"])


async def main(seconds: float) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="mf-async-bench-"))
    key = MeterFlowServer.auth["Authorization"].split()[1]
    out: dict[str, object] = {}
    with ExitStack() as services:
        redis, ch, pg = (services.enter_context(running(s)) for s in (Redis(work), ClickHouse(work), PostgreSQL()))
        for mode in ("sync", "async"):
            backend = Backend.full(work / f"data_{mode}", ch, redis, pg, f"bench_{mode}")
            env = {**backend.env, **OPEN, **(ASYNC if mode == "async" else {})}
            server = MeterFlowServer(work, env)
            server.start()
            try:
                b1 = await drive(server.url, key, 1, 256, seconds)
                b1000 = await drive(server.url, key, 1000, 8, seconds)
                out[mode] = {"batch_1_events_per_s": b1["events_per_s"], "batch_1_p99_ms": b1["p99_ms"],
                             "batch_1000_events_per_s": b1000["events_per_s"],
                             "batch_1000_p99_ms": b1000["p99_ms"], "errors": b1["errors"] + b1000["errors"]}  # fmt: skip
                if mode == "async":
                    queued = int(b1["events_per_s"] * b1["seconds"] + b1000["events_per_s"] * b1000["seconds"])
                    workers = [MeterFlowWorker(work, {**env, "MF_LOG_LEVEL": "info"}) for _ in range(2)]
                    for w in workers:
                        w.proc.start()  # both processes start importing at once
                    for w in workers:
                        wait_for(lambda w=w: "reading the event stream" in w.logs(), "meterflow worker")
                    # From the moment both read the stream (a little may already be committed: a floor).
                    t0 = time.monotonic()
                    wait_for(lambda s=server: stream_length(s) == 0, "the workers draining the stream", 600)
                    elapsed = time.monotonic() - t0
                    for w in workers:
                        w.stop()
                    out["async"]["worker_drain_events_per_s"] = round(queued / elapsed)  # type: ignore[index]
            finally:
                server.stop()
    sync, asyn = out["sync"], out["async"]
    out["async_over_sync_batch_1"] = round(asyn["batch_1_events_per_s"] / sync["batch_1_events_per_s"], 2)  # type: ignore[index]
    out["drain_over_sync_batch_1000"] = round(
        asyn["worker_drain_events_per_s"] / sync["batch_1000_events_per_s"], 2  # type: ignore[index]
    )
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=8)
    a = p.parse_args()
    print(json.dumps(asyncio.run(main(a.seconds)), indent=2))
