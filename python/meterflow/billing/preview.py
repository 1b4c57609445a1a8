"""Pricing a subscription's period: subscription + plan version + customer time zone -> usage queries -> price.

The one place that gathers what the pure pricer (`rating.price_period`)
needs: the plan version the subscription bills with, the billing period in
the customer's time zone cut to the part the subscription covers, and each
priced meter's quantity from the same usage queries as `GET /v1/usage`
(every transaction once), broken down by the `price_by` properties the plan
prices. The upcoming invoice uses it for the current period; invoicing uses
it to close ended ones.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol
from zoneinfo import ZoneInfo

from meterflow.billing.catalog import PlanCatalog
from meterflow.billing.periods import Period, ServicePeriod, cut, period_containing, subscription_periods, zone_at
from meterflow.billing.plans import Plan
from meterflow.billing.rating import MeterUsage, PricedPeriod, price_period
from meterflow.billing.subscriptions import Subscription, Subscriptions
from meterflow.config import Settings
from meterflow.metering.catalog import MeterCatalog
from meterflow.metering.usage import UsageRequest, query_limits, run_usage
from meterflow.storage.base import Storage


class PricingDeps(Protocol):
    """What pricing reads; the worker's `Runtime` has all of it."""

    @property
    def settings(self) -> Settings: ...
    @property
    def storage(self) -> Storage: ...
    @property
    def meters(self) -> MeterCatalog: ...
    @property
    def plans(self) -> PlanCatalog: ...
    @property
    def subscriptions(self) -> Subscriptions: ...


class NotInPeriod(ValueError):
    """The subscription does not cover any part of the period asked for."""


@dataclass(frozen=True)
class BillingContext:
    """A subscription's plan version and the customer's time zones: all that periods and prices depend on."""

    subscription: Subscription
    plan: Plan
    zones: tuple[tuple[int, ZoneInfo], ...]  # [(changed_at, zone)] oldest first

    @property
    def tz(self) -> ZoneInfo:
        """The zone in force now (for labels and documents)."""
        return self.zones[-1][1]

    def periods(self, until: int) -> list[Period]:
        """The subscription's billing periods that begin before `until` (see `subscription_periods`)."""
        return subscription_periods(self.plan.interval, self.zones, self.subscription.start, until)

    def period_at(self, at: int) -> Period:
        """The billing period holding the instant `at` (at or after the subscription's start)."""
        if at < self.subscription.start:
            return period_containing(self.plan.interval, zone_at(self.zones, at), at)
        return self.periods(at + 1)[-1]


async def billing_context(deps: PricingDeps, sub: Subscription) -> BillingContext:
    plan = await deps.plans.get_version(sub.plan, sub.plan_version)
    zones = tuple((at, ZoneInfo(z)) for at, z in await deps.subscriptions.timezone_history(sub.customer_id))
    return BillingContext(sub, plan, zones)


async def meter_usage(deps: PricingDeps, plan: Plan, customer_id: str, start: int, end: int) -> dict[str, MeterUsage]:
    """Each meter the plan prices over [start, end): its total, and its quantities per `price_by` value.
    The queries run at once: one per meter, or one per `price_by` property (each with the total)."""
    limits = query_limits(deps.settings)
    needs = plan.usage_needs()
    requests: list[tuple[str, str | None, UsageRequest]] = []
    for code, props in needs.items():
        meter = await deps.meters.at(code, start)
        if meter is None:
            raise LookupError(f"plan {plan.code!r} prices meter {code!r}, which no longer exists")
        for p in props or (None,):
            requests.append((code, p, UsageRequest(customer_id, meter, start, end, group_by=(p,) if p else ())))
    answers = await asyncio.gather(*(run_usage(deps.storage, r, limits) for _, _, r in requests))
    totals: dict[str, Decimal] = {}
    by: dict[str, dict[str, dict[str, Decimal]]] = {code: {} for code in needs}
    for (code, prop, _), u in zip(requests, answers, strict=True):
        totals[code] = u.value
        if prop is not None:
            by[code][prop] = {k[0]: v for k, v in (u.breakdown or {}).items()}
    return {code: MeterUsage(totals[code], by[code]) for code in needs}


async def price_subscription_period(deps: PricingDeps, sub: Subscription, period: Period) -> PricedPeriod:
    """Prices the part of `period` (a calendar period of the subscription's plan, in the customer's
    time zone) that `sub` covers; NotInPeriod if it covers none of it."""
    ctx = await billing_context(deps, sub)
    return await price_service_period(deps, ctx, period)


async def price_service_period(deps: PricingDeps, ctx: BillingContext, period: Period) -> PricedPeriod:
    """As `price_subscription_period`, with the context already read."""
    part: ServicePeriod | None = cut(period, ctx.subscription.start, ctx.subscription.end)
    if part is None:
        raise NotInPeriod(f"subscription {ctx.subscription.id} does not cover [{period.start}, {period.end})")
    usage = await meter_usage(deps, ctx.plan, ctx.subscription.customer_id, part.start, part.end)
    return price_period(ctx.plan, usage, part)
