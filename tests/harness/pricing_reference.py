"""A reference pricer written from issue 12's text alone, in exact fractions, for checking billing.rating.

It reads the plan *document* as a user writes it (decimal strings), not the
parsed `Plan`, and never imports `meterflow.billing`. Amounts are Fractions
until a charge is rounded; rounding is half up by integer arithmetic.
Usage: {meter: {"total": str | Decimal, "by": {property: {value: quantity}}}}.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

MINOR = {"EUR": 2, "USD": 2, "GBP": 2, "CHF": 2, "JPY": 0, "KRW": 0, "KWD": 3, "BHD": 3, "OMR": 3, "JOD": 3, "TND": 3}


# The plan of issue 12, plus a dimensional charge.
ISSUE_PLAN: dict[str, Any] = {
    "code": "pro", "name": "Pro", "currency": "EUR", "interval": "month", "minimum": "100.00",
    "charges": [
        {"type": "flat", "amount": "49.00", "description": "Platform fee"},
        {"type": "unit", "meter": "api_calls", "unit_amount": "0.0004", "free_units": "10000"},
        {"type": "graduated", "meter": "bandwidth", "tiers": [
            {"up_to": "1000000000", "unit_amount": "0"},
            {"up_to": None, "unit_amount": "0.00000002", "flat_amount": "0"}]},
        {"type": "volume", "meter": "compute_time", "tiers": [
            {"up_to": "3600000", "unit_amount": "0.00001"},
            {"up_to": None, "unit_amount": "0.000008"}]},
        {"type": "package", "meter": "storage_peak", "package_size": "100", "package_amount": "5.00"},
        {"meter": "api_calls", "price_by": "region", "description": "Regional surcharge",
         "prices": {"eu-west-1": {"type": "unit", "unit_amount": "0.001"},
                    "us-east-1": {"type": "graduated", "tiers": [
                        {"up_to": "100", "unit_amount": "0", "flat_amount": "1.00"},
                        {"up_to": None, "unit_amount": "0.002"}]}},
         "default": {"type": "unit", "unit_amount": "0.0005"}},
    ],
}  # fmt: skip


def frac(s: Any) -> Fraction:
    return Fraction(str(s))


def half_up(x: Fraction, places: int) -> Fraction:
    """x >= 0 rounded to `places` decimals, a tie rounding up: floor(x * 10^p + 1/2) / 10^p."""
    scale = 10**places
    return Fraction((x * scale * 2 + 1) // 2, scale)


@dataclass
class RefLine:
    charge: str
    meter: str | None
    dimension: tuple[str, str] | None
    quantity: Fraction
    exact: Fraction
    amount: Fraction


def _unit(body: dict[str, Any], q: Fraction) -> Fraction:
    free = frac(body.get("free_units", "0"))
    billable = q - free if q > free else Fraction(0)
    return billable * frac(body["unit_amount"])


def _bounds(body: dict[str, Any]) -> list[tuple[Fraction, Fraction | None, Fraction, Fraction]]:
    """(lower, upper or None, unit price, flat fee) of each tier."""
    out = []
    lower = Fraction(0)
    for t in body["tiers"]:
        upper = None if t.get("up_to") is None else frac(t["up_to"])
        out.append((lower, upper, frac(t.get("unit_amount", "0")), frac(t.get("flat_amount", "0"))))
        if upper is not None:
            lower = upper
    return out


def _graduated(body: dict[str, Any], q: Fraction) -> Fraction:
    """Consume the quantity tier by tier; a tier that takes any units is reached and adds its flat fee."""
    total = Fraction(0)
    remaining = q
    for lower, upper, unit, flat in _bounds(body):
        room = remaining if upper is None else min(remaining, upper - lower)
        if room > 0:
            total += room * unit + flat
            remaining -= room
    return total


def _volume(body: dict[str, Any], q: Fraction) -> Fraction:
    """The tier with lower < q <= upper prices all of q; nothing is used at q = 0."""
    for lower, upper, unit, flat in _bounds(body):
        if lower < q and (upper is None or q <= upper):
            return q * unit + flat
    return Fraction(0)


def _package(body: dict[str, Any], q: Fraction) -> Fraction:
    size = frac(body["package_size"])
    started = -(-q // size)  # ceiling of q / size
    return started * frac(body["package_amount"])


PRICERS = {"unit": _unit, "graduated": _graduated, "volume": _volume, "package": _package}


def price(body: dict[str, Any], quantity: Any) -> Fraction:
    """The exact amount of one price body for a quantity (negative quantities price as 0)."""
    q = max(frac(quantity), Fraction(0))
    return PRICERS[body["type"]](body, q)


def reference_price(plan: dict[str, Any], usage: dict[str, Any], served_ms: int, period_ms: int) -> dict[str, Any]:
    places = MINOR[plan["currency"]]
    share = Fraction(served_ms, period_ms)
    lines: list[RefLine] = []
    for c in plan["charges"]:
        if c.get("type") == "flat":
            exact = frac(c["amount"]) * share
            lines.append(RefLine("flat", None, None, Fraction(1), exact, half_up(exact, places)))
            continue
        m = usage[c["meter"]]
        if "price_by" not in c:
            exact = price(c, m["total"])
            lines.append(RefLine(c["type"], c["meter"], None, frac(m["total"]), exact, half_up(exact, places)))
            continue
        prop = c["price_by"]
        by = m["by"][prop]
        values = list(c["prices"])
        if c.get("default") is not None:
            values += sorted(v for v in by if v not in c["prices"])
        for v in values:
            body = c["prices"].get(v) or c["default"]
            q = by.get(v, "0")
            exact = price(body, q)
            lines.append(RefLine(body["type"], c["meter"], (prop, v), frac(q), exact, half_up(exact, places)))
    subtotal = sum((ln.amount for ln in lines), Fraction(0))
    minimum = half_up(frac(plan.get("minimum") or "0") * share, places)
    adjustment = minimum - subtotal if minimum > subtotal else Fraction(0)
    return {"lines": lines, "subtotal": subtotal, "minimum": minimum, "adjustment": adjustment,
            "total": subtotal + adjustment}  # fmt: skip
