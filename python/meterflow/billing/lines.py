"""Invoice and credit-note lines as billing stores them: typed values, one encoder to the stored shape, one decoder.

Inside billing a line is an `InvoiceLine` (a credit note's line a
`CreditLine`): Decimals, ints and the `line_key`. The stored shape, which is
also the shape of every API answer and the input of the documents, is JSON
with amounts and quantities as decimal strings (`money_text` for amounts,
`decimal_text` for quantities and tiers); `encode_line` and `decode_line`
(`encode_credit_line`, `decode_credit_line`) are the only places that cross
between the two. Stored texts are canonical, so decoding and encoding again
gives the same bytes.

What this module does not own: pricing (`rating`), the document around the
lines (`render`, `closing`) and the rendering of documents (`documents`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from meterflow.billing.plans import FlatCharge, Plan
from meterflow.billing.rating import Line, TierLine
from meterflow.kernel.money import decimal_text, money_text

ZERO = Decimal(0)
ONE = Decimal(1)
MINIMUM_KEY = "minimum"  # the line key (and credit slot) of an invoice's own minimum adjustment


@dataclass(frozen=True)
class LateFor:
    """The finalized period a late line (or the credit of one) belongs to."""

    subscription_id: str
    start: int
    end: int


@dataclass(frozen=True)
class InvoiceLine:
    """One line of an invoice's document; `amount` is rounded to the currency's minor unit."""

    line_key: str | None  # None: stored before line keys existed (see `legacy_keys`)
    charge: str
    meter: str | None
    description: str
    quantity: Decimal
    amount: Decimal
    tiers: tuple[TierLine, ...] = ()
    dimension: tuple[str, str] | None = None  # (price_by property, value)
    packages: Decimal | None = None  # package lines: started blocks
    late_for: LateFor | None = None  # a late line: the earlier period it bills

    @classmethod
    def priced(cls, line: Line) -> InvoiceLine:
        """A priced period's line as its invoice stores it."""
        return cls(line.key, line.charge, line.meter, line.description, line.quantity, line.amount, line.tiers,
                   line.dimension, line.packages)  # fmt: skip


def minimum_line(amount: Decimal) -> InvoiceLine:
    """An invoice's minimum adjustment seen as a line (its key `minimum`), as settling and crediting count it."""
    return InvoiceLine(MINIMUM_KEY, "minimum", None, "Minimum adjustment", ONE, amount)


@dataclass(frozen=True)
class CreditLine:
    """One line of a credit note: `amount` (positive) off the invoice line `slot`."""

    slot: int | None  # the invoice line's position; None: the invoice's own minimum adjustment
    line_key: str
    description: str
    quantity: Decimal
    amount: Decimal
    late_for: LateFor | None = None  # the period the credited line belongs to, when it is a late line


# --- the stored shape --------------------------------------------------------------------------------------------


def _tier_json(t: TierLine) -> dict[str, Any]:
    return {
        "up_to": None if t.up_to is None else decimal_text(t.up_to),
        "quantity": decimal_text(t.quantity),
        "unit_amount": decimal_text(t.unit_amount),
        "flat_amount": decimal_text(t.flat_amount),
        "amount": decimal_text(t.amount),
    }


def _tier(d: Mapping[str, Any]) -> TierLine:
    up_to = d.get("up_to")
    return TierLine(None if up_to is None else Decimal(up_to), Decimal(d["quantity"]), Decimal(d["unit_amount"]),
                    Decimal(d["flat_amount"]), Decimal(d["amount"]))  # fmt: skip


def _late_for_json(late: LateFor) -> dict[str, Any]:
    return {"subscription_id": late.subscription_id, "start": late.start, "end": late.end}


def _late_for(d: Mapping[str, Any] | None) -> LateFor | None:
    return LateFor(str(d["subscription_id"]), int(d["start"]), int(d["end"])) if d else None


def encode_line(line: InvoiceLine, currency: str) -> dict[str, Any]:
    """The stored (and API) shape of an invoice line."""
    out: dict[str, Any] = {} if line.line_key is None else {"line_key": line.line_key}
    out |= {
        "charge": line.charge,
        "meter": line.meter,
        "description": line.description,
        "quantity": decimal_text(line.quantity),
        "amount": money_text(line.amount, currency),
        "tiers": [_tier_json(t) for t in line.tiers],
    }
    if line.late_for is not None:
        out["late_for"] = _late_for_json(line.late_for)
    if line.dimension is not None:
        out["dimension"] = {line.dimension[0]: line.dimension[1]}
    if line.packages is not None:
        out["packages"] = decimal_text(line.packages)
    return out


