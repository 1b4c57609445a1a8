"""chdb: the ClickHouse engine in-process, data under `data_dir` (the zero-setup default)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from meterflow.config import Settings, private_dir
from meterflow.storage.base import ROW_COLUMNS, SCHEMA, StorageError


class EmbeddedStorage:
    name = "chdb"

    def __init__(self, settings: Settings) -> None:
        self._path = Path(settings.data_dir) / "chdb"
        self._session: Any = None
        # chdb releases the GIL in queries; one thread keeps the session's use
        # serial, off the event loop.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chdb")

    async def _run(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except StorageError:
            raise
        except Exception as e:  # chdb raises RuntimeError with ClickHouse's text
            raise StorageError(f"chdb: {str(e).strip().splitlines()[0][:300]}") from e

    async def start(self) -> None:
        from chdb import session

        private_dir(self._path.parent)  # the data directory
        self._path.mkdir(parents=True, exist_ok=True)
        try:
            self._session = await self._run(session.Session, str(self._path))
        except StorageError as e:
            raise StorageError(f"cannot open {self._path} (is another MeterFlow using it?): {e}") from e
        for ddl in SCHEMA:
            await self._run(self._session.query, ddl)

    async def close(self) -> None:
        if self._session is not None:
            await self._run(self._session.close)
            self._session = None
        self._pool.shutdown(wait=True)

    async def ping(self) -> None:
        if self._session is None:
            raise StorageError("chdb is not open.")
        await self._run(self._session.query, "SELECT 1")

    def _insert(self, rows: bytes) -> None:
        with self._session.send_insert(f"INSERT INTO events ({ROW_COLUMNS})", "RowBinary") as ins:
            ins.append(rows)
            ins.finish()

    async def insert_events(self, rows: bytes) -> None:
        await self._run(self._insert, rows)

    async def execute(self, sql: str) -> None:
        await self._run(self._session.query, sql)

    async def query(self, sql: str) -> list[dict[str, Any]]:
        sql += " SETTINGS output_format_json_quote_64bit_integers = 0"
        res = await self._run(self._session.query, sql, "JSONEachRow")
        return [orjson.loads(line) for line in res.bytes().splitlines() if line]
