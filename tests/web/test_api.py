"""POST /v1/events end to end against a real server, on both storage backends."""

from __future__ import annotations

import asyncio
import random

import httpx
import orjson
import pytest
from starlette.routing import Route

from meterflow import samples
from meterflow.app import create_app
from meterflow.config import Settings
from tests.harness.backends import Backend
from tests.harness.http import JSON, post
from tests.harness.meterflow import MeterFlowServer
from tests.harness.processes import until


def test_seed_example_is_accepted_once(server: MeterFlowServer, backend: Backend) -> None:
    event = samples.seed_event()
    first = post(server, "/v1/events", {"events": [event]})
    assert first.status_code == 200
    assert first.json() == {"accepted": 1, "duplicates": 0, "failed": []}
    again = post(server, "/v1/events", {"events": [event]})
    assert again.json() == {"accepted": 0, "duplicates": 1, "failed": []}
    server.stop()
    assert backend.stored() == (1, 1)
    assert backend.raw_rows() == 1


def usage(server: MeterFlowServer, customer: str, meter: str = "bandwidth") -> object:
    now = samples.now_ms()
    params = {"customer_id": customer, "meter": meter, "start": str(now - 86_400_000), "end": str(now + 86_400_000)}
    r = httpx.get(f"{server.url}/v1/usage", params=params, headers=server.auth, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["value"]


def test_same_id_for_two_customers_is_two_events(server: MeterFlowServer, backend: Backend) -> None:
    """Idempotency is per customer: a key bound to cust_a cannot make cust_b's id a duplicate."""
    created = httpx.post(
        f"{server.url}/v1/keys", json={"scope": "ingest", "customer_id": "cust_a"}, headers=server.auth
    )
    bound = {"Authorization": f"Bearer {created.json()['key']}"}
    event = {**samples.seed_event(), "transaction_id": "inv_0001"}
    first = httpx.post(f"{server.url}/v1/events", content=samples.body([{**event, "customer_id": "cust_a"}]),
                       headers={**JSON, **bound})  # fmt: skip
    assert first.json() == {"accepted": 1, "duplicates": 0, "failed": []}
    second = post(server, "/v1/events", {"events": [{**event, "customer_id": "cust_b"}]})
    assert second.json() == {"accepted": 1, "duplicates": 0, "failed": []}
    both = post(server, "/v1/events", {"events": [{**event, "customer_id": c, "transaction_id": "inv_0002"} for c in ("cust_a", "cust_b")]})
    assert both.json() == {"accepted": 2, "duplicates": 0, "failed": []}
    assert usage(server, "cust_a") == usage(server, "cust_b") == 4096
    assert usage(server, "cust_a", "api_calls") == 2
    server.stop()
    assert backend.raw_rows() == 4


def test_same_key_other_content_is_a_conflict(server: MeterFlowServer, backend: Backend) -> None:
    event = samples.seed_event()
    assert post(server, "/v1/events", {"events": [event]}).json()["accepted"] == 1
    assert post(server, "/v1/events", {"events": [event]}).json() == {"accepted": 0, "duplicates": 1, "failed": []}
    moved = {**event, "timestamp": event["timestamp"] - 1, "properties": {**event["properties"], "bytes": 4096}}
    retyped = {**event, "event_type": "api_call"}
    reordered = {**event, "properties": dict(reversed(list(event["properties"].items())))}
    assert post(server, "/v1/events", {"events": [reordered]}).json() == {"accepted": 0, "duplicates": 1, "failed": []}
    other = {**event, "transaction_id": "tx_003"}
    r = post(server, "/v1/events", {"events": [other, moved]}).json()
    assert (r["accepted"], r["duplicates"]) == (1, 0)
    assert [(f["index"], f["transaction_id"], f["reason"]) for f in r["failed"]] == [(1, "tx_001", "idempotency_conflict")]
    assert r["failed"][0]["message"] == (
        "events[1] differs from the event stored with this customer_id and transaction_id in: timestamp, properties."
    )
    r = post(server, "/v1/events", {"events": [retyped]}).json()
    assert r["failed"][0]["message"].endswith("in: event_type.")
    # Within one batch: the first of a new id is kept, a repeat with other content fails.
    fresh = {**event, "transaction_id": "tx_002"}
    r = post(server, "/v1/events", {"events": [fresh, {**fresh, "properties": {"bytes": 1}}, fresh]}).json()
    assert (r["accepted"], r["duplicates"]) == (1, 1)
    assert [(f["index"], f["reason"]) for f in r["failed"]] == [(1, "idempotency_conflict")]
    assert "of events[0]" in r["failed"][0]["message"]
    assert usage(server, "cust_123") == 3 * 2048  # tx_001, tx_002, tx_003; no conflict counted
    server.stop()
    assert backend.raw_rows() == 3


def test_mixed_batch_counts_exactly(server: MeterFlowServer, backend: Backend) -> None:
    events = samples.batch(1000, seed=7)
    now = samples.now_ms()
    bad = {
        10: ("timestamp", now + 3_600_000, "timestamp_in_future"),
        20: ("timestamp", now - 40 * 86_400_000, "timestamp_too_old"),
        30: ("transaction_id", "has spaces", "invalid_transaction_id"),
        40: ("timestamp", "yesterday", "wrong_type:timestamp"),
        50: ("customer_id", "", "invalid_customer_id"),
        60: ("event_type", 5, "wrong_type:event_type"),
        70: ("properties", {"note": "x" * 1001}, "property_value_too_long"),
        80: ("properties", {"nested": {"a": 1}}, "wrong_type:properties.nested"),
        90: ("timestamp", 1.5, "wrong_type:timestamp"),
        100: ("extra", 1, "unknown_field:extra"),
    }
    for i, (field, value, _) in bad.items():
        events[i][field] = value
    repeated = [500, 501, 502, 503, 504]
    for k, i in enumerate(repeated):
        events[i] = {**events[k]}  # the same event again: a duplicate
    r = post(server, "/v1/events", {"events": events})
    assert r.status_code == 200
    body = r.json()
    assert body["accepted"] == 985
    assert body["duplicates"] == 5
    assert [(f["index"], f["reason"]) for f in body["failed"]] == [(i, b[2]) for i, b in bad.items()]
    assert body["failed"][0]["transaction_id"] == events[10]["transaction_id"]
    assert all(f["message"].startswith(f"events[{f['index']}]") for f in body["failed"])
    server.stop()
    assert backend.stored() == (985, 985)


def test_rejected_requests_write_nothing_and_mark_nothing(server: MeterFlowServer, backend: Backend) -> None:
    events = samples.batch(1001, seed=3)
    big = post(server, "/v1/events", {"events": events})
    assert big.status_code == 413
    assert big.json()["error"] == "too_many_events"
    ok_events = events[:1000]
    not_json = post(server, "/v1/events", samples.body(ok_events)[:-5])
    assert not_json.status_code == 400
    assert not_json.json()["error"] == "invalid_json"
    wrong_type = post(server, "/v1/events", samples.body(ok_events), headers={"Content-Type": "text/plain"})
    assert wrong_type.status_code == 415
    assert set(wrong_type.json()) == {"error", "message"}
    for body, code in [
        (b"[]", "body_not_object"),
        (b"{}", "events_missing"),
        (b'{"events": {}}', "events_not_array"),
        (b'{"events": []}', "empty_batch"),
        (b"\xff\xfe", "invalid_utf8"),
    ]:
        r = post(server, "/v1/events", body)
        assert (r.status_code, r.json()["error"]) == (400, code)
    # The same ids were never marked as seen: all 1000 are accepted now.
    r = post(server, "/v1/events", {"events": ok_events})
    assert r.json() == {"accepted": 1000, "duplicates": 0, "failed": []}
    server.stop()
    assert backend.stored() == (1000, 1000)


def test_body_over_the_byte_limit_is_413(backend: Backend, start_server: object) -> None:
    server = start_server(backend, MF_MAX_BODY_BYTES="10000")  # type: ignore[operator]
    r = post(server, "/v1/events", samples.body(samples.batch(100)))
    assert r.status_code == 413
    assert r.json()["error"] == "body_too_large"
    assert "10000" in r.json()["message"]


async def test_concurrent_clients_with_overlapping_ids(server: MeterFlowServer, backend: Backend) -> None:
    """8 clients post overlapping ids at once: each id is accepted exactly once."""
    pool = samples.batch(3000, seed=11)
    rng = random.Random(5)
    bodies = []
    for _ in range(8):
        for _ in range(4):
            bodies.append(samples.body(rng.sample(pool, 500)))
    distinct = {e["transaction_id"] for b in bodies for e in orjson.loads(b)["events"]}

    async def client(mine: list[bytes]) -> list[dict[str, object]]:
        out = []
        async with httpx.AsyncClient(timeout=60) as c:
            for body in mine:
                r = await c.post(f"{server.url}/v1/events", content=body, headers={**JSON, **server.auth})
                assert r.status_code == 200, r.text
                out.append(r.json())
        return out

    results = await asyncio.gather(*(client(bodies[i::8]) for i in range(8)))
    answers = [a for rs in results for a in rs]
    accepted = sum(int(a["accepted"]) for a in answers)  # type: ignore[call-overload]
    # An id held by a concurrent, not yet committed flush is "in_flight": retry it.
    retry = [f for a in answers for f in a["failed"]]  # type: ignore[attr-defined]
    assert all(f["reason"] == "in_flight" for f in retry)

    def resend_in_flight() -> bool:
        nonlocal accepted, retry
        ids = {f["transaction_id"] for f in retry}
        resend = [e for e in pool if e["transaction_id"] in ids]
        retry = []
        for i in range(0, len(resend), 1000):
            again = post(server, "/v1/events", {"events": resend[i : i + 1000]}).json()
            accepted += again["accepted"]
            retry += again["failed"]
        return not retry

    if retry:  # the holding flushes commit within moments: the ids are then duplicates or accepted
        await until(resend_in_flight, "in-flight ids settled")
    assert accepted == len(distinct)
    server.stop()
    assert backend.stored() == (len(distinct), len(distinct))


def test_service_routes(server: MeterFlowServer) -> None:
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and isinstance(health["pid"], int) and set(health) == {"status", "pid"}
    ready = httpx.get(f"{server.url}/ready")
    assert ready.status_code == 200
    assert all(c["status"] == "ok" for c in ready.json()["checks"].values())
    spec = httpx.get(f"{server.url}/openapi.json", headers=server.auth).json()
    # Every API route is described; the dashboard is a mount of HTML pages, not API.
    routes = {r.path for r in create_app(Settings()).routes if isinstance(r, Route)}
    assert routes == set(spec["paths"])
    post(server, "/v1/events", {"events": [samples.seed_event()]})
    metrics = httpx.get(f"{server.url}/metrics", headers=server.auth).text
    assert "meterflow_events_accepted_total 1" in metrics
    missing = httpx.get(f"{server.url}/nope")
    assert missing.status_code == 404 and set(missing.json()) == {"error", "message"}
    wrong = httpx.delete(f"{server.url}/v1/events", headers=server.auth)
    assert wrong.status_code == 405 and wrong.json()["error"] == "method_not_allowed"


@pytest.mark.parametrize("kind", ["embedded"])
def test_restart_keeps_dedup(kind: str, make_backend: object, start_server: object) -> None:
    """The embedded index is warmed from storage: a resend after restart is a duplicate."""
    backend = make_backend(kind)  # type: ignore[operator]
    s = start_server(backend)  # type: ignore[operator]
    events = samples.batch(50, seed=21)
    assert post(s, "/v1/events", {"events": events}).json()["accepted"] == 50
    s.stop()
    s2 = start_server(backend)  # type: ignore[operator]
    assert post(s2, "/v1/events", {"events": events}).json() == {"accepted": 0, "duplicates": 50, "failed": []}
    # The warmed index keeps each event's fingerprint, per customer.
    changed = [{**events[0], "timestamp": events[0]["timestamp"] + 1}, {**events[1], "customer_id": "someone_else"}]
    r = post(s2, "/v1/events", {"events": changed}).json()
    assert (r["accepted"], [f["reason"] for f in r["failed"]]) == (1, ["idempotency_conflict"])


async def test_flushes_sealed_by_size_are_written_once(backend: Backend, start_server: object) -> None:
    """Concurrent batches that fill flushes to MF_FLUSH_MAX_ROWS: each flush is inserted once."""
    server = start_server(backend, MF_FLUSH_MAX_ROWS="100")  # type: ignore[operator]
    bodies = [samples.body(samples.batch(100, seed=500 + i, prefix=f"sz{i}")) for i in range(24)]
    async with httpx.AsyncClient(timeout=60, headers={**JSON, **server.auth}) as c:
        rs = await asyncio.gather(*(c.post(f"{server.url}/v1/events", content=b) for b in bodies))
    assert [r.status_code for r in rs] == [200] * 24
    assert sum(r.json()["accepted"] for r in rs) == 2400
    server.stop()
    assert backend.stored() == (2400, 2400)
    assert "invalid state" not in server.logs() and "flush failed" not in server.logs()
