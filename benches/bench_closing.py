"""closing_1000: closing 1,000 ended periods (draft, finalize with a number, outbox row, archive JSON) beside pricing them.

Ours is `Closer.run` as the server's closing task runs it: every
subscription's ended June 2026 becomes a finalized invoice, numbered in the
finalizing transaction, with one webhook delivery in the outbox (one endpoint
is registered) and its JSON copy in the archive store (a directory). The
baseline, in the same run and in alternation (`benches/paired.py`), prices the
same 1,000 periods with `price_subscription_period` and writes nothing, so the
ratio is the share of closing that pricing takes: what is left is the write
path. Each closing round starts from empty invoice tables (reset untimed).

Events are benches/events.py's generator (1,000 customers round robin) on chdb
with records on SQLite, and on ClickHouse with records on PostgreSQL. Under
`make test` (benchmarks disabled) 20 customers are closed as a correctness
check: 20 invoices numbered 1..20, totals equal to the pricing baseline's.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from decimal import Decimal
from ipaddress import ip_network
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from events import CUSTOMERS, END, START, load_events
from paired import paired_ratio_of_parts

from meterflow.archive import DirectoryStore
from meterflow.billing.catalog import PlanCatalog
from meterflow.billing.closing import Closer, Due
from meterflow.billing.credit_notes import CreditNotes
from meterflow.billing.destinations import Destinations
from meterflow.billing.periods import Period
from meterflow.billing.preview import price_subscription_period
from meterflow.billing.rating import PricedPeriod
from meterflow.billing.subscriptions import ID_PREFIX, Subscription, Subscriptions
from meterflow.billing.webhooks import Webhooks
from meterflow.config import Settings
from meterflow.customers import Customers, validate
from meterflow.kernel.clock import SYSTEM
from meterflow.metering.catalog import MeterCatalog
from meterflow.metering.meters import configured_meters
from meterflow.records import Records, open_records
from meterflow.records.tables import customers as customers_table
from meterflow.records.tables import invoice_numbers, invoices, subscriptions, webhook_attempts, webhook_deliveries
from meterflow.runtime import ClosingRuntime, open_invoices
from meterflow.storage import Storage, open_storage
from meterflow.storage.embedded import EmbeddedStorage
from tests.harness.processes import ClickHouse, PostgreSQL

_db = itertools.count(1)
T = TypeVar("T")
PERIOD = Period(START, END)  # June 2026 in UTC, the customers' time zone
PART = 10  # periods per pair of the guarded ratio: 100 pairs of about a second each
AT = END + Settings().invoice_grace_s * 1000  # June's grace has just passed: close and finalize it
# Four charges over the two meters the generated api_request events feed.
PLAN: dict[str, Any] = {
    "code": "closing", "currency": "EUR", "minimum": "60.00",
    "charges": [
        {"type": "flat", "amount": "49.00"},
        {"type": "unit", "meter": "api_calls", "unit_amount": "0.0004", "free_units": "10"},
        {"type": "graduated", "meter": "bandwidth", "tiers": [
            {"up_to": "1000000", "unit_amount": "0"},
            {"up_to": None, "unit_amount": "0.00002", "flat_amount": "1.00"}]},
        {"meter": "api_calls", "price_by": "region",
         "prices": {"eu": {"type": "unit", "unit_amount": "0.001"}, "us": {"type": "unit", "unit_amount": "0.002"}},
         "default": {"type": "unit", "unit_amount": "0.0005"}},
    ],
}  # fmt: skip

Closing = tuple[str, asyncio.AbstractEventLoop, ClosingRuntime, list[Subscription]]


@pytest.fixture(scope="module", params=["chdb+sqlite", "clickhouse+postgresql"])
def closing_data(
    request: pytest.FixtureRequest, chdb_storage: EmbeddedStorage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Closing]:
    bench = bool(request.config.getoption("benchmark_enable"))
    customers, n = (CUSTOMERS, 1_000_000) if bench else (20, 20_000)
    loop = asyncio.new_event_loop()
    if request.param.startswith("chdb"):
        storage: Storage = chdb_storage
        settings = Settings(data_dir=str(tmp_path_factory.mktemp("records")))
    else:
        ch: ClickHouse = request.getfixturevalue("clickhouse")
        pg: PostgreSQL = request.getfixturevalue("postgres")
        db = f"mf_bench_closing_{next(_db)}"
        ch.reset_database(db)
        settings = Settings(storage="clickhouse", clickhouse_url=ch.url, clickhouse_database=db,
                            database_url=pg.new_database())  # fmt: skip
        storage = open_storage(settings)
        loop.run_until_complete(storage.start())
    load_events(loop, storage, n)  # the one chdb: bench_usage.py's 10M set is loaded again after this
    records = open_records(settings)
    archive = DirectoryStore(Path(tmp_path_factory.mktemp("archive")))
    loop.run_until_complete(records.start())
    loop.run_until_complete(archive.start())
    meters = MeterCatalog(records, configured_meters(settings))
    plans = PlanCatalog(records, meters, ())
    rt = ClosingRuntime(settings, storage, records, meters, plans, Subscriptions(records, plans),
                        open_invoices(settings, records, archive, Customers(records), meters), CreditNotes(records),
                        Customers(records), SYSTEM)  # fmt: skip

    async def setup() -> list[Subscription]:
        await plans.create(await plans.parse(PLAN))
        # The endpoint is never sent to (the bench counts the outbox row): loopback allow-listed to register it.
        loopback = Destinations(frozenset({"127.0.0.1"}), (ip_network("127.0.0.1/32"),))
        await Webhooks(records, loopback).register("http://127.0.0.1:9/never-sent", ["invoice.finalized"], None)
        await Customers(records).put("cust_0", validate({"timezone": "UTC"}))
        first = await rt.subscriptions.create("cust_0", "closing", START)
        return [first, *await _copy_subscriber(records, first, customers - 1)]

    subs = loop.run_until_complete(setup())
    yield request.param, loop, rt, subs
    loop.run_until_complete(records.close())
    if not request.param.startswith("chdb"):
        loop.run_until_complete(storage.close())
    loop.close()


async def _copy_subscriber(records: Records, first: Subscription, n: int) -> list[Subscription]:
    """cust_1..cust_n, each a copy of the API-made customer and subscription `first`, inserted in one
    transaction: one API call per customer made the setup (not the closing) most of the bench's time."""
    async with records.begin() as conn:
        cust = dict((await conn.execute(sa.select(customers_table).where(customers_table.c.id == first.customer_id)))
                    .mappings().one())  # fmt: skip
        sub = dict((await conn.execute(sa.select(subscriptions).where(subscriptions.c.id == first.id)))
                   .mappings().one())  # fmt: skip
        new_customers = [{**cust, "id": f"cust_{i}"} for i in range(1, n + 1)]
        new_subs = [{**sub, "id": f"{ID_PREFIX}{secrets.token_hex(12)}", "customer_id": f"cust_{i}"}
                    for i in range(1, n + 1)]  # fmt: skip
        if n:
            await conn.execute(sa.insert(customers_table), new_customers)
            await conn.execute(sa.insert(subscriptions), new_subs)
    return [replace(first, id=row["id"], customer_id=row["customer_id"]) for row in new_subs]


