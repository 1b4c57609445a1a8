"""TIME_WEIGHTED_SUM on chdb and ClickHouse 18.16, against a reference written from the definition."""

from __future__ import annotations

import random
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from meterflow import samples
from meterflow.api.usage import parse_request, usage_json
from meterflow.billing.plans import parse_plan
from meterflow.config import Settings
from meterflow.kernel.rust import Limits, decode_batch
from meterflow.metering.catalog import MeterCatalog
from meterflow.metering.meters import parse_meter
from meterflow.metering.usage import query_limits, run_usage
from meterflow.records import open_records
from meterflow.storage import Storage

BERLIN = ZoneInfo("Europe/Berlin")
HOUR = 3_600_000
LIMITS = Limits(max_age_ms=20 * 365 * 86_400_000)
GAUGE = parse_meter({"code": "gb_hours", "event_type": "storage", "aggregation": "TIME_WEIGHTED_SUM",
                     "property": "gb_stored", "unit": "GB-hours", "group_by": ["region"]}, "config")  # fmt: skip
# Over the night Berlin's clocks go back (2026-10-25): the second day has 25 hours.
P_START = int(datetime(2026, 10, 24, tzinfo=BERLIN).timestamp() * 1000)
P_END = int(datetime(2026, 10, 27, tzinfo=BERLIN).timestamp() * 1000)


def reference(events: list[dict[str, Any]], start: int, end: int, region: str | None = None) -> Decimal:
    """Each report holds from its instant until the next report (by time, then transaction id); the
    integral of the held values over [start, end) in value-hours, rounded half to even to 9 places."""
    once = {e["transaction_id"]: e for e in events}.values()
    mine = sorted((e for e in once if region is None or e["properties"].get("region", "") == region),
                  key=lambda e: (e["timestamp"], e["transaction_id"]))  # fmt: skip
    total = Fraction(0)
    for e, nxt in zip(mine, [*mine[1:], None], strict=True):
        held_from, held_to = e["timestamp"], (nxt["timestamp"] if nxt else end)
        overlap = min(held_to, end) - max(held_from, start)
        if overlap > 0:
            total += Fraction(str(e["properties"]["gb_stored"])) * overlap
    hours = total / HOUR
    return (Decimal(hours.numerator) / Decimal(hours.denominator)).quantize(Decimal("1e-9"), ROUND_HALF_EVEN)


def gauge_events(seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    times = [rng.randrange(P_START - 2 * 86_400_000, P_END + 86_400_000) for _ in range(60)]
    times += [P_START, P_START - 1, P_END - 1, P_END, times[0]]  # edges and a tie
    return [{"transaction_id": f"g{seed}_{i}", "customer_id": "cust_gauge", "event_type": "storage",
             "timestamp": t, "properties": {"gb_stored": float(Decimal(rng.randrange(0, 10**7)) / 1000),
                                            "region": rng.choice(["eu", "us"])}}
            for i, t in enumerate(times)]  # fmt: skip


async def store(storage: Storage, events: list[dict[str, Any]]) -> None:
    b = decode_batch(samples.body(events), P_END + 2 * 86_400_000, LIMITS)
    assert not b.failed, b.failed[:3]
    await storage.insert_events(b.storage_rows())


async def usage(storage: Storage, **params: str) -> dict[str, Any]:
    catalog = MeterCatalog(open_records(Settings(database_url="sqlite:////nonexistent/never-opened.db")), (GAUGE,))
    q = {"customer_id": "cust_gauge", "meter": "gb_hours", "start": str(P_START), "end": str(P_END), **params}
    return usage_json(await run_usage(storage, await parse_request(q, {}, catalog, Settings()), query_limits(Settings())))


@pytest.mark.parametrize("seed", [1, 2])
async def test_time_weighted_sum_equals_the_reference_in_total_breakdown_and_windows(
    storage: Storage, seed: int
) -> None:
    events = gauge_events(seed)
    await store(storage, events)
    await store(storage, events[:10])  # retries: every transaction counts once
    got = await usage(storage, group_by="region", window="DAY", tz="Europe/Berlin")
    assert Decimal(str(got["value"])) == reference(events, P_START, P_END)
    assert {k: Decimal(str(v)) for k, v in got["breakdown"].items()} == {
        r: reference(events, P_START, P_END, r) for r in ("eu", "us")
    }
    assert [(w["end"] - w["start"]) // HOUR for w in got["series"]] == [24, 25, 24]
    assert [Decimal(str(w["value"])) for w in got["series"]] == [
        reference(events, w["start"], w["end"]) for w in got["series"]
    ]


async def test_the_last_value_before_the_period_is_carried_into_it(storage: Storage) -> None:
    """One report of 2.5 GB a day before the period: the whole period holds it; nothing reported: 0."""
    e = {"transaction_id": "only", "customer_id": "cust_gauge", "event_type": "storage",
         "timestamp": P_START - 86_400_000, "properties": {"gb_stored": 2.5, "region": "eu"}}  # fmt: skip
    assert Decimal(str((await usage(storage))["value"])) == 0
    await store(storage, [e])
    assert Decimal(str((await usage(storage))["value"])) == Decimal("2.5") * 73  # 73 hours
    hour = await usage(storage, start=str(P_START), end=str(P_START + 1))  # one ms: needs more than 9 places
    assert Decimal(str(hour["value"])) == Decimal("0.000000694")  # 2.5 / 3.6e6 = 6.94e-7, half even


def test_a_time_weighted_meter_is_priceable() -> None:
    plan = parse_plan({"code": "storage", "currency": "EUR", "charges": [
        {"type": "unit", "meter": "gb_hours", "unit_amount": "0.0001"}]}, {"gb_hours": GAUGE})  # fmt: skip
    assert plan.usage_needs() == {"gb_hours": ()}
