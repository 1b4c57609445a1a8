"""Credit notes: what is no longer owed on a finalized invoice, as a numbered document of its own.

A credit note's lines name the invoice line they correct (`invoice_line`, its
position in the invoice's lines, or null for the invoice's own minimum
adjustment), its `line_key`, and for a late line the period it belongs to
(`late_for`). No line credits more than is left of the invoice line it names,
so an invoice's `amount_credited` never exceeds its total. A note is made, its
number given (`CN-YYYY-NNNNNN`, gapless per year), the invoice's
`amount_credited` raised and `credit_note.created` queued for the webhooks in
one transaction; it is never written again.
"""

from __future__ import annotations

import builtins
import secrets
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import replace
from decimal import Decimal, localcontext
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from meterflow.billing.invoices import WrongStatus
from meterflow.billing.lines import MINIMUM_KEY, CreditLine, billed_lines, decode_credit_line, encode_credit_line
from meterflow.billing.listing import row_by_id, rows_after
from meterflow.billing.numbering import next_number
from meterflow.billing.webhooks import enqueue
from meterflow.kernel.clock import SYSTEM, Clock
from meterflow.kernel.money import EXACT, decimal_text, minor_unit, money_text, round_money
from meterflow.records import Records, plain
from meterflow.records.tables import credit_note_numbers, credit_notes, invoices

Reason = Literal["retroactive_change", "late_correction", "manual"]
REASONS: tuple[Reason, ...] = ("retroactive_change", "late_correction", "manual")
CREDITABLE = ("finalized", "paid")
ZERO = Decimal(0)


class CreditExceedsInvoice(Exception):
    """A manual credit asks for more than is left to credit on the invoice (HTTP 409)."""


class CreditAmountInvalid(ValueError):
    """A manual credit's amount has more decimal places than the invoice's currency (HTTP 400)."""


def number_text(year: int, n: int) -> str:
    return f"CN-{year}-{n:06d}"


def slot_key(slot: int | None) -> str:
    return MINIMUM_KEY if slot is None else str(slot)


def credited_by_slot(notes: Iterable[dict[str, Any]]) -> dict[str, Decimal]:
    """What the credit notes of one invoice took off each of its lines."""
    out: dict[str, Decimal] = defaultdict(Decimal)
    with localcontext(EXACT):
        for n in notes:
            for ln in map(decode_credit_line, n["document"]["lines"]):
                out[slot_key(ln.slot)] += ln.amount
    return out


def public(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "number": row["number"], "invoice_id": row["invoice_id"],
            "customer_id": row["customer_id"], "subscription_id": row["subscription_id"], "reason": row["reason"],
            "currency": row["currency"], "total": row["total"], **row["document"],
            "created_at": row["created_at"]}  # fmt: skip


