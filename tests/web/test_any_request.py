"""Any request a client can make, with any kind of key, on the embedded default (issue 23): never a 500,
never a stack trace, never an answer past the documented size caps, and a bounded worker RSS over
1,000 requests.

The requests are drawn by Hypothesis from every route the server documents (`/openapi.json`) and every
dashboard page: the method, path parameters (ids that exist, ids that don't, ids no id rule admits),
query parameters (the route's own and others, with any text or number), bodies (near-valid ones
mutated, any JSON, raw bytes) and headers (content types, `If-Match`), sent with no key, a malformed
key, an unknown key, a customer-bound ingest key, an ingest key, a read key or an admin key, or with a
dashboard session of a read or an admin key.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness.backends import Backend
from tests.harness.http import sign_in
from tests.harness.meterflow import TEST_ADMIN_KEY, MeterFlowServer, starting
from tests.harness.processes import wait_for

REQUESTS = int(os.environ.get("MF_ANY_REQUEST_EXAMPLES", "1000"))
# The README's Security section: no answer is larger than this (the largest are usage reads at their
# row cap and invoice documents at their line cap), and this worker's RSS grows by less than this over
# the requests (after a warm-up that loads every route's code once).
ANSWER_MAX_BYTES = 16 * 1024 * 1024
RSS_GROWTH_MAX_BYTES = 128 * 1024 * 1024
DAY = 86_400_000

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
DASHBOARD_GETS = [
    "/dashboard/", "/dashboard/overview/live", "/dashboard/signin", "/dashboard/customers",
    "/dashboard/customers/{customer_id}", "/dashboard/customers/{customer_id}/usage", "/dashboard/meters",
    "/dashboard/plans", "/dashboard/invoices", "/dashboard/invoices/{invoice_id}",
    "/dashboard/invoices/{invoice_id}/document.html", "/dashboard/invoices/{invoice_id}/document.pdf",
    "/dashboard/keys", "/dashboard/events",
]  # fmt: skip
DASHBOARD_POSTS = [
    "/dashboard/signin", "/dashboard/signout", "/dashboard/keys", "/dashboard/keys/{key_id}/revoke",
    "/dashboard/invoices/{invoice_id}/{action}",
]  # fmt: skip

# Any JSON value, small: the shapes a body's fields take when a client gets them wrong.
SCALARS = (
    st.none() | st.booleans() | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40)
    | st.sampled_from(["9" * 60, "-1", "1e400", "0.0000000000000000000000000000001", "NaN", "<b>x</b>", "#x"])
)  # fmt: skip
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
TEXT = st.text(max_size=60) | st.sampled_from(["", "0", "-1", "9" * 40, "a" * 2000, "%00", "../..", "DAY", "MONTH"])


class World:
    """What the server holds before the requests: one of every kind of thing, and a key of every kind."""

    def __init__(self, server: MeterFlowServer) -> None:
        self.server = server
        admin = httpx.Client(base_url=server.url, headers=server.auth, timeout=30)
        now = int(time.time() * 1000)
        self.now = now
        for code, body in {
            "fz_calls": {"event_type": "fz_call", "aggregation": "COUNT"},
            "fz_bytes": {"event_type": "fz_call", "aggregation": "SUM", "property": "bytes", "group_by": ["region"]},
        }.items():
            assert admin.post("/v1/meters", json={"code": code, **body}).status_code == 201
        plans = {
            "fz_unit": {"currency": "EUR", "charges": [{"type": "unit", "meter": "fz_calls", "unit_amount": "0.001"}]},
            "fz_dim": {"currency": "EUR", "charges": [{
                "meter": "fz_bytes", "price_by": "region",
                "prices": {"eu": {"type": "unit", "unit_amount": "1"}}, "default": {"type": "unit", "unit_amount": "2"},
            }]},
        }  # fmt: skip
        for code, plan in plans.items():
            r = admin.post("/v1/plans", json={"code": code, **plan})
            assert r.status_code == 201, r.text
        assert admin.put("/v1/customers/fz_c1", json={"name": "One"}).status_code in (200, 201)
        assert admin.put("/v1/customers/fz_c2", json={"name": "Two"}).status_code in (200, 201)
        subs = []
        for customer, plan in (("fz_c1", "fz_unit"), ("fz_c2", "fz_dim")):
            r = admin.post("/v1/subscriptions", json={"customer_id": customer, "plan": plan, "start": now - 45 * DAY})
            assert r.status_code == 201, r.text
            subs.append(r.json()["id"])
        events = [
            {"transaction_id": f"fz_{i}", "customer_id": "fz_c1" if i % 2 else "fz_c2", "event_type": "fz_call",
             "timestamp": now - i * 60_000, "properties": {"bytes": i, "region": ["eu", "us", "ap"][i % 3]}}
            for i in range(50)
        ]  # fmt: skip
        assert admin.post("/v1/events", json={"events": events}).json()["accepted"] == 50

        def key(scope: str, **extra: str) -> str:
            r = admin.post("/v1/keys", json={"scope": scope, "name": f"fz-{scope}", **extra})
            assert r.status_code == 201, r.text
            return str(r.json()["key"])

        self.keys: dict[str, str | None] = {
            "none": None, "malformed": "not-a-key", "unknown": "mf_" + "Z" * 44,
            "ingest_bound": key("ingest", customer_id="fz_c1"), "ingest": key("ingest"),
            "read": key("read"), "admin": TEST_ADMIN_KEY,
        }  # fmt: skip
        # Ids the requests may revoke: keys of their own, so the keys above keep answering.
        self.key_ids = [admin.post("/v1/keys", json={"scope": "read", "name": f"fz-spare-{i}"}).json()["id"]
                        for i in range(3)]  # fmt: skip

        def issued() -> list[str]:
            return [i["id"] for i in admin.get("/v1/invoices").json()["data"]]

        wait_for(lambda: len(issued()) >= 2, "the past periods' invoices", 60)
        self.invoice_ids = issued()
        self.subscription_ids = subs
        self.paths = sorted(
            (path, method.upper())
            for path, ops in admin.get("/openapi.json").json()["paths"].items()
            for method in ops if method.upper() in METHODS
        )  # fmt: skip
        self.sessions = {scope: self._session(self.keys[scope]) for scope in ("read", "admin")}
        admin.close()

    def _session(self, key: str | None) -> httpx.Cookies:
        with httpx.Client(base_url=self.server.url, timeout=30) as c:
            sign_in(c, key or "")
            return c.cookies

    def ids(self, name: str) -> st.SearchStrategy[str]:
        known = {
            "customer_id": ["fz_c1", "fz_c2", "nobody"], "code": ["fz_calls", "fz_bytes", "fz_unit", "fz_dim", "none"],
            "invoice_id": self.invoice_ids, "subscription_id": self.subscription_ids, "key_id": self.key_ids,
            "credit_note_id": ["cn_none"], "action": ["finalize", "void", "pay", "explode"],
        }.get(name, [])  # fmt: skip
        known = [*known, "x", "A" * 12]
        odd = st.sampled_from(["a" * 300, "..", "%2e%2e", "é", "in_0", "in_99999999999999999999", "-", "0" * 40])
        return (
            st.sampled_from(known)
            | st.sampled_from(known)
            | st.sampled_from(known)
            | odd
            | st.text(min_size=1, max_size=30)
        )


def templates(world: World) -> dict[str, dict[str, Any]]:
    """Valid bodies, by route, that the strategy mutates."""
    event = {"transaction_id": "fz_new", "customer_id": "fz_c1", "event_type": "fz_call",
             "timestamp": world.now, "properties": {"bytes": 5, "region": "eu"}}  # fmt: skip
    return {
        "/v1/events": {"events": [event]},
        "/v1/meters": {
            "code": "fz_m",
            "event_type": "fz_call",
            "aggregation": "SUM",
            "property": "bytes",
            "group_by": ["region"],
        },
        "/v1/meters/{code}": {"event_type": "fz_call", "aggregation": "MAX", "property": "bytes"},
        "/v1/customers/{customer_id}": {"name": "Renamed", "timezone": "Europe/Berlin"},
        "/v1/plans": {"code": "fz_p", "currency": "EUR", "charges": [{"type": "flat", "amount": "1.00"}]},
        "/v1/plans/{code}": {"currency": "EUR", "charges": [{"type": "unit", "meter": "fz_calls", "unit_amount": "1"}]},
        "/v1/subscriptions": {"customer_id": "fz_c1", "plan": "fz_unit", "start": world.now - DAY},
        "/v1/subscriptions/{subscription_id}/change": {"plan": "fz_dim", "at": world.now},
        "/v1/subscriptions/{subscription_id}/cancel": {"at": world.now + DAY},
        "/v1/keys": {"scope": "read", "name": "fz"},
        "/v1/webhooks": {"url": "https://hooks.example.com/x", "events": ["invoice.finalized"]},
        "/v1/invoices/{invoice_id}/credit_notes": {"reason": "manual", "total": "1.00"},
    }


def mutated(template: dict[str, Any]) -> st.SearchStrategy[Any]:
    """The template with some fields replaced by any JSON, removed, or added."""

    def apply(edits: list[tuple[int, str, Any]]) -> Any:
        body = json.loads(json.dumps(template))
        for kind, name, value in edits:
            target = body
            events = body.get("events") if isinstance(body, dict) else None
            if kind % 2 and isinstance(events, list) and events and isinstance(events[0], dict):
                target = events[0]
                if kind == 3 and isinstance(target.get("properties"), dict):
                    target = target["properties"]
            if not isinstance(target, dict):
                continue
            field = sorted(target)[len(name) % len(target)] if target else name
            if kind == 0:
                target.pop(field, None)
            elif kind == 4:
                target[name] = value
            else:
                target[field] = value
        return body

    return st.lists(st.tuples(st.integers(0, 4), st.text(max_size=10), JSON), max_size=3).map(apply)


@st.composite
def requests(draw: st.DrawFn, world: World, bodies: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One request: method, path, query, body, headers, key or session."""
    kind = draw(st.sampled_from(["api", "api", "api", "dashboard", "anywhere"]))
    headers: dict[str, str] = {}
    cookies = None
    if kind == "api":
        template, method = draw(st.sampled_from(world.paths))
        if draw(st.integers(0, 9)) == 0:
            method = draw(st.sampled_from(METHODS))
    elif kind == "dashboard":
        method = draw(st.sampled_from(["GET", "POST"]))
        template = draw(st.sampled_from(DASHBOARD_GETS if method == "GET" else DASHBOARD_POSTS))
        session = draw(st.sampled_from(["read", "admin", "none"]))
        cookies = world.sessions.get(session)
    else:
        method = draw(st.sampled_from(METHODS))
        template = "/" + quote(draw(st.text(max_size=40)), safe="/")
    path = re.sub(r"\{(\w+)\}", lambda m: quote(draw(world.ids(m.group(1))), safe=""), template)
    # The admin key reaches every route's own checks; the others mostly their refusals.
    key_kind = draw(st.sampled_from(["admin", "admin", "admin", "read", "ingest_bound", *sorted(world.keys)]))
    key = world.keys[key_kind]
    if key is not None and cookies is None:
        if draw(st.booleans()):
            headers["Authorization"] = f"Bearer {key}"
        else:
            headers["X-API-Key"] = key
    names = ["limit", "cursor", "customer_id", "meter", "start", "end", "window", "tz", "group_by", "filter",
             "status", "event_type", "format", "at", "subscription_id", "x"]  # fmt: skip
    query = draw(st.dictionaries(st.sampled_from(names), TEXT | st.integers(-(10**20), 10**20).map(str), max_size=6))
    content: bytes | None = None
    if method in ("POST", "PUT", "PATCH"):
        shape = draw(st.sampled_from(["template", "template", "json", "bytes", "form", "none"]))
        if shape == "template" and template in bodies:
            content = json.dumps(draw(mutated(bodies[template])), allow_nan=False).encode()
        elif shape in ("json", "template"):
            content = json.dumps(draw(JSON), allow_nan=False).encode()
        elif shape == "bytes":
            content = draw(st.binary(max_size=200))
        elif shape == "form":
            content = b"key=" + draw(st.binary(max_size=60)) + b"&csrf=x&scope=admin&name=x"
        headers["Content-Type"] = draw(st.sampled_from(
            ["application/x-www-form-urlencoded"] if shape == "form" else
            ["application/json"] * 6 + ["text/plain", "application/json; charset=latin-1", ""]
        ))  # fmt: skip
    if draw(st.integers(0, 5)) == 0:
        headers["If-Match"] = draw(st.sampled_from(['"1"', '"999"', "*", "garbage", '"' + "9" * 30 + '"']))
    return plain(method, path, headers, cookies, query, content)


