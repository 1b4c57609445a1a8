"""Rating: the price of one billing period's usage under a plan, a pure function of (plan, usage, period).

Rules (also in the README):
- `flat`: the charge's amount per period, prorated by the billed share of the
  period's milliseconds when the period is cut short.
- `unit`: (quantity - free_units, at least 0) x unit_amount.
- `graduated`: each tier prices the units inside it; a tier's bounds are
  "above the previous up_to, up to and including its own". A tier is reached
  when the quantity is above the previous bound (so a quantity of 0 reaches
  none), and a reached tier adds its flat_amount once.
- `volume`: the tier the whole quantity falls in (the first whose up_to is at
  least the quantity) prices every unit, plus its flat_amount; a quantity of 0
  costs nothing, as for graduated.
- `package`: every started block of package_size units costs package_amount.
- Dimensional: each value of the `price_by` property is priced on its own
  quantity with its own price (or the default; no default: not billed), one
  line per value.
- A negative quantity (a SUM over negative values) prices as 0.
- Each line's amount is computed exactly, then rounded half up to the
  currency's minor unit; subtotal = sum of the rounded lines; a `minimum`
  (prorated like flat charges) tops the subtotal up; the total is never negative.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, localcontext

from meterflow.billing.periods import ServicePeriod
from meterflow.billing.plans import (
    QUANTITY_DIGITS,
    QUANTITY_PLACES,
    ZERO,
    ChargeType,
    FlatCharge,
    Plan,
    Price,
    Tier,
    UsageCharge,
)
from meterflow.kernel.money import EXACT, round_money, round_ratio

ONE = Decimal(1)


@dataclass(frozen=True)
class MeterUsage:
    """A meter's quantity over the billed part of the period, and its quantities per property value.

    Quantities are Decimal128(38, 9) values, as usage queries return them; others raise ValueError.
    """

    total: Decimal
    # property -> value -> quantity; holds the `price_by` properties the plan needs (see Plan.usage_needs)
    by: Mapping[str, Mapping[str, Decimal]] = field(default_factory=dict)


@dataclass(frozen=True)
class TierLine:
    """What one tier (or the free and paid parts of a unit price) priced; `amount` is exact, not rounded."""

    up_to: Decimal | None
    quantity: Decimal
    unit_amount: Decimal
    flat_amount: Decimal
    amount: Decimal


@dataclass(frozen=True)
class Line:
    """One invoice line; `amount` is rounded to the currency's minor unit."""

    charge: ChargeType
    meter: str | None
    description: str
    quantity: Decimal
    amount: Decimal
    tiers: tuple[TierLine, ...] = ()
    dimension: tuple[str, str] | None = None  # (price_by property, value)
    packages: Decimal | None = None  # package lines: started blocks
    # The line's identity across invoices: the charge's position in the plan version, with the value
    # of a dimensional charge ("5:region=eu-west-1"); never the meter and type, which two charges may share.
    key: str = ""


@dataclass(frozen=True)
class PricedPeriod:
    plan: str
    currency: str
    period: ServicePeriod
    lines: tuple[Line, ...]
    subtotal: Decimal
    minimum: Decimal  # the plan's minimum, prorated and rounded like a flat charge
    minimum_adjustment: Decimal
    total: Decimal


class UsageMissing(ValueError):
    """The usage given to the pricer lacks a meter or a breakdown the plan prices."""


def _graduated(q: Decimal, tiers: tuple[Tier, ...]) -> tuple[Decimal, tuple[TierLine, ...]]:
    rows: list[TierLine] = []
    lower = ZERO
    for t in tiers:
        reached = q > lower
        top = q if t.up_to is None else min(q, t.up_to)
        inside = top - lower if reached else ZERO
        flat = t.flat_amount if reached else ZERO
        rows.append(TierLine(t.up_to, inside, t.unit_amount, flat, inside * t.unit_amount + flat))
        lower = t.up_to if t.up_to is not None else lower
    return sum((r.amount for r in rows), ZERO), tuple(rows)


