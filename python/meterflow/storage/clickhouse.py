"""ClickHouse server over HTTP: aiochclient for statements, raw RowBinary for inserts."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
from aiochclient import ChClient
from aiochclient.exceptions import ChClientError

from meterflow.config import Settings
from meterflow.storage.base import ROW_COLUMNS, SCHEMA, StorageError


class ClickHouseStorage:
    name = "clickhouse"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._client: ChClient | None = None

    @property
    def client(self) -> ChClient:
        if self._client is None:
            raise StorageError("ClickHouse storage is not started.")
        return self._client

    async def start(self) -> None:
        s = self._settings
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=30, connect=3),
            connector=aiohttp.TCPConnector(limit=32),
        )
        self._client = ChClient(
            self._session,
            url=s.clickhouse_url,
            user=s.clickhouse_user,
            password=s.clickhouse_password or None,
            database=s.clickhouse_database,
        )
        for ddl in SCHEMA:
            await self.execute(ddl)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def execute(self, sql: str) -> None:
        try:
            await self.client.execute(sql)
        except (ChClientError, aiohttp.ClientError, OSError, TimeoutError) as e:
            raise StorageError(f"ClickHouse: {str(e).strip().splitlines()[0][:300]}") from e

    async def ping(self) -> None:
        try:
            ok = await self.client.is_alive()
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise StorageError(f"ClickHouse: {e}") from e
        if not ok:
            raise StorageError(f"ClickHouse at {self._settings.clickhouse_url} does not answer.")

    async def insert_events(self, rows: bytes) -> None:
        # RowBinary straight from the Rust core; aiochclient would re-encode
        # every row in Python, so the bytes go through its HTTP session.
        await self._post(f"INSERT INTO events ({ROW_COLUMNS}) FORMAT RowBinary", rows)

    async def query(self, sql: str) -> list[dict[str, Any]]:
        body = await self._post(sql + " FORMAT JSONEachRow", None)
        return [orjson.loads(line) for line in body.splitlines() if line]

    async def _post(self, query: str, data: bytes | None) -> bytes:
        assert self._session is not None
        s = self._settings
        params = {
            "query": query,
            "database": s.clickhouse_database,
            "output_format_json_quote_64bit_integers": "0",
            "user": s.clickhouse_user,
        }
        if s.clickhouse_password:
            params["password"] = s.clickhouse_password
        try:
            async with self._session.post(s.clickhouse_url, params=params, data=data or b"") as resp:
                body = await resp.read()
                if resp.status != 200:
                    first = body.decode(errors="replace").strip().splitlines()[:1]
                    raise StorageError(f"ClickHouse answered {resp.status}: {first[0][:300] if first else ''}")
                return body
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise StorageError(f"ClickHouse at {s.clickhouse_url} is unreachable: {e}") from e
