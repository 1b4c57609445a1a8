"""Credit notes, closing failures and subscriptions that end once, over HTTP on both backends."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from meterflow import samples
from tests.billing.test_closing import ENV, month_starts
from tests.harness.backends import Backend
from tests.harness.meterflow import MeterFlowServer
from tests.harness.processes import wait_for

PLAN = {"code": "basic", "currency": "EUR", "charges": [{"type": "flat", "amount": "30.00"},
                                                         {"type": "unit", "meter": "api_calls", "unit_amount": "1"}]}


@pytest.fixture
def server_with_invoice(backend: Backend, start_server: Callable[..., MeterFlowServer]) -> tuple[MeterFlowServer, str]:
    """A server whose customer has last month finalized (30.00 flat, 2 calls at 1.00) by its own closing task."""
    server = start_server(backend, **{**ENV, "MF_INVOICE_GRACE_S": "0"}, MF_INVOICE_CLOSE_INTERVAL_S="1")
    last, _, _ = month_starts(samples.now_ms())
    with httpx.Client(base_url=server.url, headers=server.auth, timeout=30) as c:
        # The events first: the closing task may close the period as soon as the subscription exists.
        events = [{"transaction_id": f"t{i}", "customer_id": "cust_cn", "event_type": "api_request",
                   "timestamp": last + 86_400_000 + i, "properties": {}} for i in range(2)]  # fmt: skip
        assert c.post("/v1/events", json={"events": events}).json()["accepted"] == 2
        assert c.post("/v1/plans", json=PLAN).status_code == 201
        assert c.put("/v1/customers/cust_cn", json={"name": "CN Ltd"}).status_code == 201
        assert c.post("/v1/subscriptions", json={"customer_id": "cust_cn", "plan": "basic", "start": last}).status_code == 201
        hook = c.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hooks", "events": ["credit_note.created"]})
        assert hook.status_code == 201, hook.text

        def finalized() -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = c.get("/v1/invoices", params={"customer_id": "cust_cn"}).json()["data"]
            return [i for i in found if i["status"] == "finalized"]

        wait_for(lambda: bool(finalized()), "the closing task finalizing last month", 60)
        [inv] = finalized()
    assert (inv["status"], inv["total"], inv["amount_credited"], inv["amount_due"]) == ("finalized", "32.00", "0.00",
                                                                                         "32.00")  # fmt: skip
    return server, inv["id"]


def test_a_manual_credit_note_credits_at_most_what_is_left(server_with_invoice: tuple[MeterFlowServer, str]) -> None:
    server, iid = server_with_invoice
    year = dt.datetime.now(dt.UTC).year
    with httpx.Client(base_url=server.url, headers=server.auth, timeout=30) as c:
        url = f"/v1/invoices/{iid}/credit_notes"
        r = c.post(url, json={"amount": "10.00", "memo": "Goodwill"})
        assert r.status_code == 201, r.text
        note = r.json()
        assert (note["number"], note["reason"], note["total"], note["memo"]) == (f"CN-{year}-000001", "manual",
                                                                                  "10.00", "Goodwill")  # fmt: skip
        # Spread from the last line up: the 2.00 of calls first, then 8.00 of the flat fee.
        assert [(ln["invoice_line"], ln["amount"]) for ln in note["lines"]] == [(1, "2.00"), (0, "8.00")]
        inv = c.get(f"/v1/invoices/{iid}").json()
        assert (inv["amount_credited"], inv["amount_due"], inv["total"]) == ("10.00", "22.00", "32.00")

        over = c.post(url, json={"amount": "22.01"})
        assert over.status_code == 409 and over.json()["error"] == "credit_exceeds_invoice", over.text
        assert "22.00" in over.json()["message"]
        for bad in ({"amount": "-1"}, {"amount": 5}, {"amount": "1.001"}, {"memo": 3}, {"reason": "x"}, []):
            r = c.post(url, json=bad)
            assert r.status_code == 400 and r.json()["error"] == "invalid_credit_note", (bad, r.text)
        assert c.post("/v1/invoices/inv_" + "0" * 24 + "/credit_notes", json={}).status_code == 404

        rest = c.post(url, json={})
        assert rest.status_code == 201 and rest.json()["total"] == "22.00"
        assert rest.json()["number"] == f"CN-{year}-000002"  # gapless, its own sequence
        assert c.post(url, json={}).status_code == 409  # nothing left
        assert c.get(f"/v1/invoices/{iid}").json()["amount_due"] == "0.00"
        listed = c.get("/v1/credit_notes", params={"invoice_id": iid}).json()["data"]
        assert sorted(n["total"] for n in listed) == ["10.00", "22.00"]

        [hook] = c.get("/v1/webhooks").json()["data"]
        deliveries = c.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["data"]
        assert sorted(d["event_type"] for d in deliveries) == ["credit_note.created"] * 2


def test_a_subscription_ends_once_and_closing_failures_are_listed(
    server_with_invoice: tuple[MeterFlowServer, str],
) -> None:
    server, _ = server_with_invoice
    with httpx.Client(base_url=server.url, headers=server.auth, timeout=30) as c:
        [sub] = c.get("/v1/subscriptions", params={"customer_id": "cust_cn"}).json()["data"]
        assert c.post(f"/v1/subscriptions/{sub['id']}/cancel", json={}).status_code == 200
        again = c.post(f"/v1/subscriptions/{sub['id']}/cancel", json={})
        assert again.status_code == 409 and again.json()["error"] == "subscription_ended", again.text
        moved = c.post(f"/v1/subscriptions/{sub['id']}/change", json={"plan": "basic"})
        assert moved.status_code == 409 and moved.json()["error"] == "subscription_ended"
        failures = c.get("/v1/closing/failures")
        assert failures.status_code == 200 and failures.json() == {"data": [], "next_cursor": None}
        assert "\nmeterflow_closing_failures 0\n" in c.get("/metrics").text
