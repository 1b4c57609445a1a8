"""Usage queries against a pure-Python reference, on chdb and ClickHouse 18.16.

The reference is written from the rules, not from the SQL: dedupe by
transaction_id, keep the meter's events in [start, end), aggregate exactly
(Decimal, nine places, half to even), windows from the local clock read with zoneinfo, apart from metering/windows.py.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterflow import samples
from meterflow.api.usage import parse_request, usage_json
from meterflow.config import Settings
from meterflow.kernel.rust import Limits, decode_batch
from meterflow.metering.catalog import MeterCatalog
from meterflow.metering.meters import AGGREGATIONS, Meter, MeterError, parse_meter
from meterflow.metering.usage import UsageError, query_limits, run_usage
from meterflow.records import Records, open_records
from meterflow.storage import Storage, open_storage
from meterflow.storage.embedded import EmbeddedStorage
from tests.harness.http import JSON
from tests.harness.meterflow import MeterFlowServer
from tests.harness.processes import ClickHouse

# A fixed period with both 2024 autumn DST changes (Europe Oct 27, US Nov 3).
P_START = int(datetime(2024, 10, 25, tzinfo=UTC).timestamp() * 1000)
P_END = int(datetime(2024, 11, 6, tzinfo=UTC).timestamp() * 1000)
NOW = P_END + 7_200_000  # after every generated timestamp
LIMITS = Limits(max_age_ms=20 * 365 * 86_400_000)
ZONES = ["UTC", "America/New_York", "Europe/Berlin", "Asia/Kolkata", "Australia/Adelaide"]
NINE = Decimal("0.000000001")
_customers = itertools.count(1)

METERS = {
    agg: parse_meter(
        {"code": f"m_{agg.lower()}", "event_type": "api_request", "aggregation": agg,
         "property": None if agg == "COUNT" else ("region" if agg == "UNIQUE_COUNT" else "bytes"),
         "group_by": ["region", "endpoint"], "unit": "u"},
        "config",
    )
    for agg in AGGREGATIONS
}  # fmt: skip
FILTERED = parse_meter(
    {"code": "m_filtered", "event_type": "api_request", "aggregation": "SUM", "property": "bytes",
     "filters": {"method": ["GET", "PUT"]}, "group_by": ["region"]},
    "config",
)  # fmt: skip


# --- the reference ------------------------------------------------------------------


def text_of(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return v if isinstance(v, str) else orjson.dumps(v).decode()


def number_of(v: Any) -> Decimal | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return Decimal(orjson.dumps(v).decode()).quantize(NINE, rounding=ROUND_HALF_EVEN)


def ref_value(m: Meter, evs: list[dict[str, Any]]) -> Decimal:
    if not evs:
        return Decimal(0)
    if m.aggregation == "COUNT":
        return Decimal(len(evs))
    if m.aggregation == "UNIQUE_COUNT":
        return Decimal(len({text_of(e["properties"][m.property]) for e in evs}))
    nums = [number_of(e["properties"][m.property]) for e in evs]
    values = [n for n in nums if n is not None]
    if m.aggregation == "SUM":
        return sum(values, Decimal(0))
    if m.aggregation == "MAX":
        return max(values)
    if m.aggregation == "MIN":
        return min(values)
    if m.aggregation == "AVG":
        return (sum(values, Decimal(0)) / len(values)).quantize(NINE, rounding=ROUND_HALF_EVEN)
    latest = max(evs, key=lambda e: (e["timestamp"], e["transaction_id"]))
    return number_of(latest["properties"][m.property]) or Decimal(0)


QUARTER_MS = 15 * 60_000  # every UTC offset in ZONES is a multiple of 15 minutes


def ref_windows(window: str, zone: ZoneInfo, start: int, end: int) -> list[tuple[int, int]]:
    """[start, end) cut where the zone's clock starts a new minute, hour, day or month.

    Written apart from metering/windows.py: instead of computing each window's end,
    it walks a 15-minute UTC grid (every boundary of these zones lies on it) and reads
    the local clock: an hour starts where the clock shows :00 (twice in a fall-back
    hour), a day or month where the local date or month differs from 15 minutes before.
    """
    if window == "MINUTE":
        cuts = list(range(-(-start // 60_000) * 60_000, end, 60_000))
    else:

        def local(t: int) -> datetime:
            return datetime.fromtimestamp(t / 1000, zone)

        def starts_here(t: int) -> bool:
            now, before = local(t), local(t - QUARTER_MS)
            if window == "HOUR":
                return now.minute == 0
            if window == "DAY":
                return now.date() != before.date()
            return (now.year, now.month) != (before.year, before.month)

        cuts = [t for t in range(-(-start // QUARTER_MS) * QUARTER_MS, end, QUARTER_MS) if starts_here(t)]
    edges = [start, *(c for c in cuts if c > start), end]
    return list(itertools.pairwise(edges))


def reference(events: list[dict[str, Any]], m: Meter, customer: str, start: int, end: int,
              group_by: tuple[str, ...] = (), window: str | None = None, tz: str = "UTC",
              filters: dict[str, list[str]] | None = None) -> dict[str, Any]:  # fmt: skip
    seen: dict[str, dict[str, Any]] = {}
    for e in events:
        seen.setdefault(e["transaction_id"], e)
    conds = [*m.filters.items(), *(filters or {}).items()]

    def counts(e: dict[str, Any]) -> bool:
        p = e.get("properties", {})
        if e["customer_id"] != customer or e["event_type"] != m.event_type:
            return False
        if not start <= e["timestamp"] < end:
            return False
        if any(k not in p or text_of(p[k]) not in vals for k, vals in conds):
            return False
        if m.aggregation in ("SUM", "MAX", "MIN", "AVG", "LATEST"):
            return number_of(p.get(m.property)) is not None
        if m.aggregation == "UNIQUE_COUNT":
            return m.property in p
        return True

    sel = [e for e in seen.values() if counts(e)]
    out: dict[str, Any] = {"customer_id": customer, "meter": m.code, "period": {"start": start, "end": end},
                           "value": ref_value(m, sel), "unit": m.unit, "aggregation": m.aggregation}  # fmt: skip
    if filters:
        out["filters"] = filters
    if group_by:
        groups: dict[str, list[dict[str, Any]]] = {}
        for e in sel:
            key = "|".join(text_of(e["properties"][g]) if g in e["properties"] else "" for g in group_by)
            groups.setdefault(key, []).append(e)
        out["group_by"] = list(group_by)
        out["breakdown"] = {k: ref_value(m, groups[k]) for k in sorted(groups)}
    if window:
        out["window"] = window
        out["tz"] = tz
        out["series"] = [
            {"start": a, "end": b, "value": ref_value(m, [e for e in sel if a <= e["timestamp"] < b])}
            for a, b in ref_windows(window, ZoneInfo(tz), start, end)
        ]
    return out


# --- storage per backend, on a private loop (hypothesis drives sync tests) ------------


@pytest.fixture(params=["chdb", "clickhouse"])
def usage_storage(
    request: pytest.FixtureRequest, chdb_storage: EmbeddedStorage
) -> Iterator[tuple[asyncio.AbstractEventLoop, Storage]]:
    loop = asyncio.new_event_loop()
    if request.param == "chdb":
        # chdb work runs on its own thread pool, so any loop may drive it.
        yield loop, chdb_storage
    else:
        ch: ClickHouse = request.getfixturevalue("clickhouse")
        db = f"mf_usage_{next(_customers)}"
        ch.reset_database(db)
        s = open_storage(Settings(storage="clickhouse", clickhouse_url=ch.url, clickhouse_database=db))
        loop.run_until_complete(s.start())
        yield loop, s
        loop.run_until_complete(s.close())
    loop.close()


# Config meters only: the catalog never opens this records database (nothing connects to it).
CONFIG_ONLY = open_records(Settings(database_url="sqlite:////nonexistent/never-opened.db"))


def store(loop: asyncio.AbstractEventLoop, storage: Storage, events: list[dict[str, Any]]) -> None:
    for i in range(0, len(events), 1000):
        b = decode_batch(samples.body(events[i : i + 1000]), NOW, LIMITS)
        assert not b.failed, b.failed
        if len(b):
            loop.run_until_complete(storage.insert_events(b.storage_rows()))


def query(loop: asyncio.AbstractEventLoop, storage: Storage, m: Meter, params: dict[str, str],
          filters: dict[str, list[str]] | None = None) -> dict[str, Any]:  # fmt: skip
    catalog = MeterCatalog(CONFIG_ONLY, (*METERS.values(), FILTERED))
    req = loop.run_until_complete(parse_request({"meter": m.code, **params}, filters or {}, catalog, Settings()))
    return usage_json(loop.run_until_complete(run_usage(storage, req, query_limits(Settings()))))


# --- generated events ----------------------------------------------------------------

numbers = st.one_of(
    st.integers(-10**6, 10**12),
    st.decimals(min_value=-(10**6), max_value=10**6, places=3, allow_nan=False).map(float),
    st.sampled_from([0.1, 0.2, 0.30000000000000004, 1e-10, 2.5e-9, 1.5e3]),
)
event_props = st.fixed_dictionaries(
    {},
    optional={"bytes": st.one_of(numbers, st.just("many"), st.booleans()),
              "region": st.sampled_from(["eu", "us", "ap", 7, True]),
              "endpoint": st.sampled_from(["/a", "/b"]),
              "method": st.sampled_from(["GET", "POST", "PUT"])},
)  # fmt: skip
timestamps = st.one_of(
    st.integers(P_START - 3_600_000, P_END + 3_600_000),
    # around the DST changes and midnights
    st.sampled_from([1729990800000, 1729994400000, 1730613600000, 1730617200000, 1730620800000])
    .flatmap(lambda t: st.integers(t - 5_400_000, t + 5_400_000)),
)


@st.composite
def datasets(draw: st.DrawFn) -> tuple[str, list[dict[str, Any]]]:
    customer = f"cu{next(_customers)}"
    n = draw(st.integers(0, 60))
    events = []
    for _ in range(n):
        events.append({
            "transaction_id": f"{customer}_t{draw(st.integers(0, n))}",
            "customer_id": draw(st.sampled_from([customer, customer + "x"])),
            "event_type": draw(st.sampled_from(["api_request", "api_request", "storage"])),
            "timestamp": draw(timestamps),
            "properties": draw(event_props),
        })  # fmt: skip
    # A repeated transaction_id carries the same event (a resend), as ingestion guarantees.
    first: dict[str, dict[str, Any]] = {}
    events = [first.setdefault(e["transaction_id"], e) for e in events]
    draw(st.randoms()).shuffle(events)
    return customer, events + events[: len(events) // 3]  # resends reach storage too


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    data=datasets(),
    # TIME_WEIGHTED_SUM has its own reference: tests/metering/test_time_weighted.py
    agg=st.sampled_from([a for a in AGGREGATIONS if a != "TIME_WEIGHTED_SUM"]),
    window=st.sampled_from([None, "HOUR", "DAY", "MONTH"]),
    tz=st.sampled_from(ZONES),
    group=st.sampled_from([(), ("region",), ("region", "endpoint")]),
    cut=st.tuples(st.integers(0, 100), st.integers(0, 100)),
)
def test_usage_matches_the_reference(usage_storage: Any, data: Any, agg: str, window: str | None,
                                     tz: str, group: tuple[str, ...], cut: tuple[int, int]) -> None:  # fmt: skip
    loop, storage = usage_storage
    customer, events = data
    store(loop, storage, events)
    a, b = sorted(cut)
    span = P_END - P_START
    start, end = P_START + span * a // 100, P_START + span * max(b, a + 1) // 100
    m = METERS[agg]
    params = {"customer_id": customer, "start": str(start), "end": str(end), "tz": tz}
    if group:
        params["group_by"] = ",".join(group)
    if window:
        params["window"] = window
    assert query(loop, storage, m, params) == reference(events, m, customer, start, end, group, window, tz)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=datasets(), tz=st.sampled_from(ZONES))
def test_minute_windows_and_filters_match_the_reference(usage_storage: Any, data: Any, tz: str) -> None:
    loop, storage = usage_storage
    customer, events = data
    store(loop, storage, events)
    start, end = 1730613600000 - 3_600_000, 1730613600000 + 3_600_000
    params = {"customer_id": customer, "start": str(start), "end": str(end), "window": "MINUTE", "tz": tz}
    flt = {"region": ["eu", "7"]}
    got = query(loop, storage, FILTERED, params, flt)
    assert got == reference(events, FILTERED, customer, start, end, (), "MINUTE", tz, flt)


# --- fixed cases ---------------------------------------------------------------------


def test_fixed_dst_day_has_25_hours(usage_storage: Any) -> None:
    loop, storage = usage_storage
    customer = f"cu{next(_customers)}"
    ny = ZoneInfo("America/New_York")
    day_start = int(datetime(2024, 11, 3, tzinfo=ny).timestamp() * 1000)
    day_end = int(datetime(2024, 11, 4, tzinfo=ny).timestamp() * 1000)
    events = [
        {"transaction_id": f"{customer}_{h}", "customer_id": customer, "event_type": "api_request",
         "timestamp": day_start + h * 3_600_000 + 60_000, "properties": {"bytes": 10 * h, "region": "eu"}}
        for h in range(25)
    ]  # fmt: skip
    store(loop, storage, events)
    params = {"customer_id": customer, "start": str(day_start), "end": str(day_end),
              "window": "HOUR", "tz": "America/New_York"}  # fmt: skip
    got = query(loop, storage, METERS["SUM"], params)
    assert len(got["series"]) == 25
    assert [s["value"] for s in got["series"]] == [Decimal(10 * h) for h in range(25)]
    assert got["value"] == Decimal(sum(10 * h for h in range(25)))
    daily = query(loop, storage, METERS["COUNT"], {**params, "window": "DAY"})
    assert daily["series"] == [{"start": day_start, "end": day_end, "value": Decimal(25)}]


def test_exact_decimals_and_latest(usage_storage: Any) -> None:
    loop, storage = usage_storage
    customer = f"cu{next(_customers)}"
    t = P_START + 1000
    vals = [0.1, 0.2, 0.30000000000000004, 1e-10, 123456789.123456789]
    events = [
        {"transaction_id": f"{customer}_{i}", "customer_id": customer, "event_type": "api_request",
         "timestamp": t + i, "properties": {"bytes": v, "region": "eu"}}
        for i, v in enumerate(vals)
    ]  # fmt: skip
    store(loop, storage, events + events)
    params = {"customer_id": customer, "start": str(P_START), "end": str(P_END)}
    # The float 123456789.123456789 is sent as 123456789.12345679; 1e-10 rounds to 0.
    assert query(loop, storage, METERS["SUM"], params)["value"] == Decimal("123456789.72345679")
    assert query(loop, storage, METERS["LATEST"], params)["value"] == Decimal("123456789.12345679")
    assert query(loop, storage, METERS["COUNT"], params)["value"] == 5
    assert query(loop, storage, METERS["UNIQUE_COUNT"], params)["value"] == 1


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"meter": "m_sum", "start": "1", "end": "2"}, "customer_id"),
        ({"customer_id": "c", "start": "1", "end": "2"}, "meter"),
        ({"customer_id": "c", "meter": "nope", "start": "1", "end": "2"}, "meter"),
        ({"customer_id": "c", "meter": "m_sum", "start": "x", "end": "2"}, "start"),
        ({"customer_id": "c", "meter": "m_sum", "start": "5", "end": "5"}, "end"),
        ({"customer_id": "c", "meter": "m_sum", "start": "0", "end": str(500 * 86_400_000)}, "end"),
        ({"customer_id": "c", "meter": "m_sum", "start": "1", "end": "2", "group_by": "secret"}, "group_by"),
        ({"customer_id": "c", "meter": "m_sum", "start": "1", "end": "2", "window": "WEEK"}, "window"),
        ({"customer_id": "c", "meter": "m_sum", "start": "1", "end": "2", "window": "DAY", "tz": "Mars/Base"}, "tz"),
        ({"customer_id": "c", "meter": "m_sum", "start": "0", "end": str(86_400_000 * 30), "window": "MINUTE"}, "window"),
    ],
)
async def test_bad_parameters_are_named(params: dict[str, str], param: str, records: Records) -> None:
    catalog = MeterCatalog(records, tuple(METERS.values()))
    with pytest.raises(UsageError) as e:
        await parse_request(params, {}, catalog, Settings())
    assert e.value.field == param
    assert param.split("[")[0] in e.value.message or e.value.field == "meter"


async def test_filter_on_an_undeclared_property_is_refused() -> None:
    catalog = MeterCatalog(CONFIG_ONLY, tuple(METERS.values()))
    params = {"customer_id": "c", "meter": "m_sum", "start": "1", "end": "2"}
    with pytest.raises(UsageError) as e:
        await parse_request(params, {"secret'; DROP TABLE events; --": ["x"]}, catalog, Settings())
    assert e.value.field.startswith("filter[")


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"code": "x", "event_type": "e", "aggregation": "MEDIAN"}, "aggregation"),
        ({"code": "x", "event_type": "e", "aggregation": "SUM"}, "property"),
        ({"code": "Bad-Code", "event_type": "e", "aggregation": "COUNT"}, "code"),
        ({"code": "x", "aggregation": "COUNT"}, "event_type"),
        ({"code": "x", "event_type": "e", "aggregation": "COUNT", "colour": 1}, "colour"),
        ({"code": "x", "event_type": "e", "aggregation": "COUNT", "group_by": "region"}, "group_by"),
    ],
)
def test_meter_validation_names_the_field(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(MeterError) as e:
        parse_meter(doc)
    assert e.value.field == field


# --- end to end through the HTTP API, both backends ------------------------------------


def client(server: MeterFlowServer) -> httpx.Client:
    return httpx.Client(headers=server.auth, timeout=30)


def test_seed_event_usage_over_http(server: MeterFlowServer) -> None:
    event = samples.seed_event()
    r = httpx.post(f"{server.url}/v1/events", content=samples.body([event]),
                   headers={**JSON, **server.auth})  # fmt: skip
    assert r.json()["accepted"] == 1
    day = 86_400_000
    start = event["timestamp"] // day * day
    q = {"customer_id": "cust_123", "start": start, "end": start + day}
    bw = httpx.get(f"{server.url}/v1/usage", params={**q, "meter": "bandwidth"}, headers=server.auth).json()
    assert (bw["value"], bw["unit"]) == (2048, "bytes")
    assert bw["period"] == {"start": start, "end": start + day}
    assert httpx.get(f"{server.url}/v1/usage", params={**q, "metric": "api_calls"}, headers=server.auth).json()["value"] == 1
    bad = httpx.get(f"{server.url}/v1/usage", params={**q, "meter": "bandwidth", "end": start}, headers=server.auth)
    assert bad.status_code == 400 and "`end`" in bad.json()["message"]


def test_meters_api_round_trip(server: MeterFlowServer) -> None:
    url = f"{server.url}/v1/meters"
    with client(server) as c:
        doc = {"code": "gpu_hours", "name": "GPU hours", "event_type": "compute", "aggregation": "SUM",
               "property": "gpu_h", "unit": "h", "filters": {"region": ["eu", "us"]}, "group_by": ["region"],
               "description": "GPU time"}  # fmt: skip
        created = c.post(url, json=doc)
        assert created.status_code == 201
        assert c.post(url, json=doc).status_code == 409
        got = c.get(f"{url}/gpu_hours").json()
        assert {k: got[k] for k in doc} == doc
        assert c.put(f"{url}/gpu_hours", json={**doc, "unit": "hours"}).json()["unit"] == "hours"
        assert c.put(f"{url}/bandwidth", json={**doc, "code": "bandwidth"}).status_code == 409
        bad = c.post(url, json={**doc, "code": "other", "aggregation": "MEDIAN"})
        assert bad.status_code == 400 and "aggregation" in bad.json()["message"]
        page = c.get(url, params={"limit": 2}).json()
        assert len(page["data"]) == 2 and page["next_cursor"]
        rest = c.get(url, params={"limit": 100, "cursor": page["next_cursor"]}).json()
        codes = [m["code"] for m in page["data"] + rest["data"]]
        assert codes == sorted(set(codes)) and "gpu_hours" in codes and "bandwidth" in codes
        assert c.delete(f"{url}/gpu_hours").status_code == 204
        assert c.get(f"{url}/gpu_hours").status_code == 404
        assert c.delete(f"{url}/api_calls").status_code == 409


def test_usage_values_are_exact_json_numbers(server: MeterFlowServer) -> None:
    now = samples.now_ms()
    events = [
        {"transaction_id": f"dec{i}", "customer_id": "cust_dec", "event_type": "api_request",
         "timestamp": now - i, "properties": {"bytes": v}}
        for i, v in enumerate([0.1, 0.2, "EXACT"])
    ]  # fmt: skip
    # JSON text a float cannot hold: its exact decimal value must survive.
    body = samples.body(events).replace(b'"EXACT"', b"123456789.123456789")
    with client(server) as c:
        c.post(f"{server.url}/v1/events", content=body, headers=JSON)
        r = c.get(f"{server.url}/v1/usage", params={"customer_id": "cust_dec", "meter": "bandwidth",
                                                   "start": now - 1000, "end": now + 1})  # fmt: skip
    assert json.loads(r.text, parse_float=Decimal)["value"] == Decimal("123456789.423456789")
