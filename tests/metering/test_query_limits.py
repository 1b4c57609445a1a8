"""Bounded reads: parameter limits before any SQL, per-query limits, reads apart from inserts,
and statements and credentials out of ClickHouse URLs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from meterflow import samples
from meterflow.api.usage import parse_request
from meterflow.config import Settings
from meterflow.kernel.rust import decode_batch
from meterflow.metering.catalog import MeterCatalog
from meterflow.metering.meters import configured_meters
from meterflow.metering.usage import UsageError, run_usage
from meterflow.records import open_records
from meterflow.storage import Storage, StorageError, open_storage
from meterflow.storage.base import QueryLimitExceeded, QueryLimits, quote
from tests.harness.backends import Backend
from tests.harness.http import JSON
from tests.harness.meterflow import MeterFlowServer
from tests.harness.processes import ClickHouse

# Seconds of work on any machine: a time limit stops it long before it ends.
HEAVY = "SELECT count() AS n FROM numbers(100000000000) WHERE sipHash64(number) % 7 = 1"
DAY = 86_400_000
# Config meters only: the catalog never opens this records database (nothing connects to it).
CONFIG_ONLY = open_records(Settings(database_url="sqlite:////nonexistent/never-opened.db"))


def limits(**kw: int) -> QueryLimits:
    base = {"max_execution_s": 10, "max_query_bytes": 262_144, "max_result_rows": 100_000}
    return QueryLimits(**{**base, **kw})


async def test_an_in_list_of_2000_values_is_sent_in_the_body(storage: Storage) -> None:
    ids = [f"inv_{i:020d}" for i in range(2000)]  # ~56 KB of SQL, past any URL limit
    sql = f"SELECT count() AS n FROM events WHERE transaction_id IN ({', '.join(quote(i) for i in ids)})"
    assert await storage.query(sql) == [{"n": 0}]
    assert await storage.query(sql, limits()) == [{"n": 0}]


async def test_credentials_authenticate_from_headers(clickhouse: ClickHouse) -> None:
    db = "mf_credentials"
    clickhouse.reset_database(db)
    good = open_storage(Settings(storage="clickhouse", clickhouse_url=clickhouse.url, clickhouse_database=db,
                                 clickhouse_user="meterflow", clickhouse_password="mf-secret"))  # fmt: skip
    await good.start()
    try:
        assert await good.query("SELECT 1 AS one") == [{"one": 1}]
    finally:
        await good.close()
    bad = open_storage(Settings(storage="clickhouse", clickhouse_url=clickhouse.url, clickhouse_database=db,
                                clickhouse_user="meterflow", clickhouse_password="wrong"))  # fmt: skip
    with pytest.raises(StorageError):
        await bad.start()
    await bad.close()


async def test_no_statement_or_secret_in_the_request_line() -> None:
    """What goes on the wire, read from a socket: the URL holds neither the query nor the key."""
    seen: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
        seen.append(head + await reader.readexactly(length))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\n{\"one\":1}\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    s = open_storage(Settings(storage="clickhouse", clickhouse_url=f"http://127.0.0.1:{port}",
                              clickhouse_user="meterflow", clickhouse_password="mf-secret"))  # fmt: skip
    try:
        await s.start()  # the schema's DDL
        await s.query("SELECT 1 AS one", limits())
    finally:
        await s.close()
        server.close()
    assert seen
    for request in seen:
        line, _, rest = request.partition(b"\r\n")
        assert b"mf-secret" not in line and b"SELECT" not in line and b"CREATE" not in line, line
        assert b"x-clickhouse-key: mf-secret" in rest.lower()
    assert seen[-1].endswith(b"SELECT 1 AS one FORMAT JSONEachRow")
    assert b"max_execution_time=10" in seen[-1].partition(b"\r\n")[0]


async def test_a_read_stops_at_its_time_limit(storage: Storage) -> None:
    with pytest.raises(QueryLimitExceeded):
        await storage.query(HEAVY, limits(max_execution_s=1))


async def test_a_read_stops_at_its_result_rows(storage: Storage) -> None:
    with pytest.raises(QueryLimitExceeded):
        await storage.query("SELECT number FROM numbers(1000)", limits(max_result_rows=10))


async def test_a_read_stops_at_its_size_before_it_is_sent(storage: Storage) -> None:
    with pytest.raises(QueryLimitExceeded):
        await storage.query("SELECT 1 AS one WHERE 'x' != " + quote("y" * 2000), limits(max_query_bytes=1000))


async def test_the_row_limit_counts_answer_rows_not_events(storage: Storage) -> None:
    """A customer with more events than the limit still gets a total; a breakdown with more
    groups than the limit is refused (the per-transaction subquery is not an answer)."""
    now = samples.now_ms()
    events = samples.batch(60, seed=3, prefix="rowlimit", ts=now)
    for e in events:
        e["customer_id"] = "rowlimit"
    await storage.insert_events(decode_batch(samples.body(events), now).storage_rows())
    catalog = MeterCatalog(CONFIG_ONLY, configured_meters(Settings()))
    params = {"customer_id": "rowlimit", "meter": "api_calls", "start": str(now - DAY), "end": str(now + DAY)}
    tight = limits(max_result_rows=4)
    req = await parse_request(params, {}, catalog, Settings())
    assert (await run_usage(storage, req, tight)).value == 60
    grouped = await parse_request({**params, "group_by": "endpoint,method,region"}, {}, catalog, Settings())
    assert len((await run_usage(storage, grouped, limits())).breakdown or {}) > 4
    with pytest.raises(QueryLimitExceeded):
        await run_usage(storage, grouped, tight)


async def test_an_insert_does_not_wait_for_an_expensive_read(storage: Storage) -> None:
    now = samples.now_ms()
    rows = decode_batch(samples.body(samples.batch(10, ts=now)), now).storage_rows()
    read = asyncio.ensure_future(storage.query(HEAVY, limits(max_execution_s=4)))
    deadline = time.monotonic() + 30
    while not await running(storage):  # the read holds its engine from here on
        assert time.monotonic() < deadline, "the read was never seen running beside another statement"
        await asyncio.sleep(0.05)
    await storage.insert_events(rows)
    # With one shared executor, the insert (and the poll above) ran only after the read gave up.
    assert not read.done()
    with pytest.raises(QueryLimitExceeded):
        await read


async def running(storage: Storage) -> bool:
    sql = "SELECT count() AS n FROM system.processes WHERE query LIKE '%sipHash64(number)%' AND query NOT LIKE '%processes%'"
    return bool((await storage.query(sql))[0]["n"])


@pytest.mark.parametrize(
    ("params", "filters", "field"),
    [
        ({"group_by": ",".join(["region"] * 5000)}, {}, "group_by"),
        ({"group_by": "region,region"}, {}, "group_by"),
        ({"group_by": "region,method,endpoint,region"}, {}, "group_by"),
        ({}, {"region": [f"r{i}" for i in range(101)]}, "filter"),
        ({}, {"region": ["a"] * 60, "method": ["b"] * 41}, "filter"),
        ({}, {"region": ["eu", "eu"]}, "filter[region]"),
        ({}, {"region": ["eu"], "method": ["GET", "POST", "GET"]}, "filter[method]"),
    ],
)
async def test_too_many_or_repeated_values_are_refused(
    params: dict[str, str], filters: dict[str, list[str]], field: str
) -> None:
    catalog = MeterCatalog(CONFIG_ONLY, configured_meters(Settings()))
    base = {"customer_id": "c", "meter": "api_calls", "start": "1", "end": "2"}
    with pytest.raises(UsageError) as e:
        await parse_request({**base, **params}, filters, catalog, Settings())
    assert e.value.field == field
    assert f"`{field}" in e.value.message


async def test_the_filter_limit_is_a_setting() -> None:
    catalog = MeterCatalog(CONFIG_ONLY, configured_meters(Settings()))
    base = {"customer_id": "c", "meter": "api_calls", "start": "1", "end": "2"}
    filters = {"region": [f"r{i}" for i in range(500)]}
    req = await parse_request(base, filters, catalog, Settings(usage_max_filter_values=500))
    assert len(req.filters[0][1]) == 500
    with pytest.raises(UsageError):
        await parse_request(base, filters, catalog, Settings(usage_max_filter_values=499))


def test_repeated_group_by_answers_400_over_http(server: MeterFlowServer) -> None:
    params: dict[str, Any] = {"customer_id": "c", "meter": "api_calls", "start": 0, "end": DAY,
                              "group_by": ",".join(["region"] * 5000)}  # fmt: skip
    r = httpx.get(f"{server.url}/v1/usage", params=params, headers=server.auth, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_parameter" and "`group_by`" in r.json()["message"]
    many: list[tuple[str, str | int | float | bool | None]] = [("customer_id", "c"), ("meter", "api_calls"), ("start", "0"), ("end", str(DAY))]
    many += [("filter[region]", f"r{i}") for i in range(101)]
    r = httpx.get(f"{server.url}/v1/usage", params=many, headers=server.auth, timeout=30)
    assert r.status_code == 400 and "100" in r.json()["message"], r.text


def test_a_read_past_its_limits_answers_422_over_http(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer]
) -> None:
    server = start_server(make_backend("embedded"), MF_USAGE_MAX_RESULT_ROWS="1")
    now = samples.now_ms()
    events = samples.batch(20, seed=5, prefix="http422", ts=now)
    for e in events:
        e["customer_id"] = "c422"
    r = httpx.post(f"{server.url}/v1/events", content=samples.body(events),
                   headers={**JSON, **server.auth}, timeout=30)  # fmt: skip
    assert r.json()["accepted"] == 20
    params: dict[str, Any] = {"customer_id": "c422", "meter": "api_calls", "start": now - DAY, "end": now + DAY}
    total = httpx.get(f"{server.url}/v1/usage", params=params, headers=server.auth, timeout=30)
    assert total.status_code == 200 and total.json()["value"] == 20
    grouped = httpx.get(f"{server.url}/v1/usage", params={**params, "group_by": "region,endpoint"},
                        headers=server.auth, timeout=30)  # fmt: skip
    assert grouped.status_code == 422, grouped.text
    body = grouped.json()
    assert body["error"] == "usage_query_too_expensive" and "Code:" not in body["message"]
