"""Priced periods and drafts for the invoice and webhook tests, checked against the reference pricer."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from typing import Any

from meterflow.billing.invoices import Invoices
from meterflow.billing.periods import Period, ServicePeriod
from meterflow.billing.plans import parse_plan
from meterflow.billing.rating import MeterUsage, PricedPeriod, price_period
from meterflow.config import Settings
from meterflow.metering.meters import configured_meters
from tests.harness.pricing_reference import ISSUE_PLAN, reference_price

DAY = 86_400_000
JAN_2026 = Period(1_767_225_600_000, 1_767_225_600_000 + 31 * DAY)  # 2026-01-01 UTC, 31 days
# Issue 12's plan with its first three charges: flat, unit with free units, graduated.
PLAN = {**ISSUE_PLAN, "charges": ISSUE_PLAN["charges"][:3]}


def priced(api_calls: str = "312500", bandwidth: str = "2500000000", period: Period = JAN_2026) -> PricedPeriod:
    meters = {m.code: m for m in configured_meters(Settings())}
    usage = {"api_calls": MeterUsage(Decimal(api_calls)), "bandwidth": MeterUsage(Decimal(bandwidth))}
    p = price_period(parse_plan(PLAN, meters), usage, ServicePeriod(period, period.start, period.end))
    ref = reference_price(PLAN, {"api_calls": {"total": api_calls}, "bandwidth": {"total": bandwidth}},
                          period.end - period.start, period.end - period.start)  # fmt: skip
    assert Fraction(str(p.total)) == ref["total"], (p.total, ref["total"])
    return p


async def draft(invoices: Invoices, customer: str = "cust_1", subscription: str = "sub_1",
                period: Period = JAN_2026) -> dict[str, Any]:  # fmt: skip
    invoice, created = await invoices.create_draft(customer, subscription, priced(period=period))
    assert created
    return invoice
