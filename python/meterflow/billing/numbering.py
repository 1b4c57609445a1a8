"""Gapless yearly document numbers: a counter row per calendar year, raised inside the transaction that issues.

The upsert locks the year's row on PostgreSQL (the database lock on SQLite),
so numbers of a year are 1, 2, 3... with no gap even when issuers run
concurrently or one rolls back. Invoices and credit notes each have a table.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection


async def next_number(conn: AsyncConnection, counters: sa.Table, now: int) -> tuple[int, int]:
    """(year, n): the year's counter in `counters` (columns year, last) raised by one in the caller's transaction."""
    year = dt.datetime.fromtimestamp(now / 1000, dt.UTC).year
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    stmt = (
        insert(counters)
        .values(year=year, last=1)
        .on_conflict_do_update(index_elements=[counters.c.year], set_={"last": counters.c.last + 1})
        .returning(counters.c.last)
    )
    n = (await conn.execute(stmt)).scalar_one()
    return year, int(n)