def _volume(q: Decimal, tiers: tuple[Tier, ...]) -> tuple[Decimal, tuple[TierLine, ...]]:
    applied = next(i for i, t in enumerate(tiers) if t.up_to is None or q <= t.up_to)
    rows = tuple(
        TierLine(t.up_to, q, t.unit_amount, t.flat_amount, q * t.unit_amount + t.flat_amount)
        if i == applied and q > 0
        else TierLine(t.up_to, ZERO, t.unit_amount, ZERO, ZERO)
        for i, t in enumerate(tiers)
    )
    return rows[applied].amount, rows


def _exact_amount(q: Decimal, price: Price) -> tuple[Decimal, tuple[TierLine, ...], Decimal | None]:
    """The exact amount of a non-negative quantity, its tier breakdown, and the packages for package prices."""
    if price.type == "unit":
        paid = max(q - price.free_units, ZERO)
        rows = [TierLine(None, paid, price.unit_amount, ZERO, paid * price.unit_amount)]
        if price.free_units:
            rows.insert(0, TierLine(price.free_units, min(q, price.free_units), ZERO, ZERO, ZERO))
        return rows[-1].amount, tuple(rows), None
    if price.type == "package":
        blocks, rest = divmod(q, price.package_size)
        packages = blocks + (1 if rest else 0)
        return packages * price.package_amount, (), packages
    if price.type == "graduated":
        return (*_graduated(q, price.tiers), None)
    return (*_volume(q, price.tiers), None)


def _line(c: UsageCharge, price: Price, quantity: Decimal, currency: str, dim: tuple[str, str] | None,
          index: int) -> Line:  # fmt: skip
    # Within Decimal128(38, 9) every product and sum below fits EXACT's 100 digits.
    if (
        not quantity.is_finite()
        or (quantity and quantity.copy_abs().adjusted() >= QUANTITY_DIGITS)
        or quantity.scaleb(QUANTITY_PLACES) % 1
    ):
        raise ValueError(f"quantity {quantity} of meter {c.meter!r} is not a Decimal128(38, 9) value")
    amount, tiers, packages = _exact_amount(max(quantity, ZERO), price)
    key = str(index) if dim is None else f"{index}:{dim[0]}={dim[1]}"
    return Line(price.type, c.meter, c.description, quantity, round_money(amount, currency), tiers, dim, packages,
                key)  # fmt: skip


def _usage_lines(c: UsageCharge, usage: Mapping[str, MeterUsage], currency: str, index: int) -> list[Line]:
    u = usage.get(c.meter)
    if u is None:
        raise UsageMissing(f"no usage given for meter {c.meter!r}")
    if c.price_by is None:
        assert c.price is not None  # parse_plan: a charge without price_by has a price
        return [_line(c, c.price, u.total, currency, None, index)]
    by = u.by.get(c.price_by)
    if by is None:
        raise UsageMissing(f"no usage by {c.price_by!r} given for meter {c.meter!r}")
    listed = dict(c.prices)
    lines = [_line(c, p, by.get(v, ZERO), currency, (c.price_by, v), index) for v, p in c.prices]
    if c.price is not None:
        lines += [_line(c, c.price, by[v], currency, (c.price_by, v), index) for v in sorted(by) if v not in listed]
    return lines


def price_period(plan: Plan, usage: Mapping[str, MeterUsage], period: ServicePeriod) -> PricedPeriod:
    """Prices the usage of the billed part of a period; `usage` holds every meter of `plan.usage_needs()`.

    The proration of flat charges and of the minimum comes from `period`
    (its served share of the calendar period's milliseconds).
    """
    cur = plan.currency
    lines: list[Line] = []
    with localcontext(EXACT):
        for i, c in enumerate(plan.charges):
            if isinstance(c, FlatCharge):
                amount = round_ratio(c.amount, period.served_ms, period.period_ms, cur)
                lines.append(Line("flat", None, c.description, ONE, amount, key=str(i)))
            else:
                lines += _usage_lines(c, usage, cur, i)
        subtotal = sum((ln.amount for ln in lines), ZERO)
        minimum = round_ratio(plan.minimum, period.served_ms, period.period_ms, cur)
        adjustment = max(minimum - subtotal, ZERO)
        total = max(subtotal + adjustment, ZERO)
    return PricedPeriod(plan.code, cur, period, tuple(lines), round_money(subtotal, cur), minimum,
                        round_money(adjustment, cur), round_money(total, cur))  # fmt: skip
