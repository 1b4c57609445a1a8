"""usage_*: usage queries over 10 million events, 1000 customers, 30 days, on both backends.

The events are benches/events.py's generated set, loaded once for this module
and bench_invoice.py (the `events_10m` fixture). Under `make test` (benchmarks
disabled) the data set is 100,000 events, so the queries also run as
correctness checks.
No pre-aggregation (materialized rollup) is used: these are raw-table queries.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest
from events import CUSTOMERS, DAYS, END, START

from meterflow.api.usage import parse_request, usage_json
from meterflow.config import Settings
from meterflow.metering.catalog import MeterCatalog
from meterflow.metering.meters import configured_meters
from meterflow.metering.usage import query_limits, run_usage
from meterflow.records import open_records
from meterflow.storage import Storage


def run(loop: asyncio.AbstractEventLoop, storage: Storage, params: dict[str, str]) -> dict[str, Any]:
    # Config meters only: the records database is never opened.
    catalog = MeterCatalog(open_records(Settings(database_url="sqlite:////nonexistent/never-opened.db")), configured_meters(Settings()))
    req = loop.run_until_complete(parse_request(params, {}, catalog, Settings()))
    return usage_json(loop.run_until_complete(run_usage(storage, req, query_limits(Settings()))))


BASE = {"customer_id": "cust_42", "meter": "bandwidth", "start": str(START), "end": str(END)}


@pytest.mark.benchmark(group="usage_month_total")
def test_month_total(benchmark: Any, events_10m: Any) -> None:
    loop, storage, n = events_10m
    out = benchmark(run, loop, storage, BASE)
    # Customer 42 holds numbers 42, 1042, ... : bytes = number % 100000.
    assert out["value"] == Decimal(sum(i % 100_000 for i in range(42, n, CUSTOMERS)))


@pytest.mark.benchmark(group="usage_month_hourly")
def test_month_hourly_series(benchmark: Any, events_10m: Any) -> None:
    loop, storage, _ = events_10m
    out = benchmark(run, loop, storage, {**BASE, "window": "HOUR", "tz": "Europe/Berlin"})
    assert len(out["series"]) == DAYS * 24
    assert sum(s["value"] for s in out["series"]) == out["value"]


@pytest.mark.benchmark(group="usage_month_group_by")
def test_month_group_by(benchmark: Any, events_10m: Any) -> None:
    loop, storage, _ = events_10m
    out = benchmark(run, loop, storage, {**BASE, "group_by": "region,endpoint"})
    assert sum(out["breakdown"].values()) == out["value"]
    assert len(out["breakdown"]) == 3  # cust_42: number % 4 is always 2 (endpoint /c)
