"""Closing periods on the full stack (ClickHouse, Redis, PostgreSQL): one invoice per ended period whoever
closes, gapless numbers across servers and the CLI, late usage on the next invoice, totals equal the reference."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import httpx
import orjson
import pytest

from meterflow import samples
from tests.harness.backends import Backend
from tests.harness.meterflow import WEBHOOKS_TO_LOOPBACK, MeterFlowServer
from tests.harness.pricing_reference import reference_price
from tests.harness.processes import Process, free_port, http_ok, wait_for

DAY = 86_400_000
# Events of last month must be accepted: the age limit (and the dedup window that covers it) is 90 days.
ENV = {"MF_MAX_AGE_MS": str(90 * DAY), "MF_DEDUP_WINDOW_S": str(100 * 86_400), "MF_INVOICE_GRACE_S": "3600",
       "MF_RATE_REQUESTS_PER_S": "100000", "MF_RATE_REQUESTS_BURST": "100000", **WEBHOOKS_TO_LOOPBACK}  # fmt: skip
PLAN = {
    "code": "pro", "name": "Pro", "currency": "EUR", "interval": "month", "minimum": "60.00",
    "charges": [
        {"type": "flat", "amount": "49.00", "description": "Platform fee"},
        {"type": "unit", "meter": "api_calls", "unit_amount": "0.5", "free_units": "2"},
        {"type": "graduated", "meter": "bandwidth", "tiers": [
            {"up_to": "5000", "unit_amount": "0"},
            {"up_to": None, "unit_amount": "0.001", "flat_amount": "1.00"}]},
    ],
}  # fmt: skip


def month_starts(now: int) -> tuple[int, int, int]:
    """(last month's start, this month's start, next month's start) in UTC epoch ms."""
    t = dt.datetime.fromtimestamp(now / 1000, dt.UTC)
    this = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    last = (this - dt.timedelta(days=1)).replace(day=1)
    nxt = (this + dt.timedelta(days=32)).replace(day=1)
    return tuple(int(x.timestamp() * 1000) for x in (last, this, nxt))  # type: ignore[return-value]


def event(tid: str, customer: str, ts: int, nbytes: int) -> dict[str, Any]:
    return {"transaction_id": tid, "customer_id": customer, "event_type": "api_request", "timestamp": ts,
            "properties": {"bytes": nbytes, "endpoint": "/v1/orders", "method": "GET"}}  # fmt: skip


def reference_total(calls: int, nbytes: int, start: int, end: int) -> Fraction:
    usage = {"api_calls": {"total": str(calls)}, "bandwidth": {"total": str(nbytes)}}
    total = reference_price(PLAN, usage, end - start, end - start)["total"]
    assert isinstance(total, Fraction)
    return total


def close(server: MeterFlowServer, *args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "meterflow.cli", "invoices", "close", *args], env=server.env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out


def invoices_of(c: httpx.Client, **params: str) -> list[dict[str, Any]]:
    r = c.get("/v1/invoices", params={"limit": "500", **params})
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


@pytest.fixture
def full(make_backend: Callable[[str], Backend]) -> Backend:
    return make_backend("full")


def test_late_usage_lands_on_the_next_invoice_and_the_closed_one_never_changes(
    full: Backend, start_server: Callable[..., MeterFlowServer]
) -> None:
    server = start_server(full, **ENV, MF_INVOICE_CLOSE_INTERVAL_S="3600")
    last, this, nxt = month_starts(samples.now_ms())
    with httpx.Client(base_url=server.url, headers=server.auth, timeout=30) as c:
        assert c.post("/v1/plans", json=PLAN).status_code == 201
        assert c.put("/v1/customers/cust_late", json={"name": "Late Ltd"}).status_code == 201
        sub = c.post("/v1/subscriptions", json={"customer_id": "cust_late", "plan": "pro", "start": last})
        assert sub.status_code == 201, sub.text
        events = [event(f"t{i}", "cust_late", last + 5 * DAY + i, 2000) for i in range(6)]
        assert c.post("/v1/events", json={"events": events}).json()["accepted"] == 6

        report = close(server)
        assert "1 closed here" in report.stderr and "invoices close [" in report.stderr  # the progress bar
        [first] = invoices_of(c, customer_id="cust_late")
        assert first["status"] == "finalized" and first["period"] == {"start": last, "end": this}
        assert first["plan"] == "pro" and first["plan_version"] == sub.json()["plan_version"]
        # 49 + (6 - 2) x 0.5 + (12000 - 5000) x 0.001 + 1 = 59.00, topped up to the 60.00 minimum
        assert Fraction(first["total"]) == reference_total(6, 12000, last, this) == 60
        before = c.get(f"/v1/invoices/{first['id']}").content
        assert close(server).stderr.count("0 periods due") == 1  # closing again closes nothing

        late = [event("t_late", "cust_late", last + 20 * DAY, 30000)]
        assert c.post("/v1/events", json={"events": late}).json()["accepted"] == 1
        current = [event("t_now", "cust_late", this + 1, 100)]
        assert c.post("/v1/events", json={"events": current}).json()["accepted"] == 1
        # Within its grace the period has a draft, without a number; an event stored after the draft is on
        # the invoice all the same: the draft is priced again when it is finalized.
        assert "1 drafted" in close(server, "--at", str(nxt + 600_000)).stderr
        draft = next(i for i in invoices_of(c, customer_id="cust_late") if i["id"] != first["id"])
        assert draft["status"] == "draft" and draft["number"] is None
        grace = [event("t_grace", "cust_late", this + 2, 100)]
        assert c.post("/v1/events", json={"events": grace}).json()["accepted"] == 1
        close(server, "--at", str(nxt + 2 * 3_600_000))

        after = c.get(f"/v1/invoices/{first['id']}").json()
        # The finalized invoice never changes; what settling took off it shows as amount_credited: the month
        # now owes 89.50 with no minimum top-up, so the 1.00 top-up it billed comes back as a credit note.
        frozen = {k: v for k, v in orjson.loads(before).items() if k not in ("amount_credited", "amount_due")}
        assert {k: v for k, v in after.items() if k not in ("amount_credited", "amount_due")} == frozen
        assert (after["amount_credited"], after["amount_due"]) == ("1.00", "59.00")
        [note] = c.get("/v1/credit_notes", params={"invoice_id": first["id"]}).json()["data"]
        assert (note["reason"], note["total"]) == ("late_correction", "1.00")
        assert [(ln["line_key"], ln["invoice_line"], ln["amount"]) for ln in note["lines"]] == [("minimum", None, "1.00")]
        second = next(i for i in invoices_of(c, customer_id="cust_late") if i["id"] != first["id"])
        assert second["id"] == draft["id"] and second["status"] == "finalized"
        assert second["period"] == {"start": this, "end": nxt}
        late_lines = [ln for ln in second["lines"] if "late_for" in ln]
        label = dt.datetime.fromtimestamp(last / 1000, dt.UTC).strftime("%Y-%m")
        assert {ln["meter"]: (ln["quantity"], ln["amount"]) for ln in late_lines} == {
            "api_calls": ("1", "0.50"), "bandwidth": ("30000", "30.00")}
        assert all(ln["description"].startswith(f"Late usage for {label}") for ln in late_lines)
        # The late amounts are what the reference bills for the period now, less what was billed then
        # (before its minimum: the top-up is not usage).
        period_now = reference_price(PLAN, {"api_calls": {"total": "7"}, "bandwidth": {"total": "42000"}}, 1, 1)
        period_then = reference_price(PLAN, {"api_calls": {"total": "6"}, "bandwidth": {"total": "12000"}}, 1, 1)
        assert sum(Fraction(ln["amount"]) for ln in late_lines) == period_now["subtotal"] - period_then["subtotal"]
        base = reference_total(2, 200, this, nxt)
        assert Fraction(second["total"]) == base + Fraction("30.50")
        # Billed once: a third close bills no late usage for last month again.
        close(server, "--at", str(nxt + 40 * DAY))
        third = [i for i in invoices_of(c, customer_id="cust_late") if i["id"] not in (first["id"], second["id"])]
        assert third and not any("late_for" in ln for inv in third for ln in inv["lines"])


def test_two_servers_and_the_cli_close_100_periods_once_with_gapless_numbers(
    full: Backend, start_server: Callable[..., MeterFlowServer]
) -> None:
    setup = start_server(full, **ENV, MF_INVOICE_CLOSE_INTERVAL_S="3600")
    last, this, _ = month_starts(samples.now_ms())
    with httpx.Client(base_url=setup.url, headers=setup.auth, timeout=30) as c:
        assert c.post("/v1/plans", json=PLAN).status_code == 201
        for i in range(100):
            assert c.put(f"/v1/customers/cust_{i:03d}", json={"name": f"Customer {i}"}).status_code == 201
            r = c.post("/v1/subscriptions", json={"customer_id": f"cust_{i:03d}", "plan": "pro", "start": last})
            assert r.status_code == 201, r.text
        events = [event(f"u{i}", f"cust_{i:03d}", last + DAY, 1000 * i) for i in range(100)]
        assert c.post("/v1/events", json={"events": events}).json()["accepted"] == 100
        # A receiver that is down all along: its deliveries wait in the outbox, closing does not wait for them.
        hook = c.post("/v1/webhooks", json={"url": f"http://127.0.0.1:{free_port()}/down"}).json()
    setup.stop()

    # Two servers of two workers each (their closing task passes every second) and the CLI, started at once.
    servers = [MeterFlowServer(setup.workdir, {**full.env, **ENV, "MF_WORKERS": "2",
                                               "MF_INVOICE_CLOSE_INTERVAL_S": "1"}) for _ in range(2)]  # fmt: skip
    cli = Process([sys.executable, "-m", "meterflow.cli", "invoices", "close"], setup.workdir / "close.log",
                  servers[0].env)  # fmt: skip
    for s in servers:
        s.proc.start()
    cli.start()
    try:
        for s in servers:
            wait_for(lambda s=s: http_ok(s.url + "/health"), "meterflow", 60)
        assert cli.proc is not None and cli.proc.wait(120) == 0, (setup.workdir / "close.log").read_text()
        with httpx.Client(base_url=servers[1].url, headers=setup.auth, timeout=30) as c:
            wait_for(lambda: len(invoices_of(c, status="finalized")) == 100, "100 invoices", 120)
            done = invoices_of(c)

            def retried() -> bool:
                log = c.get(f"/v1/webhooks/{hook['id']}/deliveries", params={"limit": "500"}).json()["data"]
                return len(log) == 100 and all(d["status"] == "pending" for d in log) and any(d["attempts"] for d in log)

            wait_for(retried, "100 deliveries pending and tried", 60)
    finally:
        cli.stop()
        for s in servers:
            s.stop()
    print((setup.workdir / "close.log").read_text().strip().splitlines()[-1])  # how many the CLI closed
    year = dt.datetime.now(dt.UTC).year
    assert len(done) == 100 and {i["customer_id"] for i in done} == {f"cust_{i:03d}" for i in range(100)}
    assert sorted(i["number"] for i in done) == [f"MF-{year}-{n:06d}" for n in range(1, 101)]
    for inv in done:
        n = int(inv["customer_id"].removeprefix("cust_"))
        assert Fraction(inv["total"]) == reference_total(1, 1000 * n, last, this), inv