def decode_line(d: Mapping[str, Any]) -> InvoiceLine:
    """An invoice line from its stored shape (lines stored before line keys existed have none)."""
    key = d.get("line_key")
    dim = d.get("dimension") or {}
    packages = d.get("packages")
    return InvoiceLine(
        None if key is None else str(key), str(d.get("charge") or ""), d.get("meter"), d.get("description") or "",
        Decimal(d["quantity"]), Decimal(d["amount"]), tuple(_tier(t) for t in d.get("tiers") or ()),
        next(iter(dim.items())) if dim else None, None if packages is None else Decimal(packages),
        _late_for(d.get("late_for")),
    )  # fmt: skip


def encode_credit_line(line: CreditLine, currency: str) -> dict[str, Any]:
    """The stored (and API) shape of a credit note's line."""
    out: dict[str, Any] = {
        "invoice_line": line.slot,
        "line_key": line.line_key,
        "description": line.description,
        "quantity": decimal_text(line.quantity),
        "amount": money_text(line.amount, currency),
    }
    if line.late_for is not None:
        out["late_for"] = _late_for_json(line.late_for)
    return out


def decode_credit_line(d: Mapping[str, Any]) -> CreditLine:
    """A credit note's line from its stored shape."""
    slot = d.get("invoice_line")
    return CreditLine(None if slot is None else int(slot), str(d.get("line_key") or ""), d.get("description") or "",
                      Decimal(d.get("quantity") or 0), Decimal(d["amount"]), _late_for(d.get("late_for")))  # fmt: skip


def billed_lines(document: Mapping[str, Any]) -> list[tuple[int | None, InvoiceLine]]:
    """What a stored invoice document billed, line by line: (slot, line), its position in the document's lines;
    the minimum adjustment last, as slot None, when it is not zero."""
    out: list[tuple[int | None, InvoiceLine]] = [(i, decode_line(ln)) for i, ln in enumerate(document["lines"])]
    adjustment = Decimal(document.get("minimum_adjustment") or 0)
    if adjustment:
        out.append((None, minimum_line(adjustment)))
    return out


# --- lines stored before line keys existed ----------------------------------------------------------------------


def legacy_key(ln: Mapping[str, Any]) -> str:
    """The key of a stored line no charge of its plan version accounts for."""
    dim = ln.get("dimension") or {}
    return f"legacy:{ln.get('meter')}|{ln.get('charge')}|{sorted(dim.items())}"


def legacy_keys(plan: Plan, lines: Sequence[Mapping[str, Any]]) -> list[str]:
    """Line keys for lines stored before keys existed: the period's own lines follow the plan's charges in
    order (a dimensional charge's lines one after another); a late line takes the first charge that
    prices its meter the same way."""
    keys: list[str] = []
    own = [ln for ln in lines if "late_for" not in ln]
    at = 0
    for i, c in enumerate(plan.charges):
        if at >= len(own):
            break
        if isinstance(c, FlatCharge) or c.price_by is None:
            keys.append(str(i))
            at += 1
            continue
        while at < len(own) and own[at].get("meter") == c.meter and c.price_by in (own[at].get("dimension") or {}):
            keys.append(f"{i}:{c.price_by}={own[at]['dimension'][c.price_by]}")
            at += 1
    keys += [legacy_key(ln) for ln in own[len(keys):]]
    for ln in lines[len(own):]:
        dim = ln.get("dimension") or {}
        match = next((i for i, c in enumerate(plan.charges) if not isinstance(c, FlatCharge) and c.meter ==
                      ln.get("meter") and (c.price_by in dim if c.price_by else not dim)), None)  # fmt: skip
        if match is None:
            keys.append(legacy_key(ln))
        else:
            c = plan.charges[match]
            keys.append(f"{match}:{c.price_by}={dim[c.price_by]}" if dim and not isinstance(c, FlatCharge)
                        and c.price_by else str(match))  # fmt: skip
    return keys
