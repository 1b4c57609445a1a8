"""/openapi.json: derived from the routes and settings, valid OpenAPI 3.1, and every documented answer happens."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
from openapi_spec_validator import validate
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from meterflow import samples
from meterflow.api.openapi import spec
from meterflow.app import create_app
from meterflow.billing.invoices import Invoices
from meterflow.config import Settings
from meterflow.kernel.rust import Limits, decode_batch
from meterflow.records import open_records
from meterflow.records.tables import credit_notes
from meterflow.runtime import started
from meterflow.web.guard import requires
from tests.harness.backends import Backend
from tests.harness.http import JSON
from tests.harness.invoice_samples import draft
from tests.harness.meterflow import WEBHOOKS_TO_LOOPBACK, MeterFlowServer

Probe = Callable[[httpx.Client], httpx.Response | int]
TEXT = {"Content-Type": "text/plain"}
BIG = b'{"name": "' + b"x" * (1 << 20) + b'"}'
USAGE = {"customer_id": "c", "meter": "api_calls"}
METER = {"event_type": "probe", "aggregation": "COUNT"}
STALE = {"If-Match": '"999"'}  # a version none of the probes' records reaches
T0 = samples.now_ms() - 30 * 86_400_000  # the probes' subscriptions start here (within the backdate horizon)
# Path parameters of the generic probes (auth and rate limits answer before the route reads them).
SAMPLE = {"code": "api_calls", "customer_id": "cust_probe", "key_id": "A" * 12, "subscription_id": "sub_probe",
          "invoice_id": "inv_" + "0" * 24, "webhook_id": "wh_" + "0" * 24, "credit_note_id": "cn_" + "0" * 24}
PLAN = {"currency": "EUR", "charges": [{"type": "unit", "meter": "api_calls", "unit_amount": "0.001"}]}
DIMENSIONAL = {"currency": "EUR", "charges": [{"meter": "api_calls", "price_by": "region",
                                              "prices": {"eu-west-1": {"type": "unit", "unit_amount": "1"}}}]}
# A plan of the config file: read-only through the API.
CONFIG = """
[[plans]]
code = "config_plan"
currency = "EUR"
charges = [{type = "flat", amount = "1.00"}]
"""
# Documented answers that need a backing service to fail; the named test stops it and checks them.
NOT_PROBED_HERE = {503: "tests/ingest/test_failures.py::test_clickhouse_down_answers_503_and_marks_nothing",
                   202: "tests/ingest/test_async.py::test_async_mode_queues_then_workers_store_each_event_once"}


def status(answer: httpx.Response | int) -> int:
    return answer if isinstance(answer, int) else answer.status_code


def documented(doc: dict[str, Any]) -> set[tuple[str, str, int]]:
    return {(m.upper(), p, int(s)) for p, ops in doc["paths"].items() for m, op in ops.items() for s in op["responses"]}


def test_spec_is_valid_openapi_3_1_and_covers_every_route() -> None:
    settings = Settings()
    app = create_app(settings)
    doc = spec(app.routes, settings)
    validate(doc)  # raises on any violation of the OpenAPI 3.1 schema
    routes = {(m, r.path) for r in app.routes if isinstance(r, Route) for m in (r.methods or set()) - {"HEAD"}}
    assert {(m, p) for m, p, _ in documented(doc)} == routes


def test_scope_and_limits_come_from_the_routes_and_settings() -> None:
    settings = Settings(max_events=50, max_body_bytes=12_345, max_future_ms=120_000, max_age_ms=7 * 86_400_000)
    doc = spec(create_app(settings).routes, settings)
    assert doc["components"]["schemas"]["Batch"]["properties"]["events"]["maxItems"] == 50
    ingest = doc["paths"]["/v1/events"]["post"]
    assert "12345 bytes" in ingest["responses"]["413"]["description"] and "50 events" in ingest["responses"]["413"]["description"]
    assert "2 minutes ahead" in doc["components"]["schemas"]["Event"]["properties"]["timestamp"]["description"]
    assert "7 days old" in doc["components"]["schemas"]["Event"]["properties"]["timestamp"]["description"]
    event = doc["components"]["schemas"]["Event"]["properties"]
    core = Limits()
    assert event["properties"]["maxProperties"] == core.max_properties
    assert event["properties"]["additionalProperties"]["oneOf"][0]["maxLength"] == core.max_property_value_len
    assert event["event_type"]["maxLength"] == core.max_event_type_len
    assert event["transaction_id"]["maxLength"] == core.max_id_len
    # The documented limit is the one the core applies: one property more fails the event.
    now = samples.now_ms()
    for n, failed in ((core.max_properties, 0), (core.max_properties + 1, 1)):
        e = {**samples.seed_event(), "timestamp": now, "properties": {f"p{i}": "v" for i in range(n)}}
        assert len(decode_batch(samples.body([e]), now).failed) == failed
    assert doc["paths"]["/health"]["get"]["security"] == []  # no key needed
    assert "401" not in doc["paths"]["/health"]["get"]["responses"]
    assert "`admin`" in doc["paths"]["/v1/keys"]["post"]["description"]
    assert "`ingest`" in ingest["description"] and "503" in ingest["responses"]
    put_meter = doc["paths"]["/v1/meters/{code}"]["put"]["responses"]
    assert {"200", "201"} <= set(put_meter) and "Retry-After" in put_meter["503"]["headers"]


def test_a_route_without_documentation_is_refused() -> None:
    async def undocumented(request: Request) -> Response:
        return Response()

    settings = Settings()
    routes = [*create_app(settings).routes, Route("/v1/new", requires("read", undocumented), methods=["GET"])]
    with pytest.raises(LookupError, match="/v1/new"):
        spec(routes, settings)


def key(c: httpx.Client, scope: str, **limits: int) -> dict[str, str]:
    body: dict[str, Any] = {"scope": scope, **({"rate_limits": limits} if limits else {})}
    r = c.post("/v1/keys", json=body)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['key']}"}


def drafts(data_dir: str, n: int) -> list[str]:
    """Draft invoices written to the server's records database, as closing a period writes them."""

    async def make() -> list[str]:
        records = open_records(Settings(data_dir=data_dir))
        async with started(records):
            invoices = Invoices(records, None)
            return [(await draft(invoices, "cust_inv", f"sub_probe_{i}"))["id"] for i in range(n)]

    return asyncio.run(make())


