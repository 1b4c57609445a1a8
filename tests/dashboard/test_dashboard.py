"""The dashboard in a real headless browser (Debian's chromium driven by Playwright), against a real server."""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from meterflow import samples
from meterflow.app import create_app
from meterflow.config import Settings
from tests.harness.http import post_events
from tests.harness.invoice_samples import PLAN
from tests.harness.meterflow import MeterFlowServer
from tests.harness.processes import ROOT, wait_for

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
SHOTS = ROOT / "test-output" / "screenshots"
CUSTOMER = "cust_dash"
HOUR_MS = 3_600_000
_seq = itertools.count(1)


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeterFlowServer]:
    """One embedded server with a customer and a day of its events (hours apart, so the chart has a line)."""
    work = tmp_path_factory.mktemp("dashboard")
    # Periods are closed a second after they end: the subscription's last month becomes an invoice.
    server = MeterFlowServer(work, {"MF_STORAGE": "chdb", "MF_DEDUP": "memory", "MF_DATA_DIR": str(work / "data"),
                                    "MF_INVOICE_GRACE_S": "0", "MF_INVOICE_CLOSE_INTERVAL_S": "1"})  # fmt: skip
    server.start()
    with httpx.Client(base_url=server.url, headers=server.auth, timeout=30) as c:
        assert c.put(f"/v1/customers/{CUSTOMER}", json={"name": "Dash Board Ltd", "currency": "EUR"}).status_code == 201
        for i in range(30):
            assert c.put(f"/v1/customers/cust_list_{i:02d}", json={"name": f"Listed {i:02d}"}).status_code == 201
        now = samples.now_ms()
        events = []
        for h in range(12):
            for j in range(h % 4 + 1):  # 1 to 4 events an hour: a line that goes up and down
                e = samples.seed_event(now - h * HOUR_MS - j * 1000)
                events.append({**e, "customer_id": CUSTOMER, "transaction_id": f"dash_{h}_{j}"})
        r = post_events(c, events)
        assert r.json()["accepted"] == len(events), r.text
        bad = [{**samples.seed_event(), "customer_id": CUSTOMER, "transaction_id": "bad", "event_type": ""}]
        post_events(c, bad)
        assert c.post("/v1/plans", json=PLAN).status_code == 201
        this = dt.datetime.now(dt.UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        last_month = int((this - dt.timedelta(days=1)).replace(day=1).timestamp() * 1000)
        r = c.post("/v1/subscriptions", json={"customer_id": CUSTOMER, "plan": "pro", "start": last_month})
        assert r.status_code == 201, r.text
        wait_for(lambda: c.get("/v1/invoices", params={"customer_id": CUSTOMER}).json()["data"], "the invoice", 60)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def new_key(server: MeterFlowServer, scope: str) -> tuple[str, str]:
    with httpx.Client(base_url=server.url, headers=server.auth, timeout=30) as c:
        r = c.post("/v1/keys", json={"scope": scope, "name": f"{scope} {next(_seq)}"})
        assert r.status_code == 201, r.text
        return r.json()["id"], r.json()["key"]


@pytest.fixture
def session(browser: Browser, dash: MeterFlowServer) -> Callable[..., Page]:
    contexts: list[BrowserContext] = []

    def open_as(key: str, width: int = 1280) -> Page:
        ctx = browser.new_context(viewport={"width": width, "height": 900})
        contexts.append(ctx)
        page = ctx.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.errors = errors  # type: ignore[attr-defined]
        page.goto(dash.url + "/dashboard/")
        assert page.url.endswith("/dashboard/signin")
        page.fill("input[name=key]", key)
        page.click("button[type=submit]")
        page.wait_for_url(dash.url + "/dashboard/")
        return page

    yield open_as  # type: ignore[misc]
    for ctx in contexts:
        ctx.close()


ADMIN = MeterFlowServer.auth["Authorization"].removeprefix("Bearer ")
PAGES = {"overview": "/dashboard/", "customers": "/dashboard/customers", "customer": f"/dashboard/customers/{CUSTOMER}",
         "meters": "/dashboard/meters", "events": f"/dashboard/events?customer_id={CUSTOMER}",
         "keys": "/dashboard/keys", "plans": "/dashboard/plans", "invoices": "/dashboard/invoices"}  # fmt: skip


@pytest.mark.parametrize("width", [1280, 390])
def test_every_page_opens_after_signing_in(session: Callable[..., Page], dash: MeterFlowServer, width: int) -> None:
    page = session(ADMIN, width)
    SHOTS.mkdir(parents=True, exist_ok=True)
    for name, path in PAGES.items():
        response = page.goto(dash.url + path)
        assert response is not None and response.status == 200, (name, response and response.status)
        page.wait_for_load_state("networkidle")
        if name in ("overview", "customer"):
            page.wait_for_selector("div.chart canvas")
        # No horizontal scrolling of the page itself: wide tables scroll in their own box.
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), name
        page.screenshot(path=str(SHOTS / f"{name}-{width}.png"), full_page=True)
    assert page.errors == []  # type: ignore[attr-defined]


