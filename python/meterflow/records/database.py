"""The records database: one async SQLAlchemy engine over SQLite (embedded) or PostgreSQL (full stack)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from meterflow.config import Settings, private_dir
from meterflow.records import migrate
from meterflow.records.versions import IfMatch

log = logging.getLogger("meterflow.records")

# What an unreachable or failing database raises; a constraint violation
# (IntegrityError) is an answer, not an outage, and is left to the caller.
# asyncpg reports a refused, closed or shutting-down server with its own classes.
_DOWN = (
    exc.OperationalError, exc.InterfaceError, exc.TimeoutError, OSError, TimeoutError,
    asyncpg.PostgresConnectionError, asyncpg.exceptions.OperatorInterventionError, asyncpg.InterfaceError,
)  # fmt: skip


class RecordsUnavailable(Exception):
    """The records database cannot be reached; the request may be retried."""


def database_url(settings: Settings) -> URL:
    """The SQLAlchemy URL with its async driver: aiosqlite or asyncpg."""
    raw = settings.database_url or f"sqlite:///{Path(settings.data_dir).resolve() / 'meterflow.db'}"
    url = make_url(raw)
    if url.drivername in ("postgresql", "postgres", "postgresql+asyncpg"):
        return url.set(drivername="postgresql+asyncpg")
    if url.drivername in ("sqlite", "sqlite+aiosqlite"):
        return url.set(drivername="sqlite+aiosqlite")
    return url


def _is_down(e: BaseException) -> bool:
    if isinstance(e, exc.IntegrityError):
        return False
    return isinstance(e, _DOWN) or (isinstance(e, exc.DBAPIError) and e.connection_invalidated)


class Records:
    """The records backend: started (and migrated) once, pinged by /ready, closed at shutdown."""

    def __init__(self, settings: Settings) -> None:
        self.url = database_url(settings)
        self.name = "sqlite" if self.url.get_backend_name() == "sqlite" else "postgresql"
        self._engine: AsyncEngine | None = None

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            self._engine = self._create_engine()
        return self._engine

    def _create_engine(self) -> AsyncEngine:
        if self.name == "sqlite":
            if self.url.database:
                # The data directory (by default) holds the admin key too: created 0700, never by a plain mkdir.
                private_dir(Path(self.url.database).parent)
            engine = create_async_engine(self.url, connect_args={"timeout": 10})

            @event.listens_for(engine.sync_engine, "connect")
            def _pragmas(dbapi_connection: object, _record: object) -> None:
                cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
                # WAL: readers never wait for the writer; a writer waits up to 10 s for another.
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.execute("PRAGMA busy_timeout=10000")
                cursor.close()

            return engine
        return create_async_engine(
            self.url,
            pool_pre_ping=True,
            pool_size=5,
            max_overflow=10,
            pool_timeout=5,
            # Fail fast when the server is gone: a request answers 503, it does not hang.
            connect_args={"timeout": 3, "command_timeout": 10},
        )

    async def start(self) -> None:
        """Connects and applies the migrations (idempotent; concurrent starts take turns)."""
        revision = await self.upgrade()
        log.info("records database ready", extra={"records": self.name, "revision": revision})

    async def upgrade(self) -> str:
        async with self.begin() as conn:
            return await conn.run_sync(migrate.upgrade)

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    async def ping(self) -> None:
        async with self.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        """A transaction; an unreachable database raises RecordsUnavailable."""
        with self._unreachable():
            async with self.engine.begin() as conn:
                yield conn

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads (each statement sees committed data); RecordsUnavailable likewise."""
        with self._unreachable():
            async with self.engine.connect() as conn:
                yield conn

    @contextlib.contextmanager
    def _unreachable(self) -> Iterator[None]:
        try:
            yield
        except Exception as e:
            if _is_down(e):
                raise RecordsUnavailable(f"the records database ({self.name}) does not answer: {_short(e)}") from e
            raise


async def locked_row(conn: AsyncConnection, table: sa.Table, key: sa.ColumnElement[bool]) -> dict[str, Any] | None:
    """The row `key` selects, locked until the transaction ends, so a read-modify-write needs no retry.

    PostgreSQL: `SELECT ... FOR UPDATE` reads and locks the row in one statement (a waiting one reads
    the row as the holder committed it). SQLite has no row locks: a no-op UPDATE first opens the
    transaction as the writer (as BEGIN IMMEDIATE would), so no other writer commits before this one ends.
    A row that does not exist yet is not locked on PostgreSQL: a concurrent insert of it fails with
    IntegrityError, and the caller runs once more.
    """
    if conn.dialect.name == "sqlite":
        await conn.execute(sa.update(table).where(key).values(version=table.c.version))
    row = (await conn.execute(sa.select(table).where(key).with_for_update())).mappings().first()
    return plain(row) if row is not None else None


def plain(row: Mapping[Any, Any]) -> dict[str, Any]:
    """A result row as a dict with plain `str` keys (SQLAlchemy's are a str subclass JSON encoders refuse)."""
    return {str(k): v for k, v in row.items()}


def _short(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e) or type(e).__name__
    return text.splitlines()[0][:200]


def open_records(settings: Settings) -> Records:
    return Records(settings)


async def live_row(conn: AsyncConnection, table: sa.Table, key: sa.ColumnElement[bool],
                   if_match: IfMatch | None = None) -> dict[str, Any] | None:  # fmt: skip
    """The live row `key` selects, locked for a change (`locked_row`) and checked against `if_match`
    (StaleVersion); None when there is none or it is soft-deleted (`deleted_at` set)."""
    old = await locked_row(conn, table, key)
    if old is None or old["deleted_at"] is not None:
        return None
    if if_match is not None:
        if_match.check(int(old["version"]))
    return old


async def read_row(records: Records, table: sa.Table, key: sa.ColumnElement[bool],
                   include_deleted: bool = False) -> dict[str, Any] | None:  # fmt: skip
    """The row `key` selects, unlocked; a soft-deleted one only with `include_deleted`."""
    q = sa.select(table).where(key)
    if not include_deleted:
        q = q.where(table.c.deleted_at.is_(None))
    async with records.connect() as conn:
        row = (await conn.execute(q)).mappings().first()
    return plain(row) if row is not None else None
