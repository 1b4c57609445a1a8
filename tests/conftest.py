"""Fixtures: MeterFlow servers per test on each backend, what they stored, and records databases."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from services import ASYNC, Backend, ClickHouse, MeterFlowServer, MeterFlowWorker, PostgreSQL, Redis, flush_redis

from meterflow.config import Settings
from meterflow.records import Records, open_records
from meterflow.runtime import started
from meterflow.storage import Storage, open_storage
from meterflow.storage.base import SCHEMA
from meterflow.storage.embedded import EmbeddedStorage

BACKENDS = ["embedded", "full"]
_db_seq = itertools.count(1)
_seq = itertools.count(1)


@pytest.fixture
def make_backend(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Callable[[str], Backend]:
    def make(kind: str) -> Backend:
        if kind == "embedded":
            data = tmp_path / f"data{next(_db_seq)}"
            return Backend(kind, {"MF_STORAGE": "chdb", "MF_DEDUP": "memory", "MF_DATA_DIR": str(data)}, None, data)
        ch: ClickHouse = request.getfixturevalue("clickhouse")
        redis: Redis = request.getfixturevalue("redis_server")
        pg: PostgreSQL = request.getfixturevalue("postgres")
        flush_redis(redis)
        db = f"mf_test_{next(_db_seq)}"
        ch.reset_database(db)
        env = {
            "MF_DATA_DIR": str(tmp_path / f"data{next(_db_seq)}"),
            "MF_STORAGE": "clickhouse",
            "MF_CLICKHOUSE_URL": ch.url,
            "MF_CLICKHOUSE_DATABASE": db,
            "MF_DEDUP": "redis",
            "MF_REDIS_URL": redis.url,
            "MF_DATABASE_URL": pg.new_database(),
        }
        return Backend(kind, env, ch, None)

    return make


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, make_backend: Callable[[str], Backend]) -> Backend:
    return make_backend(request.param)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., MeterFlowServer]]:
    servers: list[MeterFlowServer] = []

    def start(backend: Backend, **env: str) -> MeterFlowServer:
        s = MeterFlowServer(tmp_path, {**backend.env, **env})
        s.start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., MeterFlowWorker]]:
    """`meterflow worker` processes on a backend, in async mode; stopped (SIGTERM) at the end."""
    workers: list[MeterFlowWorker] = []

    def start(backend: Backend, **env: str) -> MeterFlowWorker:
        w = MeterFlowWorker(tmp_path, {**backend.env, **ASYNC, **env})
        w.start()
        workers.append(w)
        return w

    yield start
    for w in workers:
        w.stop()


@pytest.fixture
def server(backend: Backend, start_server: Callable[..., MeterFlowServer]) -> MeterFlowServer:
    return start_server(backend)


@pytest.fixture(params=["chdb", "clickhouse"])
async def storage(request: pytest.FixtureRequest, chdb_storage: EmbeddedStorage) -> AsyncIterator[Storage]:
    if request.param == "chdb":
        await chdb_storage.execute("DROP TABLE IF EXISTS events")
        for ddl in SCHEMA:
            await chdb_storage.execute(ddl)
        yield chdb_storage
        return
    ch: ClickHouse = request.getfixturevalue("clickhouse")
    db = f"mf_storage_{next(_seq)}"
    ch.reset_database(db)
    s = open_storage(Settings(storage="clickhouse", clickhouse_url=ch.url, clickhouse_database=db))
    await s.start()
    yield s
    await s.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def records(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Records]:
    """A migrated, empty records database on each engine."""
    if request.param == "sqlite":
        settings = Settings(data_dir=str(tmp_path / "records"))
    else:
        pg: PostgreSQL = request.getfixturevalue("postgres")
        settings = Settings(database_url=pg.new_database())
    db = open_records(settings)
    async with started(db):
        yield db