def test_pages_show_readable_numbers_and_the_data(session: Callable[..., Page], dash: MeterFlowServer) -> None:
    page = session(ADMIN)
    # Overview: the events this worker received, failures by reason, services' health.
    assert page.locator(".stat:has-text('Accepted') .value").inner_text() == "30"
    failures = page.locator("section:has(h2:has-text('Failures by reason')) tbody tr")
    assert failures.count() == 1 and failures.first.locator("td.num").inner_text() == "1"
    assert page.locator(".badge.ok").count() >= 3
    # Customers: search through htmx, paging by cursor.
    page.goto(dash.url + "/dashboard/customers")
    assert page.locator("table.list tbody tr").count() == 25
    page.click("a[rel=next]")
    assert page.locator("table.list tbody tr").count() == 6
    page.goto(dash.url + "/dashboard/customers")
    page.fill("#q", "dash board")
    expect(page.locator("#customers tbody tr")).to_have_count(1)
    assert CUSTOMER in page.locator("#customers").inner_text()
    # Events explorer: newest first, each with its properties.
    page.goto(dash.url + f"/dashboard/events?customer_id={CUSTOMER}")
    rows = page.locator("table.events tbody tr")
    assert rows.count() == 25
    assert "dash_0_0" in rows.first.inner_text()
    page.click("a[rel=next]")
    assert page.locator("table.events tbody tr").count() == 5


