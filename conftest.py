"""Real services shared by the tests and the benches: redis-server, clickhouse-server, PostgreSQL and Garage,
started once per session on loopback ports (the harness in tests/harness/)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from meterflow.config import Settings
from meterflow.storage.embedded import EmbeddedStorage
from tests.harness.processes import ClickHouse, Garage, PostgreSQL, Redis, running


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def redis_server(workdir: Path) -> Iterator[Redis]:
    with running(Redis(workdir)) as r:
        yield r


@pytest.fixture(scope="session")
def garage(workdir: Path) -> Iterator[Garage]:
    with running(Garage(workdir)) as g:
        yield g


@pytest.fixture(scope="session")
def clickhouse(workdir: Path) -> Iterator[ClickHouse]:
    with running(ClickHouse(workdir)) as ch:
        yield ch


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgreSQL]:
    with running(PostgreSQL()) as pg:
        yield pg


@pytest.fixture(scope="session")
async def chdb_storage(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedStorage]:
    # chdb admits one data path per process: the whole session shares one.
    path: Path = tmp_path_factory.mktemp("chdb")
    s = EmbeddedStorage(Settings(data_dir=str(path)))
    await s.start()
    yield s
    await s.close()
