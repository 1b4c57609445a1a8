"""Invoices as records: drafts from priced periods, the draft → finalized → paid | void lifecycle, gapless numbers.

A number is given at finalization, in the transaction that finalizes: the
year's counter row is raised by one there (an upsert that locks the row on
PostgreSQL, the database lock on SQLite), so numbers of a year are 1, 2, 3...
with no gap even when finalizations run concurrently or one rolls back. A
finalized invoice's document is never written again; voiding keeps its number.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from collections.abc import Awaitable, Callable
from decimal import Decimal, localcontext
from typing import Any, Literal

import orjson
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from meterflow.archive import Store
from meterflow.billing.listing import row_by_id, rows_after
from meterflow.billing.numbering import next_number
from meterflow.billing.periods import Period
from meterflow.billing.rating import PricedPeriod
from meterflow.billing.render import priced_period_json
from meterflow.billing.webhooks import enqueue
from meterflow.kernel.clock import DAY_MS, SYSTEM, Clock
from meterflow.kernel.money import EXACT, money_text
from meterflow.records import Records, plain
from meterflow.records.tables import invoice_numbers, invoices

log = logging.getLogger("meterflow.invoices")

STATUSES = ("draft", "finalized", "paid", "void")
# A transition: the status it needs, the status it makes, the time column it sets, the event it sends.
TRANSITIONS = {
    "finalize": ("draft", "finalized", "issued_at", "invoice.finalized"),
    "void": ("finalized", "void", "voided_at", "invoice.voided"),
    "mark_paid": ("finalized", "paid", "paid_at", "invoice.paid"),
}


class WrongStatus(Exception):
    """The invoice's current status does not allow the transition (HTTP 409)."""

    def __init__(self, current: str, action: str) -> None:
        super().__init__(f"{action} needs another status than {current}")
        self.current = current
        self.action = action


Kind = Literal["period", "late"]
# What finalizing freezes beside the lines: seller and buyer details, time zone, locale, units.
Snapshot = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def number_text(year: int, n: int) -> str:
    return f"MF-{year}-{n:06d}"


def public(row: dict[str, Any]) -> dict[str, Any]:
    """An invoice as the API shows it: the upcoming invoice's shape plus id, number, status, dates and
    what its credit notes took off (`amount_credited`, `amount_due`)."""
    credited = row.get("amount_credited") or "0"
    with localcontext(EXACT):
        due = Decimal(row["total"]) - Decimal(credited)
    return {"id": row["id"], "number": row["number"], "status": row["status"], "kind": row.get("kind") or "period",
            "customer_id": row["customer_id"], "subscription_id": row["subscription_id"], **row["document"],
            "amount_credited": money_text(Decimal(credited), row["currency"]),
            "amount_due": money_text(due, row["currency"]), "created_at": row["created_at"],
            "issued_at": row["issued_at"], "due_at": row["due_at"], "paid_at": row["paid_at"],
            "voided_at": row["voided_at"]}  # fmt: skip


def archive_key(number: str, issued_at: int) -> str:
    at = dt.datetime.fromtimestamp(issued_at / 1000, dt.UTC)
    return f"invoices/{at:%Y}/{at:%m}/{number}.json"


