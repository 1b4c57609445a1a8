"""Throughput driver: posts batches for a fixed time and reports acknowledged events/s
and the p50/p99 latency of acknowledgements.

    python loadtest/drive.py --url http://127.0.0.1:3000 --key $KEY --batch-size 1000 --concurrency 8 --seconds 10

Closed loop by default (each connection sends its next request when the last one is
answered: the saturation rate). With `--rate R` it is open loop: request i is due at
start + i/R whatever the answers, and its latency counts from when it was due, so a
slow server shows in the latency rather than in a slower client (no coordinated
omission). `--acks FILE` writes the request numbers whose every event was accepted:
request k carries the transaction ids `<run>_<k:010d>_<i:04d>`, which is how the load
test checks storage afterwards.

Bodies are rendered once from a template and made unique by byte replacement,
so the client spends its CPU on sending, not on building JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import secrets
import statistics
import sys
import time
from typing import Any

import aiohttp
import orjson

from meterflow import samples


def template(batch_size: int, run: str) -> bytes:
    events = samples.batch(batch_size, seed=1)
    for i, e in enumerate(events):
        e["transaction_id"] = f"{run}_NNNNNNNNNN_{i:04d}"
    return orjson.dumps({"events": events})


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def drive(url: str, key: str, batch_size: int, concurrency: int, seconds: float,
                rate: float = 0, run: str = "") -> dict[str, Any]:  # fmt: skip
    run = run or "lt" + secrets.token_hex(4)
    tpl = template(batch_size, run)
    counter = iter(range(10**10))
    latencies: list[float] = []
    acked: list[int] = []
    accepted = errors = partial = 0
    statuses: dict[str, int] = {}
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    target = f"{url}/v1/events"
    cpu0 = cpu_seconds()
    t_start = time.monotonic()
    deadline = t_start + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal accepted, errors, partial
        while True:
            k = next(counter)
            due = t_start + k / rate if rate else time.monotonic()
            if due >= deadline:
                return
            if rate and (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            body = tpl.replace(b"NNNNNNNNNN", b"%010d" % k)
            async with session.post(target, data=body, headers=headers) as r:
                payload = await r.read()
            latencies.append(time.monotonic() - due)
            if r.status in (200, 202):  # 202: async mode, durably queued
                n = orjson.loads(payload)["accepted"]
                accepted += n
                if n == batch_size:
                    acked.append(k)
                else:
                    partial += 1
            else:
                errors += 1
                statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    elapsed = time.monotonic() - t_start
    lat = latencies or [0.0]
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0]] * 99
    return {
        "run": run, "batch_size": batch_size, "concurrency": concurrency, "rate": rate,
        "seconds": round(elapsed, 2), "requests": len(latencies), "errors": errors, "statuses": statuses,
        "partial": partial, "accepted": accepted, "events_per_s": round(accepted / elapsed),
        "p50_ms": round(q[49] * 1000, 2), "p99_ms": round(q[98] * 1000, 2),
        "cpu_s": round(cpu_seconds() - cpu0, 3), "acked": acked, "latencies": [round(x, 5) for x in latencies],
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
