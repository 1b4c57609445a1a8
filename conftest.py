"""Real services shared by the tests and the benches: redis-server,
clickhouse-server and PostgreSQL, started once per session on loopback ports."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "tests"))

from services import ClickHouse, Garage, PostgreSQL, Redis

from meterflow.config import Settings
from meterflow.storage.embedded import EmbeddedStorage


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def redis_server(workdir: Path) -> Iterator[Redis]:
    r = Redis(workdir)
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="session")
def garage(workdir: Path) -> Iterator[Garage]:
    g = Garage(workdir)
    g.start()
    yield g
    g.stop()


@pytest.fixture(scope="session")
def clickhouse(workdir: Path) -> Iterator[ClickHouse]:
    ch = ClickHouse(workdir)
    ch.start()
    yield ch
    ch.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgreSQL]:
    pg = PostgreSQL()
    pg.start()
    yield pg
    pg.cleanup()


@pytest.fixture(scope="session")
async def chdb_storage(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedStorage]:
    # chdb admits one data path per process: the whole session shares one.
    path: Path = tmp_path_factory.mktemp("chdb")
    s = EmbeddedStorage(Settings(data_dir=str(path)))
    await s.start()
    yield s
    await s.close()