def test_usage_chart_draws_the_usage_the_api_gives(session: Callable[..., Page], dash: MeterFlowServer) -> None:
    page = session(ADMIN)
    page.goto(dash.url + f"/dashboard/customers/{CUSTOMER}?window=HOUR&period=24h")
    page.wait_for_selector("div.chart[data-chart='usage-api_calls'] canvas")
    shown = orjson.loads(page.locator("#usage-api_calls").inner_text())
    # What uPlot holds: [x seconds, y values], read back from the chart object itself.
    xs, ys = page.evaluate("window.mfCharts['usage-api_calls'].data")
    with httpx.Client(base_url=dash.url, headers=dash.auth, timeout=30) as c:
        api = c.get("/v1/usage", params={"customer_id": CUSTOMER, "meter": "api_calls", "window": "HOUR",
                                         "start": shown["period"]["start"], "end": shown["period"]["end"],
                                         "tz": "UTC"}).json()  # fmt: skip
    assert [s["start"] // 1000 for s in api["series"]] == xs
    assert [Decimal(str(s["value"])) for s in api["series"]] == [Decimal(str(y)) for y in ys]
    assert sum(ys) == 30 and len({y for y in ys if y}) > 1  # a line with ups and downs, all events in it
    # The pickers redraw through htmx: a day window over 30 days.
    page.select_option("select[name=window]", "DAY")
    page.select_option("select[name=period]", "30d")
    # (Polled from here: the page's CSP forbids the string eval wait_for_function would use.)
    wait_for(lambda: page.evaluate("window.mfCharts['usage-api_calls'].data[0].length") >= 30, "the day chart", 30)
    day = orjson.loads(page.locator("#usage-api_calls").inner_text())
    assert day["window"] == "DAY" and sum(Decimal(str(s["value"])) for s in day["series"]) == 30


def test_a_key_is_created_shown_once_and_revoked(session: Callable[..., Page], dash: MeterFlowServer) -> None:
    page = session(ADMIN)
    page.goto(dash.url + "/dashboard/keys")
    page.select_option("select[name=scope]", "read")
    page.fill("input[name=name]", "made in the browser")
    page.click("text=Create key")
    secret = page.locator("#new-secret").inner_text()
    key_id = page.locator(".created code").first.inner_text()
    with httpx.Client(base_url=dash.url, timeout=30) as c:
        assert c.get("/v1/customers", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
        page.goto(dash.url + "/dashboard/keys")
        assert page.locator("#new-secret").count() == 0  # shown once
        assert secret not in page.content()
        page.locator(f"tr[data-key='{key_id}'] button:has-text('Revoke')").click()
        page.wait_for_url(dash.url + "/dashboard/keys")
        assert page.locator(f"tr[data-key='{key_id}']").count() == 0
        wait_for(lambda: c.get("/v1/customers", headers={"Authorization": f"Bearer {secret}"}).status_code == 401,
                 "the revoked key refused", 10)  # fmt: skip
    assert page.errors == []  # type: ignore[attr-defined]


def the_invoice(server: MeterFlowServer) -> dict[str, Any]:
    with httpx.Client(base_url=server.url, headers=server.auth, timeout=30) as c:
        invoice: dict[str, Any] = c.get("/v1/invoices", params={"customer_id": CUSTOMER}).json()["data"][0]
        return invoice


def test_the_customer_page_shows_subscription_upcoming_and_past_invoices(
    session: Callable[..., Page], dash: MeterFlowServer
) -> None:
    page = session(ADMIN)
    page.goto(dash.url + f"/dashboard/customers/{CUSTOMER}")
    with httpx.Client(base_url=dash.url, headers=dash.auth, timeout=30) as c:
        upcoming = c.get(f"/v1/customers/{CUSTOMER}/upcoming_invoice").json()
    assert "pro" in page.locator("section:has(h2:has-text('Subscriptions'))").inner_text()
    # The same total as the API, in the currency's format.
    total = Decimal(upcoming["total"])
    assert page.locator(".upcoming .total-amount").inner_text() == f"€{total:,.2f}"
    invoice = the_invoice(dash)
    assert page.locator(f"a[href='/dashboard/invoices/{invoice['id']}']").count() == 1


def test_an_invoice_is_voided(session: Callable[..., Page], dash: MeterFlowServer) -> None:
    invoice = the_invoice(dash)
    page = session(ADMIN)
    page.goto(dash.url + f"/dashboard/invoices?customer_id={CUSTOMER}&status={invoice['status']}")
    page.click(f"a[href='/dashboard/invoices/{invoice['id']}']")
    assert page.locator(".total-amount").inner_text() == f"€{Decimal(invoice['total']):,.2f}"
    # The page shows the invoice's own HTML document, and links its PDF.
    expect(page.frame_locator("iframe.invoice-frame").locator("body")).to_contain_text(invoice["number"] or "Draft")
    pdf = page.request.get(dash.url + str(page.locator("a.pdf").get_attribute("href")))
    assert pdf.status == 200 and pdf.headers["content-type"] == "application/pdf" and pdf.body()[:5] == b"%PDF-"
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "invoice-1280.png"), full_page=True)
    if invoice["status"] == "draft":  # the closer may leave drafts or finalize them itself
        page.click("button:has-text('Finalize')")
        assert "finalized" in page.locator(".notice").inner_text()
    assert the_invoice(dash)["status"] == "finalized" and the_invoice(dash)["number"]
    page.click("button:has-text('Void')")
    assert "voided" in page.locator(".notice").inner_text()
    assert the_invoice(dash)["status"] == "void"
    assert page.locator(".actions button").count() == 0  # nothing more to do with a void invoice
    page.goto(dash.url + "/dashboard/invoices?status=void")
    assert invoice["id"] in page.locator("table.invoices").inner_text()
    assert page.errors == []  # type: ignore[attr-defined]