class CreditNotes:
    def __init__(self, records: Records, *, clock: Clock = SYSTEM) -> None:
        self._db = records
        self._clock = clock

    async def create(self, invoice_id: str, reason: Reason, lines: list[CreditLine],
                     memo: str = "") -> dict[str, Any] | None:  # fmt: skip
        """A credit note of `lines` on a finalized or paid invoice, each cut to what is left of its invoice
        line; None when nothing is left to credit. WrongStatus for a draft or a void invoice."""
        async with self._db.begin() as conn:
            inv = await self._locked_invoice(conn, invoice_id)
            return await self._create(conn, inv, reason, lines, memo)

    async def create_manual(self, invoice_id: str, amount: Decimal | None, memo: str = "") -> dict[str, Any] | None:
        """Credits `amount` (None: all that is left) of the invoice, from its last line up; a concession
        that settling never bills again. CreditExceedsInvoice past what is left; None for no such invoice."""
        async with self._db.begin() as conn:
            inv = await self._locked_invoice(conn, invoice_id, missing_ok=True)
            if inv is None:
                return None
            places = minor_unit(inv["currency"])
            if amount is not None and amount != amount.quantize(Decimal(1).scaleb(-places)):
                raise CreditAmountInvalid(f"`amount` {decimal_text(amount)} has more decimal places than "
                                          f"{inv['currency']}, which has {places}.")  # fmt: skip
            taken = credited_by_slot(await self._notes_of(conn, invoice_id))
            with localcontext(EXACT):
                rooms = [(slot, ln, ln.amount - taken[slot_key(slot)]) for slot, ln in billed_lines(inv["document"])]
                left = sum((r for _, _, r in rooms), ZERO)
                want = left if amount is None else amount
                cur = inv["currency"]
                if left <= 0:
                    raise CreditExceedsInvoice(f"Invoice {inv['number']} has nothing left to credit.")
                if want > left:
                    raise CreditExceedsInvoice(f"Invoice {inv['number']} has {money_text(left, cur)} {cur} left to "
                                               f"credit; `amount` asks for {money_text(want, cur)}.")  # fmt: skip
                lines: builtins.list[CreditLine] = []
                for slot, ln, room in reversed(rooms):
                    take = min(room, want)
                    if take > 0:
                        lines.append(CreditLine(slot, ln.line_key or "", ln.description, ZERO, take, ln.late_for))
                        want -= take
            return await self._create(conn, inv, "manual", lines, memo)

    async def get(self, note_id: str) -> dict[str, Any] | None:
        row = await row_by_id(self._db, credit_notes, note_id)
        return public(row) if row is not None else None

    async def list(self, after: str, limit: int, invoice_id: str = "", customer_id: str = "",
                   subscription_id: str = "") -> list[dict[str, Any]]:  # fmt: skip
        rows = await rows_after(self._db, credit_notes, after, limit, invoice_id=invoice_id, customer_id=customer_id,
                                subscription_id=subscription_id)  # fmt: skip
        return [public(r) for r in rows]

    async def of_customer(self, customer_id: str) -> builtins.list[dict[str, Any]]:
        """Every credit note of a customer, as stored (`document` holds the lines)."""
        q = (sa.select(credit_notes).where(credit_notes.c.customer_id == customer_id)
             .order_by(credit_notes.c.created_at, credit_notes.c.id))  # fmt: skip
        async with self._db.connect() as conn:
            return [plain(r) for r in (await conn.execute(q)).mappings().all()]

    async def _locked_invoice(self, conn: AsyncConnection, invoice_id: str,
                              missing_ok: bool = False) -> dict[str, Any]:  # fmt: skip
        q = sa.select(invoices).where(invoices.c.id == invoice_id)
        if conn.dialect.name == "postgresql":
            q = q.with_for_update()
        else:  # SQLite: take the write lock now, so the read below cannot go stale before our write
            await conn.execute(sa.update(invoices).where(invoices.c.id == invoice_id)
                               .values(version=invoices.c.version))  # fmt: skip
        row = (await conn.execute(q)).mappings().first()
        if row is None:
            if missing_ok:
                return None  # type: ignore[return-value]
            raise LookupError(f"there is no invoice {invoice_id!r}")
        inv = plain(row)
        if inv["status"] not in CREDITABLE:
            raise WrongStatus(inv["status"], "credit")
        return inv

    async def _notes_of(self, conn: AsyncConnection, invoice_id: str) -> builtins.list[dict[str, Any]]:
        q = sa.select(credit_notes.c.document).where(credit_notes.c.invoice_id == invoice_id)
        return [{"document": d} for d in (await conn.execute(q)).scalars()]

    async def _create(self, conn: AsyncConnection, inv: dict[str, Any], reason: Reason,
                      lines: builtins.list[CreditLine], memo: str) -> dict[str, Any] | None:  # fmt: skip
        cur = inv["currency"]
        billed = {slot_key(slot): ln.amount for slot, ln in billed_lines(inv["document"])}
        taken = credited_by_slot(await self._notes_of(conn, inv["id"]))
        kept: builtins.list[dict[str, Any]] = []
        with localcontext(EXACT):
            total = ZERO
            for ln in lines:
                k = slot_key(ln.slot)
                take = min(round_money(ln.amount, cur), billed.get(k, ZERO) - taken[k])
                if take <= 0:
                    continue
                taken[k] += take
                total += take
                kept.append(encode_credit_line(replace(ln, amount=take), cur))
            if not kept:
                return None
            credited = Decimal(inv["amount_credited"] or 0) + total
        now = self._clock.now_ms()
        number = number_text(*await next_number(conn, credit_note_numbers, now))
        row = {"id": "cn_" + secrets.token_hex(12), "number": number, "invoice_id": inv["id"],
               "customer_id": inv["customer_id"], "subscription_id": inv["subscription_id"], "reason": reason,
               "currency": cur, "total": money_text(total, cur), "created_at": now,
               "document": {"invoice_number": inv["number"], "memo": memo, "lines": kept}}  # fmt: skip
        await conn.execute(sa.insert(credit_notes).values(row))
        await conn.execute(
            sa.update(invoices).where(invoices.c.id == inv["id"])
            .values(amount_credited=money_text(credited, cur), version=invoices.c.version + 1)
        )  # fmt: skip
        note = public(row)
        await enqueue(conn, "credit_note.created", note)
        return note
