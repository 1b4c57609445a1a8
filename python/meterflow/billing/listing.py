"""Reading billing records by id: one row, or a page of rows after a cursor, in id order, with equality filters."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from meterflow.records import Records, plain


async def row_by_id(records: Records, table: sa.Table, row_id: str) -> dict[str, Any] | None:
    """The row of `table` whose `id` is `row_id`, as stored; None if there is none."""
    async with records.connect() as conn:
        row = (await conn.execute(sa.select(table).where(table.c.id == row_id))).mappings().first()
    return plain(row) if row is not None else None


async def rows_after(records: Records, table: sa.Table, after: str, limit: int, **equal: str) -> list[dict[str, Any]]:
    """Up to `limit` rows of `table` with an id above `after`, in id order; each non-empty `equal` value keeps the
    rows whose column of that name holds it."""
    q = sa.select(table).where(table.c.id > after)
    for column, value in equal.items():
        if value:
            q = q.where(table.c[column] == value)
    async with records.connect() as conn:
        rows = (await conn.execute(q.order_by(table.c.id).limit(limit))).mappings().all()
    return [plain(r) for r in rows]