def test_invoice_documents_carry_a_csp_header_and_keep_their_bytes(
    session: Callable[..., Page], dash: MeterFlowServer
) -> None:
    invoice = the_invoice(dash)
    with httpx.Client(base_url=dash.url, headers=dash.auth, timeout=30) as c:
        r = c.get(f"/v1/invoices/{invoice['id']}.html")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert r.headers["content-security-policy"].startswith("default-src 'none'")
        if "etag" in r.headers:  # a frozen document: the policy is a header, its bytes are as stored
            assert r.headers["etag"] == f'"{hashlib.sha256(r.content).hexdigest()}"'
    page = session(ADMIN)
    framed = page.request.get(dash.url + f"/dashboard/invoices/{invoice['id']}/document.html")
    assert framed.status == 200 and framed.headers["content-security-policy"].startswith("default-src 'none'")


def keys_stored(server: MeterFlowServer) -> list[str]:
    with httpx.Client(base_url=server.url, headers=server.auth, timeout=30) as c:
        return [k["id"] for k in c.get("/v1/keys", params={"limit": 500}).json()["data"]]


def test_a_read_key_sees_what_the_api_lets_it_read_and_changes_nothing(
    session: Callable[..., Page], dash: MeterFlowServer
) -> None:
    victim, _ = new_key(dash, "ingest")
    _, read = new_key(dash, "read")
    page = session(read)
    for name, path in PAGES.items():
        response = page.goto(dash.url + path)
        assert response is not None and response.status == (403 if name == "keys" else 200), name
    # The keys, like GET /v1/keys, need an admin key: refused, no key listed, no link to them.
    with httpx.Client(base_url=dash.url, timeout=30) as c:
        assert c.get("/v1/keys", headers={"Authorization": f"Bearer {read}"}).status_code == 403
    page.goto(dash.url + "/dashboard/keys")
    assert "this page needs an `admin` key" in page.locator("main").inner_text()
    assert victim not in page.content() and page.locator("tr[data-key]").count() == 0
    assert page.locator("nav a[href='/dashboard/keys']").count() == 0
    assert page.locator("button:has-text('Revoke')").count() == 0
    assert page.locator("text=Create key").count() == 0
    before = keys_stored(dash)
    # The server refuses, whatever the page shows: forged posts with the session's valid CSRF token.
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    made = page.request.post(dash.url + "/dashboard/keys", form={"csrf": csrf or "", "scope": "admin"})
    revoked = page.request.post(dash.url + f"/dashboard/keys/{victim}/revoke", form={"csrf": csrf or ""})
    invoice = the_invoice(dash)
    paid = page.request.post(dash.url + f"/dashboard/invoices/{invoice['id']}/mark_paid", form={"csrf": csrf or ""})
    assert (made.status, revoked.status, paid.status) == (403, 403, 403)
    assert "changes need an `admin` key" in made.text()
    assert keys_stored(dash) == before
    assert the_invoice(dash)["status"] == invoice["status"]
    page.goto(dash.url + f"/dashboard/invoices/{invoice['id']}")
    assert page.locator(".actions").count() == 0


def test_an_admin_session_sees_the_keys_link(session: Callable[..., Page], dash: MeterFlowServer) -> None:
    page = session(ADMIN)
    assert page.locator("nav a[href='/dashboard/keys']").count() == 1


