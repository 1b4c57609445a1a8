"""Usage values are exact at any size or an error, on chdb and ClickHouse 18.16.

A Decimal128(9) sum wraps past about 1.7e29 and ClickHouse 18.16 prints wide
Decimal128 values wrongly: these tests store values near the 1e24 limit and
check every aggregation against exact Python arithmetic (Fraction).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any

import httpx
import pytest

from meterflow import samples
from meterflow.api.usage import parse_request, usage_json
from meterflow.config import Settings
from meterflow.kernel.money import decimal_text
from meterflow.kernel.rust import Limits, decode_batch
from meterflow.metering.catalog import MeterCatalog
from meterflow.metering.meters import AGGREGATIONS, Meter, parse_meter
from meterflow.metering.usage import UsageOutOfRange, query_limits, run_usage
from meterflow.records import open_records
from meterflow.storage import Storage
from tests.harness.http import JSON
from tests.harness.meterflow import MeterFlowServer

DAY = 86_400_000
# Config meters only: the catalog never opens this records database (nothing connects to it).
CONFIG_ONLY = open_records(Settings(database_url="sqlite:////nonexistent/never-opened.db"))
DAY1 = int(datetime(2024, 10, 1, tzinfo=UTC).timestamp() * 1000)
NOW = DAY1 + 3 * DAY
LIMITS = Limits(max_events=250_000, max_age_ms=20 * 365 * DAY)
# The largest value the core accepts: just under 1e24 once rounded to 9 places.
TOP = "999999999999999999999999.999999999"

METERS = {
    agg: parse_meter(
        {"code": f"m_{agg.lower()}", "event_type": "api_request", "aggregation": agg,
         "property": None if agg == "COUNT" else ("region" if agg == "UNIQUE_COUNT" else "bytes"),
         "group_by": ["region"], "unit": "u"},
        "config",
    )
    for agg in AGGREGATIONS
}  # fmt: skip


def body(customer: str, values: list[tuple[str, int, str]], first: int = 0) -> bytes:
    """Events whose `bytes` is the exact JSON text given, with a timestamp and a region."""
    events = ",".join(
        f'{{"transaction_id":"{customer}_{first + i}","customer_id":"{customer}","event_type":"api_request",'
        f'"timestamp":{ts},"properties":{{"bytes":{text},"region":"{region}"}}}}'
        for i, (text, ts, region) in enumerate(values)
    )
    return f'{{"events":[{events}]}}'.encode()


async def store(storage: Storage, customer: str, values: list[tuple[str, int, str]]) -> None:
    # Chunks of 5000 rows stay under aiohttp's 1 MiB warning for raw bodies.
    for at in range(0, len(values), 5000):
        b = decode_batch(body(customer, values[at : at + 5000], at), NOW, LIMITS)
        assert not b.failed, b.failed[:3]
        await storage.insert_events(b.storage_rows())


async def usage(storage: Storage, m: Meter, customer: str, **params: str) -> dict[str, Any]:
    catalog = MeterCatalog(CONFIG_ONLY, tuple(METERS.values()))
    q = {"meter": m.code, "customer_id": customer, "start": str(DAY1), "end": str(DAY1 + 2 * DAY), **params}
    req = await parse_request(q, {}, catalog, Settings())
    return usage_json(await run_usage(storage, req, query_limits(Settings())))


def exact(x: Fraction) -> Decimal:
    """A Fraction rounded half to even to 9 places (Fraction's own rounding), as a Decimal."""
    r = round(x, 9)
    return Decimal(f"{r.numerator * 10**9 // r.denominator}E-9")  # the constructor never rounds


# --- through the storage layer -------------------------------------------------------------


async def test_the_overflow_scenario_is_an_error_never_a_wrapped_sum(storage: Storage) -> None:
    """171 x 1000 values of just under 1e24 once wrapped to -1.69e29; now: 422, or exact."""
    # 100,000 values on day 1 sum to just under 1e29; 71,000 more on day 2.
    await store(storage, "big", [(TOP, DAY1 + (0 if i < 100_000 else DAY) + i % 1000, "eu") for i in range(171_000)])
    with pytest.raises(UsageOutOfRange) as e:
        await usage(storage, METERS["SUM"], "big")
    assert "`value`" in e.value.message and "1e29" in e.value.message and "1.710e+29" in e.value.message
    day1 = await usage(storage, METERS["SUM"], "big", end=str(DAY1 + DAY))
    assert day1["value"] == Decimal("99999999999999999999999999999.9999")  # 100,000 x TOP, every digit
    with pytest.raises(UsageOutOfRange):
        await usage(storage, METERS["SUM"], "big", window="DAY")
    for agg in ("AVG", "MAX", "MIN", "LATEST"):
        assert (await usage(storage, METERS[agg], "big"))["value"] == Decimal(TOP), agg
    assert (await usage(storage, METERS["COUNT"], "big"))["value"] == 171_000


async def test_each_breakdown_and_series_cell_is_checked(storage: Storage) -> None:
    """+1.00001e29 in one cell and -1.00001e29 in another: the total is 0, the cells are errors."""
    n = 100_001
    await store(storage, "cells", [(TOP, DAY1 + i % 1000, "eu") for i in range(n)]
                + [("-" + TOP, DAY1 + DAY + i % 1000, "us") for i in range(n)])  # fmt: skip
    assert (await usage(storage, METERS["SUM"], "cells"))["value"] == 0
    with pytest.raises(UsageOutOfRange) as e:
        await usage(storage, METERS["SUM"], "cells", group_by="region")
    assert "breakdown['eu']" in e.value.message
    with pytest.raises(UsageOutOfRange) as e:
        await usage(storage, METERS["SUM"], "cells", window="DAY")
    assert "series[0]" in e.value.message and "1.000e+29" in e.value.message
    by_region = await usage(storage, METERS["MIN"], "cells", group_by="region", window="DAY")
    assert by_region["breakdown"] == {"eu": Decimal(TOP), "us": Decimal("-" + TOP)}
    assert [s["value"] for s in by_region["series"]] == [Decimal(TOP), Decimal("-" + TOP)]
    assert (await usage(storage, METERS["AVG"], "cells"))["value"] == 0


async def test_wide_values_read_back_with_every_digit(storage: Storage) -> None:
    texts = ["12345678901234567890.123456789", "98765432109876543210.987654321", "-10000000000000000000.000000001",
             "123456789012345678901234.5", "0.000000001"]  # fmt: skip
    await store(storage, "wide", [(t, DAY1 + i, "eu") for i, t in enumerate(texts)])
    values = [Fraction(t) for t in texts]
    got = {agg: (await usage(storage, METERS[agg], "wide"))["value"] for agg in ("SUM", "AVG", "MAX", "MIN", "LATEST")}
    assert got == {
        "SUM": exact(sum(values, Fraction(0))),
        "AVG": exact(sum(values, Fraction(0)) / len(values)),
        "MAX": Decimal("123456789012345678901234.5"),
        "MIN": Decimal("-10000000000000000000.000000001"),
        "LATEST": Decimal("0.000000001"),
    }
    assert decimal_text(got["SUM"]) == "123557900123356790012335.61111111"
    series = await usage(storage, METERS["MAX"], "wide", window="DAY", group_by="region")
    assert series["breakdown"] == {"eu": Decimal("123456789012345678901234.5")}
    assert series["series"][0]["value"] == Decimal("123456789012345678901234.5")


@pytest.mark.parametrize(
    ("texts", "mean"),
    [
        (["10000000000000000000.000000001", "10000000000000000000.000000002"], "10000000000000000000.000000002"),
        (["10000000000000000000.000000001", "10000000000000000000.000000004"], "10000000000000000000.000000002"),
        (["-10000000000000000000.000000001", "-10000000000000000000.000000002"], "-10000000000000000000.000000002"),
        (["99999999999999999999999", "99999999999999999999999", "1"], "66666666666666666666666.333333333"),
        (["20000000000000000000", "0.000000001", "0.000000001"], "6666666666666666666.666666667"),
    ],
)
async def test_avg_is_the_exact_mean_rounded_half_to_even(storage: Storage, texts: list[str], mean: str) -> None:
    await store(storage, "avg", [(t, DAY1 + i, "eu") for i, t in enumerate(texts)])
    got = (await usage(storage, METERS["AVG"], "avg"))["value"]
    assert got == Decimal(mean) == exact(sum(map(Fraction, texts), Fraction(0)) / len(texts))


def test_decimal_json_text_keeps_every_digit() -> None:
    assert decimal_text(Decimal("12345678901234567890.123456789")) == "12345678901234567890.123456789"
    assert decimal_text(Decimal("99999999999999999999999999999.999999999")) == "99999999999999999999999999999.999999999"
    assert decimal_text(Decimal("2048.000000000")) == "2048"
    assert decimal_text(Decimal("-0E-9")) == "0"
    assert decimal_text(Decimal("1E+3")) == "1000"
    assert decimal_text(Decimal("1E-9")) == "0.000000001"


# --- end to end through the HTTP API, both backends ------------------------------------------


def test_usage_api_is_exact_or_422(server: MeterFlowServer) -> None:
    now = samples.now_ms()
    with httpx.Client(base_url=server.url, headers=server.auth, timeout=60) as c:
        for agg in ("AVG", "MAX"):
            doc = {"code": f"bytes_{agg.lower()}", "event_type": "api_request", "aggregation": agg, "property": "bytes"}
            assert c.post("/v1/meters", json=doc).status_code == 201

        def send(customer: str, values: list[str], offset: int = 0) -> None:
            events = [(t, now - 1000 + (offset + i) % 1000, "eu") for i, t in enumerate(values)]
            r = c.post(
                "/v1/events", content=body(customer, events, offset), headers=JSON
            )
            assert r.json() == {"accepted": len(values), "duplicates": 0, "failed": []}

        def get(customer: str, meter: str) -> httpx.Response:
            return c.get("/v1/usage", params={"customer_id": customer, "meter": meter,
                                              "start": now - 2000, "end": now + 1})  # fmt: skip

        send("wide", ["12345678901234567890.123456789"])
        r = get("wide", "bandwidth")
        assert r.status_code == 200
        assert '"value":12345678901234567890.123456789' in r.text
        assert json.loads(r.text, parse_float=Decimal)["value"] == Decimal("12345678901234567890.123456789")

        send("avg", ["10000000000000000000.000000001", "10000000000000000000.000000004"])
        assert '"value":10000000000000000000.000000002' in get("avg", "bytes_avg").text

        # 100,001 values of just under 1e24: the sum passes 1e29.
        for k in range(101):
            send("big", [TOP] * (1000 if k < 100 else 1), offset=k * 1000)
        r = get("big", "bandwidth")
        assert r.status_code == 422
        assert r.json()["error"] == "usage_out_of_range"
        assert "`value`" in r.json()["message"] and "1e29" in r.json()["message"]
        assert f'"value":{TOP}' in get("big", "bytes_max").text
        assert f'"value":{TOP}' in get("big", "bytes_avg").text
