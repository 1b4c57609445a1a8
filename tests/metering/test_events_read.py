"""GET /v1/events: the stored events newest first, filters, cursor pages, limits, on each backend."""

from __future__ import annotations

import httpx
import pytest

from meterflow import samples
from meterflow.api.events import parse_query
from meterflow.auth.keys import Principal
from meterflow.metering.events import Cursor, EventsError, OtherCustomer
from tests.harness.http import post_events
from tests.harness.meterflow import MeterFlowServer

BASE = (samples.now_ms() // 1000 - 3600) * 1000  # an hour ago, whole seconds


def ingest(c: httpx.Client, events: list[dict[str, object]]) -> None:
    """Posts `events`, every one accepted."""
    r = post_events(c, events)
    assert r.json()["accepted"] == len(events), r.text


def event(tid: str, customer: str, ts: int, kind: str = "api_request", **props: object) -> dict[str, object]:
    return {"transaction_id": tid, "customer_id": customer, "event_type": kind, "timestamp": ts, "properties": props}


def all_pages(c: httpx.Client, **params: object) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor = None
    for _ in range(50):  # a bound: a cursor that never ends fails the test
        r = c.get("/v1/events", params={**params, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        pages.append([e["transaction_id"] for e in r.json()["data"]])
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return pages
    raise AssertionError("more than 50 pages")


def test_events_newest_first_in_cursor_pages_with_filters(server: MeterFlowServer) -> None:
    with httpx.Client(base_url=server.url, headers=server.auth, timeout=30) as c:
        # Two events share a timestamp: the cursor must still neither skip nor repeat one.
        ingest(c, [event(f"t{i}", "cust_a", BASE + (i // 2) * 1000, bytes=i) for i in range(7)])
        ingest(c, [event("other", "cust_b", BASE + 10_000), event("s1", "cust_a", BASE + 500, "storage", gb=1)])
        again = post_events(c, [event("t3", "cust_a", BASE + 1000, bytes=3)])
        assert again.json()["duplicates"] == 1  # and listed once below
        pages = all_pages(c, customer_id="cust_a", event_type="api_request", limit=3)
        assert pages == [["t6", "t5", "t4"], ["t3", "t2", "t1"], ["t0"]]
        assert all_pages(c, customer_id="cust_a", limit=500) == [["t6", "t5", "t4", "t3", "t2", "s1", "t1", "t0"]]
        assert all_pages(c, limit=2)[0] == ["other", "t6"]
        window = all_pages(c, customer_id="cust_a", start=BASE + 1000, end=BASE + 3000)
        assert window == [["t5", "t4", "t3", "t2"]]
        first = c.get("/v1/events", params={"customer_id": "cust_a", "limit": 1}).json()["data"][0]
        assert first == {"transaction_id": "t6", "customer_id": "cust_a", "event_type": "api_request",
                         "timestamp": BASE + 3000, "properties": {"bytes": 6}}  # fmt: skip


@pytest.mark.parametrize(("params", "field"), [
    ({"limit": "0"}, "limit"), ({"limit": "501"}, "limit"), ({"cursor": "not-a-cursor"}, "cursor"),
    ({"customer_id": "bad id"}, "customer_id"), ({"start": "5", "end": "5"}, "end"), ({"start": "x"}, "start"),
    ({"event_type": "e" * 256}, "event_type"),
])  # fmt: skip
def test_an_invalid_parameter_is_named(params: dict[str, str], field: str) -> None:
    with pytest.raises(EventsError) as e:
        parse_query(params)
    assert e.value.field == field and f"`{field}`" in e.value.message


def test_a_bound_key_sees_its_own_customer_only() -> None:
    bound = Principal("k" * 12, "read", customer_id="cust_a")
    assert parse_query({}, bound.customer_id).customer_id == "cust_a"
    assert parse_query({"customer_id": "cust_a"}, bound.customer_id).customer_id == "cust_a"
    with pytest.raises(OtherCustomer):
        parse_query({"customer_id": "cust_b"}, bound.customer_id)


def test_a_cursor_round_trips_any_ids() -> None:
    c = Cursor(BASE, "cust_'x\\", "tx,\"'")
    assert Cursor.decode(c.encode()) == c