def test_every_dashboard_page_needs_the_scope_its_api_route_needs() -> None:
    """Each page or action against the API route that reads or changes the same data (app.py's `requires`)."""
    app = create_app(Settings())

    def scope_of(routes: Any, method: str, path: str) -> str:
        for r in routes:
            if getattr(r, "path", None) == path and method in (getattr(r, "methods", None) or ()):
                return str(r.endpoint.scope)
        raise AssertionError(f"no route {method} {path}")

    mount = next(r for r in app.routes if getattr(r, "path", "") == "/dashboard")
    api: dict[tuple[str, str], list[tuple[str, str]]] = {
        ("GET", "/"): [("GET", "/metrics"), ("GET", "/v1/events/lag")],
        ("GET", "/overview/live"): [("GET", "/metrics"), ("GET", "/v1/events/lag")],
        ("POST", "/signout"): [],
        ("GET", "/customers"): [("GET", "/v1/customers")],
        ("GET", "/customers/{customer_id}"): [("GET", "/v1/customers/{customer_id}"), ("GET", "/v1/subscriptions"),
                                              ("GET", "/v1/customers/{customer_id}/upcoming_invoice"),
                                              ("GET", "/v1/invoices"), ("GET", "/v1/usage")],
        ("GET", "/customers/{customer_id}/usage"): [("GET", "/v1/usage"), ("GET", "/v1/meters")],
        ("GET", "/meters"): [("GET", "/v1/meters")],
        ("GET", "/plans"): [("GET", "/v1/plans")],
        ("GET", "/invoices"): [("GET", "/v1/invoices"), ("GET", "/v1/closing/failures")],
        ("GET", "/invoices/{invoice_id}"): [("GET", "/v1/invoices/{invoice_id}"), ("GET", "/v1/customers/{customer_id}")],
        ("GET", "/invoices/{invoice_id}/document.html"): [("GET", "/v1/invoices/{invoice_id}.html")],
        ("GET", "/invoices/{invoice_id}/document.pdf"): [("GET", "/v1/invoices/{invoice_id}.pdf")],
        ("POST", "/invoices/{invoice_id}/{action}"): [("POST", "/v1/invoices/{invoice_id}/finalize"),
                                                      ("POST", "/v1/invoices/{invoice_id}/void"),
                                                      ("POST", "/v1/invoices/{invoice_id}/mark_paid")],
        ("GET", "/keys"): [("GET", "/v1/keys")],
        ("POST", "/keys"): [("POST", "/v1/keys")],
        ("POST", "/keys/{key_id}/revoke"): [("DELETE", "/v1/keys/{key_id}")],
        ("GET", "/events"): [("GET", "/v1/events")],
    }  # fmt: skip
    rank = {"read": 0, "admin": 1}
    signed = [(m, r.path) for r in mount.routes for m in sorted(getattr(r, "methods", None) or ())
              if m != "HEAD" and hasattr(r.endpoint, "scope")]  # fmt: skip
    assert sorted(signed) == sorted(api), "every signed-in page is in this table"
    for (method, path), mirrors in api.items():
        needed = max((scope_of(app.routes, m, p) for m, p in mirrors), key=rank.__getitem__, default="read")
        assert scope_of(mount.routes, method, path) == needed, (method, path)


def test_a_post_without_the_csrf_token_is_refused(session: Callable[..., Page], dash: MeterFlowServer) -> None:
    victim, _ = new_key(dash, "ingest")
    page = session(ADMIN)
    before = keys_stored(dash)
    made = page.request.post(dash.url + "/dashboard/keys", form={"scope": "admin"})
    wrong = page.request.post(dash.url + f"/dashboard/keys/{victim}/revoke", form={"csrf": "0" * 64})
    assert (made.status, wrong.status) == (403, 403)
    assert "csrf" in made.text()
    assert keys_stored(dash) == before
    # The sign-in form has its own token too.
    fresh = page.context.browser.new_context()  # type: ignore[union-attr]
    r = fresh.request.post(dash.url + "/dashboard/signin", form={"key": ADMIN}, max_redirects=0)
    assert r.status == 403 and "mf_session" not in (r.headers.get("set-cookie") or "")
    fresh.close()


