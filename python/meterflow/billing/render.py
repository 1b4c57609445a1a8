"""The JSON shape of a priced period, for the API layer: amounts and quantities as decimal strings."""

from __future__ import annotations

from typing import Any

from meterflow.billing.money import decimal_text, money_text
from meterflow.billing.rating import Line, PricedPeriod, TierLine


def _tier_json(t: TierLine) -> dict[str, Any]:
    return {
        "up_to": None if t.up_to is None else decimal_text(t.up_to),
        "quantity": decimal_text(t.quantity),
        "unit_amount": decimal_text(t.unit_amount),
        "flat_amount": decimal_text(t.flat_amount),
        "amount": decimal_text(t.amount),
    }


def _line_json(line: Line, currency: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "line_key": line.key,
        "charge": line.charge,
        "meter": line.meter,
        "description": line.description,
        "quantity": decimal_text(line.quantity),
        "amount": money_text(line.amount, currency),
        "tiers": [_tier_json(t) for t in line.tiers],
    }
    if line.dimension is not None:
        out["dimension"] = {line.dimension[0]: line.dimension[1]}
    if line.packages is not None:
        out["packages"] = decimal_text(line.packages)
    return out


def priced_period_json(p: PricedPeriod) -> dict[str, Any]:
    """`period` is the billed part; `billing_period` the calendar period it belongs to (they differ when cut)."""
    cur = p.currency
    return {
        "plan": p.plan,
        "currency": cur,
        "period": {"start": p.period.start, "end": p.period.end},
        "billing_period": {"start": p.period.period.start, "end": p.period.period.end},
        "lines": [_line_json(ln, cur) for ln in p.lines],
        "subtotal": money_text(p.subtotal, cur),
        "minimum": money_text(p.minimum, cur),
        "minimum_adjustment": money_text(p.minimum_adjustment, cur),
        "total": money_text(p.total, cur),
    }
