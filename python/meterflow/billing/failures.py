"""Closing failures: the subscriptions whose last closing attempt failed, kept apart so the others go on.

A failure (a plan version that no longer parses, a meter gone, a usage value
out of range) is recorded per subscription with its error and the number of
attempts, listed by `GET /v1/closing/failures` and the dashboard, counted by
the `meterflow_closing_failures` gauge, and cleared by the first pass that
closes the subscription's periods again.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from meterflow.records import Records, plain
from meterflow.records.tables import closing_failures


class ClosingFailures:
    def __init__(self, records: Records) -> None:
        self._db = records

    async def record(self, subscription_id: str, period_start: int | None, error: str, at: int) -> None:
        c = closing_failures.c
        async with self._db.begin() as conn:
            done = await conn.execute(sa.update(closing_failures).where(c.subscription_id == subscription_id).values(
                period_start=period_start, error=error[:1000], last_failed_at=at, attempts=c.attempts + 1))  # fmt: skip
            if done.rowcount == 0:
                await conn.execute(sa.insert(closing_failures).values(
                    subscription_id=subscription_id, period_start=period_start, error=error[:1000],
                    first_failed_at=at, last_failed_at=at, attempts=1))  # fmt: skip

    async def clear_all_but(self, failed: set[str], among: list[str] | None = None) -> None:
        """Clears the failures of every subscription (of `among`, when given) that is not in `failed`."""
        c = closing_failures.c
        q = sa.delete(closing_failures)
        if failed:
            q = q.where(c.subscription_id.not_in(sorted(failed)))
        if among is not None:
            q = q.where(c.subscription_id.in_(among))
        async with self._db.begin() as conn:
            await conn.execute(q)

    async def list(self, after: str = "", limit: int = 100) -> list[dict[str, Any]]:
        q = (sa.select(closing_failures).where(closing_failures.c.subscription_id > after)
             .order_by(closing_failures.c.subscription_id).limit(limit))  # fmt: skip
        async with self._db.connect() as conn:
            return [plain(r) for r in (await conn.execute(q)).mappings().all()]

    async def count(self) -> int:
        async with self._db.connect() as conn:
            return int((await conn.execute(sa.select(sa.func.count()).select_from(closing_failures))).scalar_one())
