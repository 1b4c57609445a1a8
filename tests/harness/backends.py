"""The backends a MeterFlow server runs on in a test, their environments, and how a test reads back what
the server stored."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from meterflow.archive import DirectoryStore, S3Store, Store
from meterflow.config import Settings
from tests.harness.processes import ClickHouse, PostgreSQL, Redis, flush_redis

BACKENDS = ["embedded", "full"]


@dataclass
class Backend:
    """Where one MeterFlow server keeps its data, and how a test reads it back."""

    kind: str
    env: dict[str, str]
    clickhouse: ClickHouse | None
    data_dir: Path | None

    @classmethod
    def embedded(cls, data: Path) -> Backend:
        """chdb under `data` and the in-process dedup index: no services."""
        return cls("embedded", {"MF_STORAGE": "chdb", "MF_DEDUP": "memory", "MF_DATA_DIR": str(data)}, None, data)

    @classmethod
    def full(cls, data: Path, clickhouse: ClickHouse, redis: Redis, postgres: PostgreSQL, database: str) -> Backend:
        """The full stack: a fresh ClickHouse `database`, an empty Redis, a new PostgreSQL database."""
        flush_redis(redis)
        clickhouse.reset_database(database)
        env = {
            "MF_DATA_DIR": str(data),
            "MF_STORAGE": "clickhouse",
            "MF_CLICKHOUSE_URL": clickhouse.url,
            "MF_CLICKHOUSE_DATABASE": database,
            "MF_DEDUP": "redis",
            "MF_REDIS_URL": redis.url,
            "MF_DATABASE_URL": postgres.new_database(),
        }
        return cls("full", env, clickhouse, None)

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
            url = f"{self.clickhouse.url}/?database={self.database}&output_format_json_quote_64bit_integers=0"
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


def archive_store(backend: Backend, env: dict[str, str]) -> Store:
    """The archive store a server on `backend` with `env` writes to: S3 (Garage) or the data dir's directory."""
    if env.get("MF_ARCHIVE") == "s3":
        return S3Store(Settings(archive="s3", s3_endpoint=env["MF_S3_ENDPOINT"], s3_bucket=env["MF_S3_BUCKET"],
                                s3_region=env["MF_S3_REGION"], s3_access_key=env["MF_S3_ACCESS_KEY"],
                                s3_secret_key=env["MF_S3_SECRET_KEY"]))  # fmt: skip
    return DirectoryStore(Path(backend.env["MF_DATA_DIR"]) / "archive")
