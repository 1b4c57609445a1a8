"""The naive ingest architecture, the load test's baseline: per request, one `SET NX`
per event (redis-py), one JSONEachRow insert into ClickHouse and one S3 put; no group
commit, no Rust core, no spool.

    python loadtest/naive.py --port 3100 --workers 2 --redis redis://127.0.0.1:6379/0 \\
        --clickhouse http://127.0.0.1:8123 --database naive --s3-endpoint http://127.0.0.1:3900 ...

It answers `POST /v1/events` like MeterFlow ({"accepted", "duplicates", "failed"}), so
the same driver measures both. Each worker is a process on the same port (SO_REUSEPORT).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import multiprocessing
import os
import signal
import uuid
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
from aiohttp import web

TABLE_DDL = """CREATE TABLE IF NOT EXISTS naive_events (
    transaction_id String, customer_id String, event_type String, timestamp Int64, properties String
) ENGINE = MergeTree() ORDER BY (customer_id, transaction_id)"""
WINDOW_S = 7 * 86400


class Naive:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.redis: aioredis.Redis = aioredis.from_url(a.redis)
        self.http: aiohttp.ClientSession | None = None
        self.s3: Any = None
        self._stack: Any = None

    async def start(self, _app: web.Application) -> None:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512))
        cfg = AioConfig(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                        response_checksum_validation="when_required", max_pool_connections=256)  # fmt: skip
        self._stack = get_session().create_client(
            "s3", endpoint_url=self.a.s3_endpoint, region_name=self.a.s3_region, config=cfg,
            aws_access_key_id=self.a.s3_access_key, aws_secret_access_key=self.a.s3_secret_key,
        )  # fmt: skip
        self.s3 = await self._stack.__aenter__()

    async def stop(self, _app: web.Application) -> None:
        if self.http is not None:
            await self.http.close()
        await self._stack.__aexit__(None, None, None)
        await self.redis.aclose()

    async def post_events(self, request: web.Request) -> web.Response:
        events = orjson.loads(await request.read())["events"]
        pipe = self.redis.pipeline(transaction=False)
        for e in events:
            pipe.set(f"naive:{e['customer_id']}:{e['transaction_id']}", b"1", nx=True, ex=WINDOW_S)
        fresh = [e for e, ok in zip(events, await pipe.execute(), strict=True) if ok]
        if fresh:
            lines = b"".join(
                orjson.dumps({**e, "properties": orjson.dumps(e.get("properties", {})).decode()}) + b"\n"
                for e in fresh
            )
            assert self.http is not None
            params = {"database": self.a.database, "query": "INSERT INTO naive_events FORMAT JSONEachRow"}
            async with self.http.post(self.a.clickhouse, params=params, data=lines) as r:
                if r.status != 200:
                    return web.json_response({"error": "storage_unavailable", "message": await r.text()}, status=503)
            await self.s3.put_object(Bucket=self.a.s3_bucket, Key=f"naive/{uuid.uuid4().hex}.ndjson.gz",
                                     Body=gzip.compress(lines, compresslevel=3))  # fmt: skip
        body = {"accepted": len(fresh), "duplicates": len(events) - len(fresh), "failed": []}
        return web.Response(body=orjson.dumps(body), content_type="application/json")


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def serve(a: argparse.Namespace) -> None:
    naive = Naive(a)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/events", naive.post_events)
    app.router.add_get("/health", health)
    app.on_startup.append(naive.start)
    app.on_cleanup.append(naive.stop)
    web.run_app(app, host="127.0.0.1", port=a.port, reuse_port=True, print=None, access_log=None)


async def prepare(a: argparse.Namespace) -> None:
    """The table and the bucket, once, before the workers start."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    async with aiohttp.ClientSession() as http:
        for sql in (f"CREATE DATABASE IF NOT EXISTS {a.database}", TABLE_DDL):
            async with http.post(a.clickhouse, params={"database": "default" if "DATABASE" in sql else a.database},
                                 data=sql.encode()) as r:  # fmt: skip
                if r.status != 200:
                    raise SystemExit(f"ClickHouse: {await r.text()}")
    cfg = AioConfig(s3={"addressing_style": "path"})
    async with get_session().create_client(
        "s3", endpoint_url=a.s3_endpoint, region_name=a.s3_region, config=cfg,
        aws_access_key_id=a.s3_access_key, aws_secret_access_key=a.s3_secret_key,
    ) as s3:  # fmt: skip
        try:
            await s3.head_bucket(Bucket=a.s3_bucket)
        except Exception:
            await s3.create_bucket(Bucket=a.s3_bucket)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=3100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--redis", required=True)
    p.add_argument("--clickhouse", required=True)
    p.add_argument("--database", default="naive")
    p.add_argument("--s3-endpoint", required=True)
    p.add_argument("--s3-region", default="garage")
    p.add_argument("--s3-bucket", default="naive")
    p.add_argument("--s3-access-key", required=True)
    p.add_argument("--s3-secret-key", required=True)
    a = p.parse_args()
    asyncio.run(prepare(a))
    procs = [multiprocessing.Process(target=serve, args=(a,)) for _ in range(a.workers)]
    for proc in procs:
        proc.start()

    def stop(_sig: int, _frame: object) -> None:
        for proc in procs:
            if proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for proc in procs:
        proc.join()


if __name__ == "__main__":
    main()
