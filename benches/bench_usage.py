"""usage_*: usage queries over 10 million events, 1000 customers, 30 days, on both backends.

The events are generated inside the engine (`numbers()`), with the same typed
columns the Rust core writes. Under `make test` (benchmarks disabled) the data
set is 100,000 events, so the queries also run as correctness checks.
No pre-aggregation (materialized rollup) is used: these are raw-table queries.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from services import ClickHouse

from meterflow.api.usage import usage_json
from meterflow.config import Settings
from meterflow.metering.catalog import MeterCatalog
from meterflow.metering.usage import parse_request, query_limits, run_usage
from meterflow.records import open_records
from meterflow.storage import Storage, open_storage
from meterflow.storage.base import SCHEMA
from meterflow.storage.embedded import EmbeddedStorage

CUSTOMERS = 1000
DAYS = 30
START = 1_780_272_000_000  # 2026-06-01 00:00 UTC
END = START + DAYS * 86_400_000
_db = itertools.count(1)


def generate_sql(n: int) -> str:
    """n api_request events spread evenly over the period, customers round robin."""
    span = END - START
    return f"""
INSERT INTO events
SELECT
    concat('bt', toString(number)) AS transaction_id,
    concat('cust_', toString(number % {CUSTOMERS})) AS customer_id,
    'api_request' AS event_type,
    toInt64({START} + intDiv(number * {span}, {n})) AS timestamp_ms,
    toDateTime(intDiv(timestamp_ms, 1000)) AS ts,
    '{{}}' AS properties,
    ['bytes'] AS num_keys,
    [toDecimal128(number % 100000, 9)] AS num_values,
    ['region', 'endpoint'] AS str_keys,
    [arrayElement(['eu', 'us', 'ap'], number % 3 + 1), arrayElement(['/a', '/b', '/c', '/d'], number % 4 + 1)]
        AS str_values
FROM numbers({n})
"""


@pytest.fixture(scope="module", params=["chdb", "clickhouse"])
def usage_data(
    request: pytest.FixtureRequest, chdb_storage: EmbeddedStorage
) -> Iterator[tuple[asyncio.AbstractEventLoop, Storage, int]]:
    n = 10_000_000 if request.config.getoption("benchmark_enable") else 100_000
    loop = asyncio.new_event_loop()
    if request.param == "chdb":
        storage: Storage = chdb_storage
        loop.run_until_complete(storage.execute("DROP TABLE IF EXISTS events"))
        for ddl in SCHEMA:
            loop.run_until_complete(storage.execute(ddl))
    else:
        ch: ClickHouse = request.getfixturevalue("clickhouse")
        db = f"mf_bench_{next(_db)}"
        ch.reset_database(db)
        storage = open_storage(Settings(storage="clickhouse", clickhouse_url=ch.url, clickhouse_database=db))
        loop.run_until_complete(storage.start())
    loop.run_until_complete(storage.execute(generate_sql(n)))
    yield loop, storage, n
    if request.param == "clickhouse":
        loop.run_until_complete(storage.close())
    loop.close()


def run(loop: asyncio.AbstractEventLoop, storage: Storage, params: dict[str, str]) -> dict[str, Any]:
    # Config meters only: the records database is never opened.
    catalog = MeterCatalog(open_records(Settings(database_url="sqlite:////nonexistent/never-opened.db")), Settings().meters)
    req = loop.run_until_complete(parse_request(params, {}, catalog, Settings()))
    return usage_json(loop.run_until_complete(run_usage(storage, req, query_limits(Settings()))))


BASE = {"customer_id": "cust_42", "meter": "bandwidth", "start": str(START), "end": str(END)}


@pytest.mark.benchmark(group="usage_month_total")
def test_month_total(benchmark: Any, usage_data: Any) -> None:
    loop, storage, n = usage_data
    out = benchmark(run, loop, storage, BASE)
    # Customer 42 holds numbers 42, 1042, ... : bytes = number % 100000.
    assert out["value"] == Decimal(sum(i % 100_000 for i in range(42, n, CUSTOMERS)))


@pytest.mark.benchmark(group="usage_month_hourly")
def test_month_hourly_series(benchmark: Any, usage_data: Any) -> None:
    loop, storage, _ = usage_data
    out = benchmark(run, loop, storage, {**BASE, "window": "HOUR", "tz": "Europe/Berlin"})
    assert len(out["series"]) == DAYS * 24
    assert sum(s["value"] for s in out["series"]) == out["value"]


@pytest.mark.benchmark(group="usage_month_group_by")
def test_month_group_by(benchmark: Any, usage_data: Any) -> None:
    loop, storage, _ = usage_data
    out = benchmark(run, loop, storage, {**BASE, "group_by": "region,endpoint"})
    assert sum(out["breakdown"].values()) == out["value"]
    assert len(out["breakdown"]) == 3  # cust_42: number % 4 is always 2 (endpoint /c)