class Invoices:
    """Invoices in the records database; finalized ones also go to the archive store."""

    def __init__(self, records: Records, archive: Store | None, due_days: int = 30, *, clock: Clock = SYSTEM,
                 snapshot: Snapshot | None = None) -> None:  # fmt: skip
        self._db = records
        self._archive = archive
        self._due_ms = due_days * DAY_MS
        self._clock = clock
        self._snapshot = snapshot

    async def create_draft(
        self, customer_id: str, subscription_id: str, priced: PricedPeriod
    ) -> tuple[dict[str, Any], bool]:
        """The draft of a priced period; (invoice, created)."""
        return await self.create_draft_document(
            customer_id, subscription_id, priced.period.period, priced.currency, priced_period_json(priced)
        )

    async def create_draft_document(
        self, customer_id: str, subscription_id: str, period: Period, currency: str, document: dict[str, Any],
        kind: Kind = "period",
    ) -> tuple[dict[str, Any], bool]:
        """The period's draft with `document` (the priced period's JSON, late lines included); (invoice,
        created). The unique (subscription, period start) makes a second draft of the same period
        impossible: the loser of a race gets the winner's invoice. A `late` invoice holds late lines
        only; its period is the instant it is made."""
        row = {"id": "inv_" + secrets.token_hex(12), "customer_id": customer_id, "subscription_id": subscription_id,
               "period_start": period.start, "period_end": period.end, "status": "draft", "number": None,
               "currency": currency, "total": document["total"], "document": document,
               "created_at": self._clock.now_ms(), "issued_at": None, "due_at": None, "paid_at": None,
               "voided_at": None, "version": 1, "kind": kind, "amount_credited": "0"}  # fmt: skip
        try:
            async with self._db.begin() as conn:
                await conn.execute(sa.insert(invoices).values(row))
        except IntegrityError:
            existing = await self.of_period(subscription_id, period.start)
            if existing is None:
                raise
            return existing, False
        return public(row), True

    async def refresh_draft(self, invoice_id: str, document: dict[str, Any]) -> dict[str, Any] | None:
        """The draft with a new document; None if it is no longer a draft."""
        async with self._db.begin() as conn:
            done = await conn.execute(
                sa.update(invoices)
                .where(invoices.c.id == invoice_id, invoices.c.status == "draft")
                .values(document=document, total=document["total"], version=invoices.c.version + 1)
            )
        return await self.get(invoice_id) if done.rowcount == 1 else None

    async def discard_drafts(self, customer_id: str, ids: list[str] | None = None, kind: Kind | None = None) -> int:
        """Deletes drafts of the customer (those named, or of `kind`) that are still drafts: a draft is not a
        document yet, and one whose period a change dated in the past removed must not be finalized."""
        q = sa.delete(invoices).where(invoices.c.customer_id == customer_id, invoices.c.status == "draft")
        if ids is not None:
            q = q.where(invoices.c.id.in_(ids))
        if kind is not None:
            q = q.where(invoices.c.kind == kind)
        async with self._db.begin() as conn:
            return int((await conn.execute(q)).rowcount)

    async def of_period(self, subscription_id: str, period_start: int) -> dict[str, Any] | None:
        q = sa.select(invoices).where(invoices.c.subscription_id == subscription_id,
                                      invoices.c.period_start == period_start)  # fmt: skip
        async with self._db.connect() as conn:
            row = (await conn.execute(q)).mappings().first()
        return public(plain(row)) if row is not None else None

    async def get(self, invoice_id: str) -> dict[str, Any] | None:
        row = await row_by_id(self._db, invoices, invoice_id)
        return public(row) if row is not None else None

    async def list(self, after: str, limit: int, customer_id: str = "", status: str = "",
                   subscription_id: str = "") -> list[dict[str, Any]]:  # fmt: skip
        rows = await rows_after(self._db, invoices, after, limit, subscription_id=subscription_id,
                                customer_id=customer_id, status=status)  # fmt: skip
        return [public(r) for r in rows]

    async def transition(self, invoice_id: str, action: str,
                         current: dict[str, Any] | None = None) -> dict[str, Any] | None:  # fmt: skip
        """Applies `action` (finalize, void, mark_paid); None when there is no such invoice; WrongStatus
        when its status does not allow it. The webhook deliveries commit with the change. `current`: the
        invoice as the caller just read it (its snapshot is taken from it; the write still checks it)."""
        needs, makes, column, event = TRANSITIONS[action]
        frozen: dict[str, Any] | None = None
        if action == "finalize" and self._snapshot is not None:
            current = current if current is not None else await self.get(invoice_id)
            if current is not None and current["status"] == "draft":
                frozen = await self._snapshot(current)
        async with self._db.begin() as conn:
            q = sa.select(invoices).where(invoices.c.id == invoice_id)
            if conn.dialect.name == "postgresql":
                q = q.with_for_update()
            found = (await conn.execute(q)).mappings().first()
            if found is None:
                return None
            row = plain(found)
            if row["status"] != needs:
                raise WrongStatus(row["status"], action)
            now = self._clock.now_ms()
            values: dict[str, Any] = {"status": makes, column: now, "version": row["version"] + 1}
            if frozen is not None:
                values["document"] = {**row["document"], "snapshot": frozen}
            if action == "finalize":
                values["number"] = number_text(*await next_number(conn, invoice_numbers, now))
                values["due_at"] = now + self._due_ms
            done = await conn.execute(
                sa.update(invoices)
                .where(invoices.c.id == invoice_id, invoices.c.version == row["version"])
                .values(values)
            )
            if done.rowcount != 1:  # SQLite: changed between our read and write (PostgreSQL holds the row lock)
                current = (await conn.execute(sa.select(invoices.c.status).where(invoices.c.id == invoice_id))).scalar()
                raise WrongStatus(str(current), action)
            row |= values
            invoice = public(row)
            await enqueue(conn, event, invoice)
        if action == "finalize":
            await self._archive_copy(invoice)
        return invoice

    async def _archive_copy(self, invoice: dict[str, Any]) -> None:
        """The disaster-recovery copy; the records database stays the truth if the store is down."""
        if self._archive is None:
            return
        try:
            key = archive_key(invoice["number"], invoice["issued_at"])
            await self._archive.put(key, orjson.dumps(invoice, option=orjson.OPT_SORT_KEYS), 1)
        except Exception as e:
            log.warning("invoice not archived", extra={"invoice": invoice["id"], "error": str(e)[:300]})