def test_revoking_the_key_ends_its_sessions(session: Callable[..., Page], dash: MeterFlowServer) -> None:
    key_id, read = new_key(dash, "read")
    page = session(read)
    with httpx.Client(base_url=dash.url, headers=dash.auth, timeout=30) as c:
        assert c.delete(f"/v1/keys/{key_id}").status_code == 204

    def signed_out() -> bool:
        page.goto(dash.url + "/dashboard/customers")
        return page.url.endswith("/dashboard/signin?why=revoked")

    wait_for(signed_out, "the session of a revoked key ended", 10)
    assert "revoked" in page.locator(".notice").inner_text()


def test_sign_out_ends_the_session_and_bad_keys_cannot_sign_in(
    session: Callable[..., Page], dash: MeterFlowServer
) -> None:
    page = session(ADMIN)
    page.click("text=Sign out")
    page.wait_for_url("**/dashboard/signin")
    assert page.goto(dash.url + "/dashboard/keys") is not None and page.url.endswith("/dashboard/signin")
    _, ingest = new_key(dash, "ingest")
    for key, message in ((ingest, "sign in with a `read` or `admin` key"), ("mf_" + "x" * 44, "unknown or revoked")):
        page.fill("input[name=key]", key)
        page.click("button[type=submit]")
        assert message in page.locator(".error").inner_text()


def test_sign_out_ends_the_session_for_every_copy_of_its_cookie(
    session: Callable[..., Page], dash: MeterFlowServer
) -> None:
    page = session(ADMIN)
    page.goto(dash.url + "/dashboard/keys")
    cookie = next(c["value"] for c in page.context.cookies() if c["name"] == "mf_session")
    csrf = str(page.locator("input[name=csrf]").first.get_attribute("value"))
    page.click("text=Sign out")
    page.wait_for_url("**/dashboard/signin")
    before = keys_stored(dash)
    # A copy of the cookie taken before signing out (another tab, a stolen copy) is refused everywhere.
    with httpx.Client(base_url=dash.url, cookies={"mf_session": cookie}, timeout=30) as c:
        made = c.post("/dashboard/keys", data={"csrf": csrf, "scope": "admin", "name": "after sign-out"})
        assert made.status_code == 303 and made.headers["location"] == "/dashboard/signin", made.text
        listed = c.get("/dashboard/keys")
        assert listed.status_code == 303 and "mf_" not in listed.text
    assert keys_stored(dash) == before


def test_session_cookie_flags(dash: MeterFlowServer) -> None:
    with httpx.Client(base_url=dash.url, timeout=30) as c:
        for proto, secure in (("http", False), ("https", True)):
            form = c.get("/dashboard/signin")
            token = form.text.split('name="csrf" value="')[1].split('"')[0]
            r = c.post("/dashboard/signin", data={"csrf": token, "key": ADMIN},
                       headers={"X-Forwarded-Proto": proto})  # fmt: skip
            assert r.status_code == 303
            cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith("mf_session="))
            attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")}
            assert {"httponly", "max-age", "path"} <= attrs and "samesite=strict" in cookie.lower()
            assert ("secure" in attrs) is secure
            assert "Max-Age=43200" in cookie


def test_the_keys_request_rate_applies_to_its_pages(session: Callable[..., Page], dash: MeterFlowServer) -> None:
    with httpx.Client(base_url=dash.url, headers=dash.auth, timeout=30) as c:
        limits = {"requests_per_s": 1, "requests_burst": 1}
        key = c.post("/v1/keys", json={"scope": "read", "rate_limits": limits}).json()["key"]
    page = session(key)
    # A burst of one: quick requests meet a 429 page with Retry-After (at most 20 tries, they take milliseconds).
    answers = [page.request.get(dash.url + "/dashboard/meters") for _ in range(20)]
    refused = [a for a in answers if a.status == 429]
    assert refused and refused[0].headers.get("retry-after") and "over its limit" in refused[0].text()
