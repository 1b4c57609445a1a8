"""Memory per remembered event: Redis keys (INFO used_memory) and the in-process index (RSS).

    .venv/bin/python benches/memory.py [--redis-keys 200000] [--index-ids 1000000]

Redis: a fresh redis-server on a free loopback port, the used_memory delta
after N reservations with their TTL, in the format MeterFlow writes today
(`dedup:<22-character key>` = `<flush id>|<fingerprint>`) and, for
comparison, in the format of the first release (`dedup:<20-character id>` =
`<flush id>`). Index: the process's RSS delta after loading N events with
255-character ids into a `DedupIndex`.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import socket
import subprocess
import tempfile
import time

import orjson
import redis

from meterflow.kernel.flush_ids import new_flush_id
from meterflow.kernel.rust import STORED_LIMITS, DedupIndex, decode_batch

WINDOW = 31 * 86_400
NOW = time.time_ns() // 1_000_000


def batch_of(start: int, n: int, id_len: int) -> bytes:
    events = [
        {"transaction_id": f"{i:0{id_len}d}", "customer_id": f"cust_{i % 1000:05d}", "event_type": "api_request",
         "timestamp": NOW, "properties": {"bytes": i}}
        for i in range(start, start + n)
    ]  # fmt: skip
    return orjson.dumps({"events": events})


def redis_bytes_per_key(keys: int) -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp()
    server = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", tmp],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    r = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            r.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    out = {}
    try:
        for name in ("first release", "per customer + fingerprint"):
            r.flushall()
            before = int(r.info("memory")["used_memory"])
            flush = new_flush_id()
            for start in range(0, keys, 1000):
                b = decode_batch(batch_of(start, 1000, 20), NOW, STORED_LIMITS)
                p = r.pipeline(transaction=False)
                for i in range(len(b)):
                    if name == "first release":
                        p.set("dedup:" + b.transaction_id(i), flush, nx=True, ex=WINDOW)
                    else:
                        p.set("dedup:" + b.key(i), f"{flush}|{b.fingerprint(i)}", nx=True, ex=WINDOW)
                p.execute()
            out[name] = (int(r.info("memory")["used_memory"]) - before) / keys
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def index_bytes_per_id(ids: int) -> float:
    ix = DedupIndex()
    gc.collect()
    before = rss()
    for start in range(0, ids, 1000):
        ix.load(decode_batch(batch_of(start, 1000, 255), NOW, STORED_LIMITS), 1)
    gc.collect()
    assert len(ix) == ids
    return (rss() - before) / ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis-keys", type=int, default=200_000)
    ap.add_argument("--index-ids", type=int, default=1_000_000)
    args = ap.parse_args()
    per_id = index_bytes_per_id(args.index_ids)
    print(f"in-process index: {per_id:.1f} bytes per id ({args.index_ids:,} ids of 255 characters)")
    for name, b in redis_bytes_per_key(args.redis_keys).items():
        print(f"redis, {name}: {b:.1f} bytes per key ({args.redis_keys:,} keys with TTL)")


if __name__ == "__main__":
    main()