def plain(method: str, path: str, headers: dict[str, str], cookies: httpx.Cookies | None = None,
          query: dict[str, str] | None = None, content: bytes | None = None) -> dict[str, Any]:  # fmt: skip
    """A request as `send` takes it."""
    return {"method": method, "path": path, "query": query or {}, "content": content, "headers": headers,
            "cookies": cookies}  # fmt: skip


def rss_bytes(pid: int) -> int:
    """The resident set of a process and its children (Granian's workers), from /proc."""
    total = 0
    for p in [pid, *children(pid)]:
        status = Path(f"/proc/{p}/status").read_text()
        total += int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]
    return total


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *children(int(child))]
    return found


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("any_request")
    with starting(MeterFlowServer, tmp) as start:
        server = start(
            Backend.embedded(tmp / "data"),
            # Limits high enough that the requests reach the routes rather than the limiter;
            # the past periods are closed at once.
            MF_RATE_REQUESTS_PER_S="100000", MF_RATE_REQUESTS_BURST="100000", MF_AUTH_FAILURES_PER_MINUTE="100000",
            MF_INVOICE_GRACE_S="0", MF_INVOICE_CLOSE_INTERVAL_S="1",
        )  # fmt: skip
        yield World(server)


def test_no_request_gets_a_500_an_oversized_answer_or_grows_the_worker(world: World) -> None:
    server = world.server
    bodies = templates(world)
    pid = server.proc.proc.pid  # type: ignore[union-attr]
    client = httpx.Client(base_url=server.url, timeout=60)
    sent: list[tuple[str, str, int]] = []

    def send(req: dict[str, Any]) -> httpx.Response:
        client.cookies.clear()
        if req["cookies"] is not None:
            client.cookies.update(req["cookies"])
        with client.stream(req["method"], req["path"], params=req["query"], content=req["content"],
                           headers=req["headers"]) as r:  # fmt: skip
            body = b""
            for chunk in r.iter_bytes():
                body += chunk
                assert len(body) <= ANSWER_MAX_BYTES, (req, r.status_code, "answer past the cap")
            r._content = body
        sent.append((req["method"], req["path"], r.status_code))
        return r

    def check(req: dict[str, Any], r: httpx.Response) -> None:
        assert r.status_code < 500 or (r.status_code == 503 and "retry-after" in r.headers), (req, r.text[:500])
        assert b"Traceback" not in r.content, req
        if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
            error = r.json()
            assert set(error) >= {"error", "message"} and error["error"] != "internal_error", (req, error)

    @settings(max_examples=REQUESTS, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(req=requests(world, bodies))
    def one(req: dict[str, Any]) -> None:
        check(req, send(req))

    # Warm-up: every documented route once with the admin key, every dashboard page once signed in.
    for path, method in world.paths:
        send(plain(method, re.sub(r"\{\w+\}", "x", path), {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}))
    for path in DASHBOARD_GETS:
        filled = path.replace("{customer_id}", "fz_c1").replace("{invoice_id}", world.invoice_ids[0])
        send(plain("GET", filled, {}, world.sessions["admin"]))
    sent.clear()
    before = rss_bytes(pid)
    one()
    while len(sent) < REQUESTS:  # Hypothesis may stop early once it has seen every shape it can tell apart
        one()
    after = rss_bytes(pid)
    client.close()
    statuses = Counter(s for _, _, s in sent)
    print("answers by status:", sorted(statuses.items()), "RSS before, after:", before, after)
    assert len(sent) >= REQUESTS and {200, 400, 401, 403, 404} <= statuses.keys(), statuses
    assert after - before < RSS_GROWTH_MAX_BYTES, (before, after)
    logs = server.logs()
    assert "Traceback" not in logs and "internal_error" not in logs, logs[-3000:]
