"""Ingest latency under expensive reads: one tenant posts small batches one after another
while others run heavy usage queries; prints the ingest p50/p99 without and with the reads.

    python loadtest/read_pressure.py --url http://127.0.0.1:3000 --key $KEY --seed-events 100000 --readers 3

The reads are legal ones (a MINUTE series over days, grouped by three properties, of a
customer with many events), so the same script measures any version of the server.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time

import aiohttp
import orjson

from meterflow import samples

DAY = 86_400_000


async def seed(session: aiohttp.ClientSession, url: str, headers: dict[str, str], n: int, now: int) -> None:
    """n events of customer `heavy_reads`, spread over the last six days."""
    sent = 0
    while sent < n:
        events = samples.batch(1000, seed=sent, prefix=f"seed{secrets.token_hex(3)}", ts=now)
        for i, e in enumerate(events):
            e["customer_id"] = "heavy_reads"
            e["timestamp"] = now - 6 * DAY + ((sent + i) * 7919) % (6 * DAY - 60_000)
        async with session.post(f"{url}/v1/events", data=orjson.dumps({"events": events}), headers=headers) as r:
            body = await r.read()
            if r.status != 200:
                sys.exit(f"seeding failed: {r.status} {body[:200]!r}")
        sent += len(events)


async def ingest_latencies(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                           seconds: float) -> list[float]:  # fmt: skip
    out: list[float] = []
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        events = samples.batch(10, seed=n, prefix=f"p{secrets.token_hex(4)}")
        for e in events:
            e["customer_id"] = "other_tenant"
        t0 = time.perf_counter()
        async with session.post(f"{url}/v1/events", data=orjson.dumps({"events": events}), headers=headers) as r:
            await r.read()
            if r.status != 200:
                sys.exit(f"ingest failed: {r.status}")
        out.append(time.perf_counter() - t0)
        n += 1
    return out


async def reader(session: aiohttp.ClientSession, url: str, headers: dict[str, str], now: int,
                 stop: asyncio.Event, statuses: dict[int, int]) -> None:  # fmt: skip
    params = {"customer_id": "heavy_reads", "meter": "api_calls", "start": str(now - 6 * DAY),
              "end": str(now), "window": "MINUTE", "group_by": "endpoint,method,region"}  # fmt: skip
    while not stop.is_set():
        async with session.get(f"{url}/v1/usage", params=params, headers=headers) as r:
            await r.read()
            statuses[r.status] = statuses.get(r.status, 0) + 1


def summary(lat: list[float]) -> str:
    q = statistics.quantiles(lat, n=100)
    return f"n={len(lat)} p50={q[49] * 1000:.0f} ms p99={q[98] * 1000:.0f} ms max={max(lat) * 1000:.0f} ms"


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:3000")
    p.add_argument("--key", required=True)
    p.add_argument("--seed-events", type=int, default=100_000)
    p.add_argument("--readers", type=int, default=3)
    p.add_argument("--seconds", type=float, default=20)
    a = p.parse_args()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {a.key}"}
    now = samples.now_ms()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        await seed(session, a.url, headers, a.seed_events, now)
        print("ingest alone:      ", summary(await ingest_latencies(session, a.url, headers, a.seconds)))
        stop = asyncio.Event()
        statuses: dict[int, int] = {}
        readers = [asyncio.create_task(reader(session, a.url, headers, now, stop, statuses)) for _ in range(a.readers)]
        await asyncio.sleep(1)  # let the reads start before timing ingestion
        lat = await ingest_latencies(session, a.url, headers, a.seconds)
        stop.set()
        await asyncio.gather(*readers)
        print(f"ingest with {a.readers} readers:", summary(lat), f"(read statuses {statuses})")


if __name__ == "__main__":
    asyncio.run(main())
