"""Fixtures: MeterFlow servers per test on each backend, what they stored, and records databases."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from meterflow.config import Settings
from meterflow.records import Records, open_records
from meterflow.runtime import started
from meterflow.storage import Storage, open_storage
from meterflow.storage.base import SCHEMA
from meterflow.storage.embedded import EmbeddedStorage
from tests.harness.backends import BACKENDS, Backend
from tests.harness.meterflow import ASYNC, MeterFlowServer, MeterFlowWorker, Starter, starting
from tests.harness.processes import ClickHouse, PostgreSQL, Redis

_db_seq = itertools.count(1)
_seq = itertools.count(1)


@pytest.fixture
def make_backend(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Callable[[str], Backend]:
    def make(kind: str) -> Backend:
        if kind == "embedded":
            return Backend.embedded(tmp_path / f"data{next(_db_seq)}")
        ch: ClickHouse = request.getfixturevalue("clickhouse")
        redis: Redis = request.getfixturevalue("redis_server")
        pg: PostgreSQL = request.getfixturevalue("postgres")
        db = f"mf_test_{next(_db_seq)}"
        return Backend.full(tmp_path / f"data{next(_db_seq)}", ch, redis, pg, db)

    return make


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, make_backend: Callable[[str], Backend]) -> Backend:
    return make_backend(request.param)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Starter[MeterFlowServer]]:
    """`meterflow serve` processes on a backend; stopped (SIGTERM) at the end."""
    with starting(MeterFlowServer, tmp_path) as start:
        yield start


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Starter[MeterFlowWorker]]:
    """`meterflow worker` processes on a backend, in async mode; stopped (SIGTERM) at the end."""
    with starting(MeterFlowWorker, tmp_path, ASYNC) as start:
        yield start


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
