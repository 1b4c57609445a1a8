"""invoice_month: pricing one customer's month (5 charges) over 10 million stored events, beside its usage queries.

Ours is `price_subscription_period` end to end: the subscription's plan
version and the customer's time zone from the records database (SQLite), the
usage queries the plan needs, and the exact rating. The baseline, in the same
run, is those usage queries alone (what any pricer must wait for), so the
ratio is the share of the time the queries take: 1.0 would be a free pricer.
The data is bench_usage.py's (benches/events.py, loaded once for both); under
`make test` 100,000 events.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from events import END, START, Events, load_events
from paired import paired_ratio

from meterflow.billing.catalog import PlanCatalog
from meterflow.billing.periods import Period
from meterflow.billing.preview import price_subscription_period
from meterflow.billing.subscriptions import Subscription, Subscriptions
from meterflow.config import Settings
from meterflow.customers import Customers, validate
from meterflow.metering.catalog import MeterCatalog
from meterflow.metering.meters import configured_meters
from meterflow.metering.usage import UsageRequest, query_limits, run_usage
from meterflow.records import Records, open_records
from meterflow.storage import Storage

# Five charges over the two meters the generated api_request events feed.
PLAN: dict[str, Any] = {
    "code": "bench", "currency": "EUR", "minimum": "100.00",
    "charges": [
        {"type": "flat", "amount": "49.00"},
        {"type": "unit", "meter": "api_calls", "unit_amount": "0.0004", "free_units": "1000"},
        {"type": "graduated", "meter": "bandwidth", "tiers": [
            {"up_to": "100000000", "unit_amount": "0"},
            {"up_to": None, "unit_amount": "0.00000002", "flat_amount": "1.00"}]},
        {"type": "package", "meter": "bandwidth", "package_size": "1000000", "package_amount": "0.10"},
        {"meter": "api_calls", "price_by": "region",
         "prices": {"eu": {"type": "unit", "unit_amount": "0.001"}, "us": {"type": "volume", "tiers": [
             {"up_to": "1000", "unit_amount": "0.002"}, {"up_to": None, "unit_amount": "0.001"}]}},
         "default": {"type": "unit", "unit_amount": "0.0005"}},
    ],
}  # fmt: skip


class Deps:
    def __init__(self, storage: Storage, records: Records) -> None:
        self.settings = Settings()
        self.storage = storage
        self.meters = MeterCatalog(records, configured_meters(self.settings))
        self.plans = PlanCatalog(records, self.meters, ())
        self.subscriptions = Subscriptions(records, self.plans)


@pytest.fixture(scope="module")
def invoice_data(
    events_storage: Events, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[asyncio.AbstractEventLoop, Deps, Subscription]]:
    loop, storage, n = events_storage
    load_events(loop, storage, n)  # the set bench_usage.py queries: loaded once for both
    records = open_records(Settings(data_dir=str(Path(tmp_path_factory.mktemp("records")))))
    loop.run_until_complete(records.start())
    deps = Deps(storage, records)
    loop.run_until_complete(Customers(records).put("cust_42", validate({"timezone": "UTC"})))
    loop.run_until_complete(deps.plans.create(loop.run_until_complete(deps.plans.parse(PLAN))))
    sub = loop.run_until_complete(deps.subscriptions.create("cust_42", "bench", START))
    yield loop, deps, sub
    loop.run_until_complete(records.close())


@pytest.mark.benchmark(group="invoice_month")
def test_price_month_vs_its_usage_queries(benchmark: Any, invoice_data: Any) -> None:
    loop, deps, sub = invoice_data
    period = Period(START, END)  # June 2026, the customer's (UTC) calendar month
    limits = query_limits(deps.settings)

    def ours() -> Any:
        return loop.run_until_complete(price_subscription_period(deps, sub, period))

    async def queries() -> Any:
        calls, bandwidth = await deps.meters.get("api_calls"), await deps.meters.get("bandwidth")
        assert calls is not None and bandwidth is not None
        return await asyncio.gather(
            run_usage(deps.storage, UsageRequest("cust_42", calls, START, END, group_by=("region",)), limits),
            run_usage(deps.storage, UsageRequest("cust_42", bandwidth, START, END), limits),
        )

    def baseline() -> Any:
        return loop.run_until_complete(queries())

    priced = benchmark(ours)
    assert len(priced.lines) == 7  # flat, unit, graduated, package, and one line per region (eu, us, ap)
    calls, bandwidth = baseline()
    assert priced.lines[1].quantity == calls.value > 0 and priced.lines[2].quantity == bandwidth.value
    assert {ln.dimension for ln in priced.lines[4:]} == {("region", r) for r in ("eu", "us", "ap")}
    pairs = 3 if benchmark.disabled else 15
    benchmark.extra_info["paired_ratio"] = paired_ratio(ours, baseline, pairs)
    benchmark.extra_info["pair"] = f"price_subscription_period vs its usage queries ({deps.storage.name})"