def credit_note(data_dir: str, invoice_id: str) -> str:
    """A credit note on a finalized invoice, written to the server's records database as billing/credit_notes.py
    writes one."""

    async def make() -> str:
        records = open_records(Settings(data_dir=data_dir))
        async with started(records), records.begin() as conn:
            await conn.execute(sa.insert(credit_notes).values(
                id="cn_" + "1" * 24, number="CN-2026-000099", invoice_id=invoice_id, customer_id="cust_inv",
                subscription_id="sub_probe_0", reason="manual", currency="EUR", total="1.00", created_at=1,
                document={"invoice_number": None, "memo": "", "lines": [
                    {"invoice_line": 0, "line_key": "0", "description": "Probe", "quantity": "0", "amount": "1.00"}]},
            ))  # fmt: skip
        return "/v1/credit_notes/cn_" + "1" * 24

    return asyncio.run(make())


def route_probes(c: httpx.Client, data_dir: str) -> dict[tuple[str, str, int], Probe]:
    """A request per (route, status) that only the route itself answers; in an order that builds its own state."""
    events = "/v1/events"
    m, cu, k = "/v1/meters/{code}", "/v1/customers/{customer_id}", "/v1/keys/{key_id}"
    inv, wh = "/v1/invoices/{invoice_id}", "/v1/webhooks/{webhook_id}"
    none_inv, none_wh = f"/v1/invoices/{SAMPLE['invoice_id']}", f"/v1/webhooks/{SAMPLE['webhook_id']}"
    made: dict[str, str] = {}
    invoice_ids: list[str] = []

    def invoice(i: int) -> str:
        if not invoice_ids:
            invoice_ids.extend(drafts(data_dir, 2))
        return f"/v1/invoices/{invoice_ids[i]}"

    def note() -> str:
        if "note" not in made:
            made["note"] = credit_note(data_dir, invoice(0).rsplit("/", 1)[1])
        return made["note"]

    def unchanged(url: str) -> Probe:
        """A frozen document asked for again with the ETag it answered."""
        return lambda c: c.get(url, headers={"If-None-Match": c.get(url).headers.get("etag", "")})

    cn, none_cn = "/v1/credit_notes/{credit_note_id}", f"/v1/credit_notes/{SAMPLE['credit_note_id']}"

    def new_webhook(c: httpx.Client) -> httpx.Response:
        r = c.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hooks"})
        made["webhook"] = f"/v1/webhooks/{r.json().get('id', '')}"
        return r

    def paid(c: httpx.Client) -> httpx.Response:
        assert c.post(invoice(1) + "/finalize").status_code == 200
        return c.post(invoice(1) + "/mark_paid")

    def new_key(c: httpx.Client) -> httpx.Response:
        r = c.post("/v1/keys", json={"scope": "read"})
        made["key"] = r.json().get("id", "")
        return r

    def too_many_rows(c: httpx.Client) -> httpx.Response:
        """The server answers at most one row per query (MF_USAGE_MAX_RESULT_ROWS=1): a breakdown of two groups."""
        now = samples.now_ms()
        two = [{**e, "customer_id": "c_rows"} for e in samples.batch(20, seed=9, prefix="rows", ts=now)]
        assert c.post(events, content=samples.body(two), headers=JSON).json()["accepted"] == 20
        return c.get("/v1/usage", params={"customer_id": "c_rows", "meter": "api_calls", "start": now - 60_000,
                                          "end": now + 60_000, "group_by": "region,endpoint"})  # fmt: skip

    pl, sub = "/v1/plans/{code}", "/v1/subscriptions/{subscription_id}"
    up = "/v1/customers/{customer_id}/upcoming_invoice"

    def subscribe(c: httpx.Client) -> httpx.Response:
        assert c.put("/v1/customers/cust_sub", json={"name": "S"}).status_code in (200, 201)
        r = c.post("/v1/subscriptions", json={"customer_id": "cust_sub", "plan": "probe_p", "start": T0})
        made["sub"] = r.json().get("id", "")
        return r

    def change(c: httpx.Client) -> httpx.Response:
        r = c.post(f"/v1/subscriptions/{made['sub']}/change", json={"plan": "probe_p", "at": T0 + 1000})
        made["new"] = r.json().get("subscription", {}).get("id", "")
        return r

    def expensive_invoice(c: httpx.Client) -> httpx.Response:
        """A dimensional charge needs a breakdown: two regions are two rows, over the limit of one."""
        now = samples.now_ms()
        assert c.post("/v1/plans", json={"code": "probe_dim", **DIMENSIONAL}).status_code == 201
        assert c.put("/v1/customers/c_dim", json={"name": "D"}).status_code in (200, 201)
        assert c.post("/v1/subscriptions", json={"customer_id": "c_dim", "plan": "probe_dim",
                                                 "start": T0}).status_code == 201  # fmt: skip
        two = [{**e, "customer_id": "c_dim"} for e in samples.batch(20, seed=11, prefix="dim", ts=now)]
        assert c.post(events, content=samples.body(two), headers=JSON).json()["accepted"] == 20
        return c.get(up.format(customer_id="c_dim"))

    return {
        ("GET", "/v1/plans", 200): lambda c: c.get("/v1/plans"),
        ("GET", "/v1/plans", 400): lambda c: c.get("/v1/plans", params={"limit": "0"}),
        ("POST", "/v1/plans", 201): lambda c: c.post("/v1/plans", json={"code": "probe_p", **PLAN}),
        ("POST", "/v1/plans", 409): lambda c: c.post("/v1/plans", json={"code": "probe_p", **PLAN}),
        ("POST", "/v1/plans", 400): lambda c: c.post("/v1/plans", json={"code": "probe_q", **PLAN, "currency": "EURO"}),
        ("POST", "/v1/plans", 413): lambda c: c.post("/v1/plans", content=BIG, headers=JSON),
        ("POST", "/v1/plans", 415): lambda c: c.post("/v1/plans", content=b"{}", headers=TEXT),
        ("GET", pl, 200): lambda c: c.get("/v1/plans/probe_p"),
        ("GET", pl, 404): lambda c: c.get("/v1/plans/nope"),
        ("PUT", pl, 201): lambda c: c.put("/v1/plans/probe_r", json=PLAN),
        ("PUT", pl, 200): lambda c: c.put("/v1/plans/probe_r", json=PLAN),
        ("PUT", pl, 409): lambda c: c.put("/v1/plans/config_plan", json=PLAN),
        ("PUT", pl, 400): lambda c: c.put("/v1/plans/probe_r", json={**PLAN, "interval": "week"}),
        ("PUT", pl, 413): lambda c: c.put("/v1/plans/probe_r", content=BIG, headers=JSON),
        ("PUT", pl, 415): lambda c: c.put("/v1/plans/probe_r", content=b"{}", headers=TEXT),
        ("DELETE", pl, 204): lambda c: c.delete("/v1/plans/probe_r"),
        ("DELETE", pl, 404): lambda c: c.delete("/v1/plans/probe_r"),
        ("DELETE", pl, 409): lambda c: c.delete("/v1/plans/config_plan"),
        ("POST", "/v1/subscriptions", 201): subscribe,
        ("POST", "/v1/subscriptions", 409): lambda c: c.post(
            "/v1/subscriptions", json={"customer_id": "cust_sub", "plan": "probe_p", "start": T0 + 1}),
        ("POST", "/v1/subscriptions", 400): lambda c: c.post(
            "/v1/subscriptions", json={"customer_id": "cust_sub", "plan": "nope"}),
        ("POST", "/v1/subscriptions", 413): lambda c: c.post("/v1/subscriptions", content=BIG, headers=JSON),
        ("POST", "/v1/subscriptions", 415): lambda c: c.post("/v1/subscriptions", content=b"{}", headers=TEXT),
        ("GET", "/v1/subscriptions", 200): lambda c: c.get("/v1/subscriptions", params={"customer_id": "cust_sub"}),
        ("GET", "/v1/subscriptions", 400): lambda c: c.get("/v1/subscriptions", params={"customer_id": "bad id"}),
        ("GET", sub, 200): lambda c: c.get(f"/v1/subscriptions/{made['sub']}"),
        ("GET", sub, 404): lambda c: c.get("/v1/subscriptions/sub_none"),
        ("GET", up, 200): lambda c: c.get(up.format(customer_id="cust_sub")),
        ("GET", up, 400): lambda c: c.get(up.format(customer_id="cust_sub"), params={"subscription_id": "x"}),
        ("GET", up, 404): lambda c: c.get(up.format(customer_id="cust_none")),
        ("GET", up, 422): expensive_invoice,
        ("POST", sub + "/change", 200): change,
        ("POST", sub + "/change", 400): lambda c: c.post(f"/v1/subscriptions/{made['sub']}/change",
                                                         json={"plan": "probe_p", "at": "soon"}),
        ("POST", sub + "/change", 404): lambda c: c.post("/v1/subscriptions/sub_none/change", json={"plan": "probe_p"}),
        ("POST", sub + "/change", 409): lambda c: c.post(f"/v1/subscriptions/{made['sub']}/change",
                                                         json={"plan": "probe_p", "at": T0 + 2000}),
        ("POST", sub + "/change", 413): lambda c: c.post("/v1/subscriptions/sub_none/change", content=BIG,
                                                         headers=JSON),
        ("POST", sub + "/change", 415): lambda c: c.post("/v1/subscriptions/sub_none/change", content=b"{}",
                                                         headers=TEXT),
        ("POST", sub + "/cancel", 200): lambda c: c.post(f"/v1/subscriptions/{made['new']}/cancel", json={}),
        ("POST", sub + "/cancel", 400): lambda c: c.post(f"/v1/subscriptions/{made['new']}/cancel", json={"at": -1}),
        ("POST", sub + "/cancel", 404): lambda c: c.post("/v1/subscriptions/sub_none/cancel", json={}),
        ("POST", sub + "/cancel", 409): lambda c: c.post(f"/v1/subscriptions/{made['new']}/cancel", json={}),
        ("POST", sub + "/cancel", 413): lambda c: c.post("/v1/subscriptions/sub_none/cancel", content=BIG,
                                                         headers=JSON),
        ("POST", sub + "/cancel", 415): lambda c: c.post("/v1/subscriptions/sub_none/cancel", content=b"{}",
                                                         headers=TEXT),
        ("POST", events, 200): lambda c: c.post(events, content=samples.body([samples.seed_event()]), headers=JSON),
        ("POST", events, 400): lambda c: c.post(events, content=b"{}", headers=JSON),
        ("POST", events, 413): lambda c: c.post(events, content=samples.body(samples.batch(1001)), headers=JSON),
        ("POST", events, 415): lambda c: c.post(events, content=b"{}", headers=TEXT),
        ("GET", "/v1/events/lag", 200): lambda c: c.get("/v1/events/lag"),
        ("GET", "/v1/meters", 200): lambda c: c.get("/v1/meters"),
        ("GET", "/v1/meters", 400): lambda c: c.get("/v1/meters", params={"limit": "0"}),
        ("POST", "/v1/meters", 201): lambda c: c.post("/v1/meters", json={"code": "probe_a", **METER}),
        ("POST", "/v1/meters", 409): lambda c: c.post("/v1/meters", json={"code": "probe_a", **METER}),
        ("POST", "/v1/meters", 400): lambda c: c.post("/v1/meters", json={"code": "Bad", **METER}),
        ("POST", "/v1/meters", 413): lambda c: c.post("/v1/meters", content=BIG, headers=JSON),
        ("POST", "/v1/meters", 415): lambda c: c.post("/v1/meters", content=b"{}", headers=TEXT),
        ("GET", m, 200): lambda c: c.get("/v1/meters/api_calls"),
        ("GET", m, 404): lambda c: c.get("/v1/meters/nope"),
        ("GET", m + "/versions", 200): lambda c: c.get("/v1/meters/api_calls/versions"),
        ("GET", m + "/versions", 404): lambda c: c.get("/v1/meters/nope/versions"),
        ("PUT", m, 201): lambda c: c.put("/v1/meters/probe_b", json=METER),
        ("PUT", m, 200): lambda c: c.put("/v1/meters/probe_b", json=METER),
        ("PUT", m, 412): lambda c: c.put("/v1/meters/probe_b", json=METER, headers=STALE),
        ("PUT", m, 409): lambda c: c.put("/v1/meters/api_calls", json=METER),
        ("PUT", m, 400): lambda c: c.put("/v1/meters/probe_b", json={"aggregation": "MEDIAN"}),
        ("PUT", m, 413): lambda c: c.put("/v1/meters/probe_b", content=BIG, headers=JSON),
        ("PUT", m, 415): lambda c: c.put("/v1/meters/probe_b", content=b"{}", headers=TEXT),
        ("DELETE", m, 412): lambda c: c.delete("/v1/meters/probe_b", headers=STALE),
        ("DELETE", m, 204): lambda c: c.delete("/v1/meters/probe_b"),
        ("DELETE", m, 404): lambda c: c.delete("/v1/meters/probe_b"),
        ("DELETE", m, 409): lambda c: c.delete("/v1/meters/api_calls"),
        ("GET", "/v1/usage", 200): lambda c: c.get("/v1/usage", params={**USAGE, "start": 1, "end": 2}),
        ("GET", "/v1/usage", 400): lambda c: c.get("/v1/usage", params=USAGE),
        ("GET", "/v1/usage", 422): too_many_rows,
        ("GET", events, 200): lambda c: c.get(events, params={"customer_id": "c_none"}),
        ("GET", events, 400): lambda c: c.get(events, params={"cursor": "!"}),
        ("GET", events, 422): lambda c: c.get(events, params={"customer_id": "c_rows"}),
        ("GET", "/v1/customers", 200): lambda c: c.get("/v1/customers"),
        ("GET", "/v1/customers", 400): lambda c: c.get("/v1/customers", params={"limit": "x"}),
        ("PUT", cu, 201): lambda c: c.put("/v1/customers/cust_p", json={"name": "P"}),
        ("PUT", cu, 200): lambda c: c.put("/v1/customers/cust_p", json={"name": "P"}),
        ("PUT", cu, 412): lambda c: c.put("/v1/customers/cust_p", json={"name": "P"}, headers=STALE),
        ("PUT", cu, 400): lambda c: c.put("/v1/customers/cust_p", json={"currency": "euro"}),
        ("PUT", cu, 413): lambda c: c.put("/v1/customers/cust_p", content=BIG, headers=JSON),
        ("PUT", cu, 415): lambda c: c.put("/v1/customers/cust_p", content=b"{}", headers=TEXT),
        ("GET", cu, 200): lambda c: c.get("/v1/customers/cust_p"),
        ("GET", cu, 400): lambda c: c.get("/v1/customers/bad id!"),
        ("GET", cu, 404): lambda c: c.get("/v1/customers/cust_none"),
        ("PATCH", cu, 200): lambda c: c.patch("/v1/customers/cust_p", json={"name": "Q"}),
        ("PATCH", cu, 412): lambda c: c.patch("/v1/customers/cust_p", json={"name": "Q"}, headers=STALE),
        ("PATCH", cu, 400): lambda c: c.patch("/v1/customers/cust_p", json={"email": "nope"}),
        ("PATCH", cu, 404): lambda c: c.patch("/v1/customers/cust_none", json={"name": "Q"}),
        ("PATCH", cu, 413): lambda c: c.patch("/v1/customers/cust_p", content=BIG, headers=JSON),
        ("PATCH", cu, 415): lambda c: c.patch("/v1/customers/cust_p", content=b"{}", headers=TEXT),
        ("DELETE", cu, 412): lambda c: c.delete("/v1/customers/cust_p", headers=STALE),
        ("DELETE", cu, 204): lambda c: c.delete("/v1/customers/cust_p"),
        ("DELETE", cu, 400): lambda c: c.delete("/v1/customers/bad id!"),
        ("DELETE", cu, 404): lambda c: c.delete("/v1/customers/cust_p"),
        ("GET", "/v1/keys", 200): lambda c: c.get("/v1/keys"),
        ("GET", "/v1/keys", 400): lambda c: c.get("/v1/keys", params={"limit": "501"}),
        ("POST", "/v1/keys", 201): new_key,
        ("POST", "/v1/keys", 400): lambda c: c.post("/v1/keys", json={"scope": "root"}),
        ("POST", "/v1/keys", 413): lambda c: c.post("/v1/keys", content=BIG, headers=JSON),
        ("POST", "/v1/keys", 415): lambda c: c.post("/v1/keys", content=b"{}", headers=TEXT),
        ("DELETE", k, 412): lambda c: c.delete(f"/v1/keys/{made['key']}", headers=STALE),
        ("DELETE", k, 204): lambda c: c.delete(f"/v1/keys/{made['key']}"),
        ("DELETE", k, 404): lambda c: c.delete(f"/v1/keys/{made['key']}"),
        ("GET", "/v1/invoices", 200): lambda c: c.get("/v1/invoices", params={"status": "draft"}),
        ("GET", "/v1/invoices", 400): lambda c: c.get("/v1/invoices", params={"status": "open"}),
        ("GET", inv, 200): lambda c: c.get(invoice(0)),
        ("GET", inv, 404): lambda c: c.get(none_inv),
        ("GET", inv + ".html", 200): lambda c: c.get(invoice(0) + ".html"),
        ("GET", inv + ".html", 404): lambda c: c.get(none_inv + ".html"),
        ("GET", inv + ".pdf", 200): lambda c: c.get(invoice(0) + ".pdf"),
        ("GET", inv + ".pdf", 404): lambda c: c.get(none_inv + ".pdf"),
        ("POST", inv + "/finalize", 200): lambda c: c.post(invoice(0) + "/finalize"),
        ("POST", inv + "/finalize", 409): lambda c: c.post(invoice(0) + "/finalize"),
        ("POST", inv + "/finalize", 404): lambda c: c.post(none_inv + "/finalize"),
        ("POST", inv + "/void", 200): lambda c: c.post(invoice(0) + "/void"),
        ("POST", inv + "/void", 409): lambda c: c.post(invoice(0) + "/void"),
        ("POST", inv + "/void", 404): lambda c: c.post(none_inv + "/void"),
        ("POST", inv + "/mark_paid", 409): lambda c: c.post(invoice(0) + "/mark_paid"),
        ("POST", inv + "/mark_paid", 200): paid,
        ("POST", inv + "/mark_paid", 404): lambda c: c.post(none_inv + "/mark_paid"),
        ("POST", inv + "/credit_notes", 201): lambda c: c.post(invoice(1) + "/credit_notes", json={"amount": "1.00"}),
        ("POST", inv + "/credit_notes", 400): lambda c: c.post(invoice(1) + "/credit_notes", json={"amount": "x"}),
        ("POST", inv + "/credit_notes", 404): lambda c: c.post(none_inv + "/credit_notes", json={}),
        ("POST", inv + "/credit_notes", 409): lambda c: c.post(invoice(0) + "/credit_notes", json={}),  # void
        ("POST", inv + "/credit_notes", 413): lambda c: c.post(none_inv + "/credit_notes", content=BIG, headers=JSON),
        ("POST", inv + "/credit_notes", 415): lambda c: c.post(none_inv + "/credit_notes", content=b"{}",
                                                               headers=TEXT),
        ("GET", "/v1/closing/failures", 200): lambda c: c.get("/v1/closing/failures"),
        ("GET", "/v1/closing/failures", 400): lambda c: c.get("/v1/closing/failures", params={"limit": "0"}),
        ("GET", inv + ".html", 304): lambda c: unchanged(invoice(0) + ".html")(c),
        ("GET", inv + ".pdf", 304): lambda c: unchanged(invoice(0) + ".pdf")(c),
        ("GET", "/v1/credit_notes", 200): lambda c: c.get("/v1/credit_notes",
                                                          params={"invoice_id": invoice(0).rsplit("/", 1)[1]}),
        ("GET", "/v1/credit_notes", 400): lambda c: c.get("/v1/credit_notes", params={"invoice_id": "inv_x"}),
        ("GET", cn, 200): lambda c: c.get(note()),
        ("GET", cn, 404): lambda c: c.get(none_cn),
        ("GET", cn + ".html", 200): lambda c: c.get(note() + ".html"),
        ("GET", cn + ".html", 304): lambda c: unchanged(note() + ".html")(c),
        ("GET", cn + ".html", 404): lambda c: c.get(none_cn + ".html"),
        ("GET", cn + ".pdf", 200): lambda c: c.get(note() + ".pdf"),
        ("GET", cn + ".pdf", 304): lambda c: unchanged(note() + ".pdf")(c),
        ("GET", cn + ".pdf", 404): lambda c: c.get(none_cn + ".pdf"),
        ("POST", "/v1/webhooks", 201): new_webhook,
        ("POST", "/v1/webhooks", 400): lambda c: c.post("/v1/webhooks", json={"url": "x", "events": []}),
        ("POST", "/v1/webhooks", 413): lambda c: c.post("/v1/webhooks", content=BIG, headers=JSON),
        ("POST", "/v1/webhooks", 415): lambda c: c.post("/v1/webhooks", content=b"{}", headers=TEXT),
        ("GET", "/v1/webhooks", 200): lambda c: c.get("/v1/webhooks"),
        ("GET", "/v1/webhooks", 400): lambda c: c.get("/v1/webhooks", params={"cursor": "no way"}),
        ("GET", wh + "/deliveries", 200): lambda c: c.get(made["webhook"] + "/deliveries"),
        ("GET", wh + "/deliveries", 400): lambda c: c.get(made["webhook"] + "/deliveries", params={"limit": "0"}),
        ("GET", wh + "/deliveries", 404): lambda c: c.get(none_wh + "/deliveries"),
        ("DELETE", wh, 204): lambda c: c.delete(made["webhook"]),
        ("DELETE", wh, 404): lambda c: c.delete(made["webhook"]),
        ("GET", "/health", 200): lambda c: c.get("/health"),
        ("GET", "/ready", 200): lambda c: c.get("/ready"),
        ("GET", "/metrics", 200): lambda c: c.get("/metrics"),
        ("GET", "/openapi.json", 200): lambda c: c.get("/openapi.json"),
    }


