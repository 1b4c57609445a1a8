"""Throughput driver: posts batches at a fixed concurrency for a while, then reports
accepted events/s and the p50/p99 latency of acknowledgements.

    python loadtest/drive.py --url http://127.0.0.1:3000 --key $KEY --batch-size 1000 --concurrency 8 --seconds 10

Bodies are rendered once from a template and made unique by byte replacement,
so the client spends its CPU on sending, not on building JSON.
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


def template(batch_size: int, run: str) -> bytes:
    events = samples.batch(batch_size, seed=1)
    for i, e in enumerate(events):
        e["transaction_id"] = f"{run}_NNNNNNNNNN_{i:04d}"
    return orjson.dumps({"events": events})


async def drive(url: str, key: str, batch_size: int, concurrency: int, seconds: float) -> dict[str, float]:
    run = "lt" + secrets.token_hex(4)
    tpl = template(batch_size, run)
    counter = iter(range(10**10))
    latencies: list[float] = []
    accepted = errors = 0
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    deadline = time.monotonic() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal accepted, errors
        while time.monotonic() < deadline:
            body = tpl.replace(b"NNNNNNNNNN", b"%010d" % next(counter))
            t0 = time.perf_counter()
            async with session.post(f"{url}/v1/events", data=body, headers=headers) as r:
                payload = await r.read()
            latencies.append(time.perf_counter() - t0)
            if r.status in (200, 202):  # 202: async mode, durably queued
                accepted += orjson.loads(payload)["accepted"]
            else:
                errors += 1

    t_start = time.monotonic()
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    elapsed = time.monotonic() - t_start
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0]] * 99
    return {
        "batch_size": batch_size, "concurrency": concurrency, "seconds": round(elapsed, 2),
        "requests": len(latencies), "errors": errors, "events_per_s": round(accepted / elapsed),
        "p50_ms": round(q[49] * 1000, 2), "p99_ms": round(q[98] * 1000, 2),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:3000")
    p.add_argument("--key", required=True, help="an API key with the ingest scope")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10)
    a = p.parse_args()
    result = asyncio.run(drive(a.url, a.key, a.batch_size, a.concurrency, a.seconds))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
