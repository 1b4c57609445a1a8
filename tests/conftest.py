"""Fixtures: real redis-server and clickhouse-server once per session, MeterFlow
servers per test, and helpers that count what reached storage."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from services import ClickHouse, MeterFlowServer, Redis

BACKENDS = ["embedded", "full"]
_db_seq = itertools.count(1)


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


def flush_redis(redis: Redis) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", redis.port), 2) as s:
        s.sendall(b"FLUSHALL\r\n")
        assert s.recv(16).startswith(b"+OK")


@dataclass
class Backend:
    """Where one MeterFlow server keeps its data, and how a test reads it back."""

    kind: str
    env: dict[str, str]
    clickhouse: ClickHouse | None
    data_dir: Path | None

    @property
    def database(self) -> str:
        return self.env.get("MF_CLICKHOUSE_DATABASE", "default")

    def stored(self) -> tuple[int, int]:
        """(rows with FINAL, distinct transaction ids) in the events table.
        For chdb the server must be stopped: one process per data path."""
        sql = (
            "SELECT (SELECT count() FROM events FINAL) AS n, "
            "(SELECT uniqExact(transaction_id) FROM events) AS u"
        )
        return self._one(sql, ("n", "u"))

    def stored_ids(self) -> list[str]:
        rows = self.query_json("SELECT DISTINCT transaction_id AS id FROM events ORDER BY id")
        return [str(r["id"]) for r in rows]

    def raw_rows(self) -> int:
        return self._one("SELECT count() AS n FROM events", ("n",))[0]

    def _one(self, sql: str, cols: tuple[str, ...]) -> tuple[int, ...]:
        rows = self.query_json(sql)
        return tuple(int(rows[0][c]) for c in cols)

    def query_json(self, sql: str) -> list[dict[str, object]]:
        if self.clickhouse is not None:
            url = f"{self.clickhouse.url}/?database={self.database}"
            req = urllib.request.Request(url, data=(sql + " FORMAT JSONEachRow").encode(), method="POST")
            with urllib.request.urlopen(req, timeout=30) as r:
                return [json.loads(line) for line in r.read().splitlines() if line]
        assert self.data_dir is not None
        code = (
            "import sys, chdb.session as s; "
            "r = s.Session(sys.argv[1]).query(sys.argv[2], 'JSONEachRow'); "
            "sys.stdout.buffer.write(r.bytes())"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(self.data_dir / "chdb"), sql],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        return [json.loads(line) for line in out.stdout.splitlines() if line]


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
        flush_redis(redis)
        db = f"mf_test_{next(_db_seq)}"
        ch.reset_database(db)
        env = {
            "MF_STORAGE": "clickhouse",
            "MF_CLICKHOUSE_URL": ch.url,
            "MF_CLICKHOUSE_DATABASE": db,
            "MF_DEDUP": "redis",
            "MF_REDIS_URL": redis.url,
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
def server(backend: Backend, start_server: Callable[..., MeterFlowServer]) -> MeterFlowServer:
    return start_server(backend)
