"""Real services shared by the tests and the benches: redis-server and
clickhouse-server, started once per session on loopback ports."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "tests"))

from services import ClickHouse, Redis  # noqa: E402


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
def clickhouse(workdir: Path) -> Iterator[ClickHouse]:
    ch = ClickHouse(workdir)
    ch.start()
    yield ch
    ch.stop()
