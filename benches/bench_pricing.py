"""pricing_month: rating one customer's month (5 charges, 10 priced regions) beside float and Decimal baselines.

The engine prices exactly (Decimal, exact tiers, half-up rounding per line,
minimum) and builds typed lines with tier breakdowns. Baselines in the same
run: the same rules in floats (what a quick script would do, inexact), and
a bare Decimal sum of the 14 quantities (the least any exact pricer touches).
The usage query this will sit behind is measured in bench_usage.py.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import pytest

from meterflow.billing.periods import Period, ServicePeriod
from meterflow.billing.plans import parse_plan
from meterflow.billing.rating import MeterUsage, price_period
from meterflow.billing.render import priced_period_json
from meterflow.metering.meters import DEFAULT_METERS, parse_meter

METERS = {m.code: m for m in (parse_meter(d, "config") for d in DEFAULT_METERS)}
REGIONS = [f"region-{i}" for i in range(10)]
PLAN_DOC: dict[str, Any] = {
    "code": "bench", "currency": "EUR", "minimum": "100.00",
    "charges": [
        {"type": "flat", "amount": "49.00"},
        {"type": "unit", "meter": "api_calls", "unit_amount": "0.0004", "free_units": "10000"},
        {"type": "graduated", "meter": "bandwidth", "tiers": [
            {"up_to": "1000000000", "unit_amount": "0"},
            {"up_to": "10000000000", "unit_amount": "0.00000002", "flat_amount": "1.00"},
            {"up_to": "100000000000", "unit_amount": "0.000000015"},
            {"up_to": "1000000000000", "unit_amount": "0.00000001"},
            {"up_to": None, "unit_amount": "0.000000005"}]},
        {"type": "volume", "meter": "compute_time", "tiers": [
            {"up_to": "3600000", "unit_amount": "0.00001"},
            {"up_to": "36000000", "unit_amount": "0.000008", "flat_amount": "2.00"},
            {"up_to": None, "unit_amount": "0.000006", "flat_amount": "5.00"}]},
        {"meter": "api_calls", "price_by": "region",
         "prices": {r: {"type": "graduated", "tiers": [
             {"up_to": "1000", "unit_amount": "0"},
             {"up_to": None, "unit_amount": f"0.00{i + 1}"}]} for i, r in enumerate(REGIONS)},
         "default": {"type": "unit", "unit_amount": "0.0005"}},
    ],
}  # fmt: skip
PLAN = parse_plan(PLAN_DOC, METERS)
BY_REGION = {r: Decimal(1000 + 337 * i) for i, r in enumerate(REGIONS)}
USAGE = {
    "api_calls": MeterUsage(sum(BY_REGION.values(), Decimal(0)), {"region": BY_REGION}),
    "bandwidth": MeterUsage(Decimal("54321098765.5")),
    "compute_time": MeterUsage(Decimal(4_000_000)),
}
MONTH = ServicePeriod(Period(0, 30 * 86_400_000), 0, 30 * 86_400_000)


def _float_tiers(tiers: list[dict[str, Any]], q: float, graduated: bool) -> float:
    lower, total = 0.0, 0.0
    for t in tiers:
        upper = math.inf if t["up_to"] is None else float(t["up_to"])
        unit, flat = float(t["unit_amount"]), float(t.get("flat_amount", 0))
        if graduated and q > lower:
            total += (min(q, upper) - lower) * unit + flat
        elif not graduated and lower < q <= upper:
            return q * unit + flat
        lower = upper
    return total


def float_price(doc: dict[str, Any], usage: dict[str, MeterUsage]) -> float:
    """The same rules in binary floating point: round(x, 2) per line, inexact."""
    c = doc["charges"]
    api = float(usage["api_calls"].total)
    lines = [
        float(c[0]["amount"]),
        max(api - float(c[1]["free_units"]), 0.0) * float(c[1]["unit_amount"]),
        _float_tiers(c[2]["tiers"], float(usage["bandwidth"].total), True),
        _float_tiers(c[3]["tiers"], float(usage["compute_time"].total), False),
    ]
    lines += [_float_tiers(c[4]["prices"][r]["tiers"], float(q), True)
              for r, q in usage["api_calls"].by["region"].items()]  # fmt: skip
    subtotal = sum(round(x, 2) for x in lines)
    return max(subtotal, float(doc["minimum"]))


def decimal_sum(usage: dict[str, MeterUsage]) -> Decimal:
    total = sum((u.total for u in usage.values()), Decimal(0))
    return total + sum((q for u in usage.values() for by in u.by.values() for q in by.values()), Decimal(0))


PATHS = {
    "engine": lambda: price_period(PLAN, USAGE, MONTH),
    "engine_json": lambda: priced_period_json(price_period(PLAN, USAGE, MONTH)),
    "float_rules": lambda: float_price(PLAN_DOC, USAGE),
    "decimal_sum": lambda: decimal_sum(USAGE),
}


@pytest.mark.benchmark(group="pricing_month", min_rounds=200, disable_gc=True, warmup=True)
@pytest.mark.parametrize("name", list(PATHS))
def test_pricing_month(benchmark: Any, name: str) -> None:
    benchmark(PATHS[name])


def test_float_baseline_prices_the_same_month() -> None:
    """The float baseline does the engine's work: 14 lines, same total within float error."""
    p = price_period(PLAN, USAGE, MONTH)
    assert len(p.lines) == 14
    assert abs(float(p.total) - float_price(PLAN_DOC, USAGE)) < 0.005
