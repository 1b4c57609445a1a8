"""ClickHouse server over HTTP: aiochclient for statements, raw RowBinary for inserts.

Statements travel in the POST body (no URL length limit) and credentials in
the `X-ClickHouse-User`/`X-ClickHouse-Key` headers, never in a URL a log could
record. Bounded reads (`QueryLimits`) use their own connection pool, so a
burst of expensive usage queries never takes the connections inserts need.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
from aiochclient import ChClient
from aiochclient.exceptions import ChClientError

from meterflow.config import Settings
from meterflow.storage.base import ROW_COLUMNS, SCHEMA, QueryLimits, StorageError, limit_error


class ClickHouseStorage:
    name = "clickhouse"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._reads: aiohttp.ClientSession | None = None
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
        self._reads = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=s.usage_max_execution_s + 5, connect=3),
            connector=aiohttp.TCPConnector(limit=s.usage_max_concurrent_queries),
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
        for session in (self._session, self._reads):
            if session is not None:
                await session.close()
        self._session = self._reads = None

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
        # every row in Python, so the bytes go through its HTTP session. The
        # statement is short and fixed, so it may ride in the URL; the body is data.
        await self._post(f"INSERT INTO events ({ROW_COLUMNS}) FORMAT RowBinary", rows, {"priority": "1"})

    async def query(self, sql: str, limits: QueryLimits | None = None) -> list[dict[str, Any]]:
        sql += " FORMAT JSONEachRow"
        if limits is None:
            body = await self._post(sql, None)
        else:
            limits.check_size(sql)
            body = await self._post(sql, None, limits.settings(), self._reads)
        return [orjson.loads(line) for line in body.splitlines() if line]

    async def _post(
        self,
        query: str,
        data: bytes | None,
        settings: dict[str, str] | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> bytes:
        """One statement: in the body, or in the URL when the body carries `data`."""
        session = session or self._session
        assert session is not None
        s = self._settings
        params = {"database": s.clickhouse_database, "output_format_json_quote_64bit_integers": "0", **(settings or {})}
        headers = {"X-ClickHouse-User": s.clickhouse_user}
        if s.clickhouse_password:
            headers["X-ClickHouse-Key"] = s.clickhouse_password
        if data is None:
            body = query.encode()
        else:
            params["query"] = query
            body = data
        try:
            async with session.post(s.clickhouse_url, params=params, data=body, headers=headers) as resp:
                answer = await resp.read()
                if resp.status != 200:
                    text = answer.decode(errors="replace")
                    if (limited := limit_error(text)) is not None:
                        raise limited
                    first = text.strip().splitlines()[:1]
                    raise StorageError(f"ClickHouse answered {resp.status}: {first[0][:300] if first else ''}")
                return answer
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise StorageError(f"ClickHouse at {s.clickhouse_url} is unreachable: {e}") from e