def call(method: str, url: str, headers: dict[str, str], times: int = 1) -> Probe:
    def probe(c: httpx.Client) -> httpx.Response:
        for _ in range(times - 1):
            c.request(method, url, headers=headers)
        return c.request(method, url, headers=headers)

    return probe


def stalled(server: MeterFlowServer, method: str, path: str) -> Probe:
    """A body that stops arriving: the route's answer once the server's body timeout passes."""

    def probe(c: httpx.Client) -> int:
        url = path.format(**SAMPLE)
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:  # 30 s: the deadline
            s.sendall(f"{method} {url} HTTP/1.1\r\nHost: x\r\nAuthorization: {server.auth['Authorization']}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode())  # fmt: skip
            head = s.recv(64)
        return int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else 0

    return probe


def guard_probes(c: httpx.Client, doc: dict[str, Any]) -> dict[tuple[str, str, int], Probe]:
    """401, 403 and 429 on every route that needs a key: `requires` answers them before the route runs."""
    probes: dict[tuple[str, str, int], Probe] = {}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if not op["security"]:
                continue
            url = path.format(**SAMPLE)
            needed = "admin" if "`admin` (or" in op["description"] else op["description"].split("`")[1]
            wrong = key(c, "read" if needed != "read" else "ingest")
            limited = key(c, needed, requests_per_s=1, requests_burst=1)

            m = method.upper()
            probes[(m, path, 401)] = call(m, url, {"Authorization": ""})
            probes[(m, path, 403)] = call(m, url, wrong)
            probes[(m, path, 429)] = call(m, url, limited, times=2)  # a burst of 1: the second is refused
    return probes


def test_every_documented_answer_is_one_the_route_gives(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer], tmp_path: Path
) -> None:
    config = tmp_path / "plans.toml"
    config.write_text(CONFIG)
    backend = make_backend("embedded")
    server = start_server(backend, MF_HTTP_BODY_TIMEOUT_S="1", MF_USAGE_MAX_RESULT_ROWS="1",
                          MF_CONFIG=str(config), **WEBHOOKS_TO_LOOPBACK)  # fmt: skip
    with httpx.Client(base_url=server.url, headers=server.auth, timeout=30) as c:
        served = c.get("/openapi.json")
        assert served.status_code == 200
        doc = orjson.loads(served.content)
        validate(doc)
        probes = {**route_probes(c, backend.env["MF_DATA_DIR"]), **guard_probes(c, doc)}
        for path, ops in doc["paths"].items():
            for method, op in ops.items():
                if "requestBody" in op:
                    probes[(method.upper(), path, 408)] = stalled(server, method.upper(), path)
        expected = documented(doc)
        not_probed = {x for x in expected if x[2] in NOT_PROBED_HERE}
        # A code documented without a probe, or probed without documentation, fails here.
        assert set(probes) == expected - not_probed, (expected - not_probed) ^ set(probes)
        answers = {what: status(probe(c)) for what, probe in probes.items()}
    assert {what: status for what, status in answers.items() if status != what[2]} == {}
