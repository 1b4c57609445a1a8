"""chdb: the ClickHouse engine in-process, data under `data_dir` (the zero-setup default)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from meterflow.config import Settings, private_dir
from meterflow.storage.base import ROW_COLUMNS, SCHEMA, QueryLimits, StorageError, limit_error


class EmbeddedStorage:
    name = "chdb"

    def __init__(self, settings: Settings) -> None:
        self._path = Path(settings.data_dir) / "chdb"
        self._session: Any = None
        self._reads: Any = None
        # A chdb session runs one statement at a time (it holds a lock for the
        # whole query), but two sessions on one path run side by side. Inserts,
        # DDL and small lookups keep one session and thread; bounded usage reads
        # get their own, so an expensive read never holds an insert behind it.
        # chdb releases the GIL in queries; the threads keep the event loop free.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chdb")
        self._read_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chdb-read")

    async def _run(self, fn: Any, *args: Any, pool: ThreadPoolExecutor | None = None) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(pool or self._pool, fn, *args)
        except StorageError:
            raise
        except Exception as e:  # chdb raises RuntimeError with ClickHouse's text
            if (limited := limit_error(str(e))) is not None:
                raise limited from e
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
        self._reads = await self._run(session.Session, str(self._path), pool=self._read_pool)

    async def close(self) -> None:
        if self._reads is not None:
            await self._run(self._reads.close, pool=self._read_pool)
            self._reads = None
        if self._session is not None:
            await self._run(self._session.close)
            self._session = None
        self._read_pool.shutdown(wait=True)
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

    async def query(self, sql: str, limits: QueryLimits | None = None) -> list[dict[str, Any]]:
        settings = {"output_format_json_quote_64bit_integers": "0"}
        if limits is None:
            session, pool = self._session, self._pool
        else:
            limits.check_size(sql)
            # max_query_size is checked above: in a SETTINGS clause it comes after the parse.
            settings |= {k: v for k, v in limits.settings().items() if k != "max_query_size"}
            session, pool = self._reads, self._read_pool
        sql += " SETTINGS " + ", ".join(f"{k} = {v if v.isdigit() else repr(v)}" for k, v in settings.items())
        res = await self._run(session.query, sql, "JSONEachRow", pool=pool)
        return [orjson.loads(line) for line in res.bytes().splitlines() if line]