async def _reset(rt: ClosingRuntime) -> None:
    """Empty invoice tables and outbox: the next round closes the same periods afresh."""
    async with rt.records.begin() as conn:
        for table in (webhook_attempts, webhook_deliveries, invoices, invoice_numbers):
            await conn.execute(sa.delete(table))


async def _price(rt: ClosingRuntime, sub: Subscription) -> PricedPeriod:
    return await price_subscription_period(rt, sub, PERIOD)


class ClosingClock:
    """closing_1000's timer: it advances only while periods are being closed, so the one pass that
    closes the 1,000 periods interleaved with pricing them (the guarded ratio) times the closing alone."""

    def __init__(self) -> None:
        self.elapsed = 0.0

    def __call__(self) -> float:
        return self.elapsed

    def timed(self, fn: Callable[[], T]) -> T:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.elapsed += time.perf_counter() - t0


CLOSING_CLOCK = ClosingClock()


@pytest.mark.benchmark(group="closing_1000", timer=CLOSING_CLOCK)
def test_close_1000_periods_vs_pricing_them(benchmark: Any, closing_data: Closing) -> None:
    """One pass closes the 1,000 periods as `Closer.run` does (`due`, then `close` each), in 100 parts of
    PART; each part's close is paired with pricing the same periods (alternating which goes first). The
    timed closing is `due` plus the parts' closes (CLOSING_CLOCK); the ratio is the median part's."""
    backends, loop, rt, subs = closing_data
    closer = Closer(rt)
    priced: dict[str, Decimal] = {}

    def close_part(part: list[Due]) -> None:
        outcomes = CLOSING_CLOCK.timed(lambda: [loop.run_until_complete(closer.close(d)) for d in part])
        assert outcomes == ["finalized"] * len(part)

    def price_part(part: list[Due]) -> None:
        for d in part:
            priced[d.subscription.id] = loop.run_until_complete(_price(rt, d.subscription)).total

    def close_all_paired() -> float:
        due = CLOSING_CLOCK.timed(lambda: loop.run_until_complete(closer.due(AT)))
        assert len(due) == len(subs) and all(d.final for d in due)
        return paired_ratio_of_parts([due[i : i + PART] for i in range(0, len(due), PART)], close_part, price_part)

    loop.run_until_complete(_reset(rt))
    benchmark.extra_info["paired_ratio"] = benchmark.pedantic(close_all_paired, rounds=1, iterations=1)

    async def closed() -> tuple[list[dict[str, Any]], int]:
        async with rt.records.connect() as conn:
            rows = (await conn.execute(sa.select(invoices.c.subscription_id, invoices.c.number, invoices.c.status,
                                                 invoices.c.total))).mappings().all()  # fmt: skip
            outbox = (await conn.execute(sa.select(sa.func.count()).select_from(webhook_deliveries))).scalar_one()
        return [dict(r) for r in rows], int(outbox)

    rows, outbox = loop.run_until_complete(closed())
    assert {r["status"] for r in rows} == {"finalized"} and outbox == len(subs)
    assert sorted(int(r["number"].rsplit("-", 1)[1]) for r in rows) == list(range(1, len(subs) + 1))
    assert {r["subscription_id"]: Decimal(r["total"]) for r in rows} == priced  # each total is its period priced
    assert min(priced.values()) >= Decimal("60.00")  # the minimum holds
    assert len(loop.run_until_complete(closer.due(AT))) == 0  # nothing is left to close
    # One guarded ratio per backend pair: `benches/ratios.py` names a ratio by its group and pair.
    benchmark.extra_info["pair"] = f"closing 1,000 periods vs pricing them ({backends})"
    benchmark.extra_info["periods"] = len(subs)
