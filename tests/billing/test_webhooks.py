"""Webhooks: Standard Webhooks signatures, retries with backoff from the durable outbox, one sender per
delivery, the delivery log, a restart that keeps pending deliveries; receivers are real HTTP servers on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from aiohttp import web
from standardwebhooks import Webhook

from meterflow.billing.destinations import Destinations
from meterflow.billing.invoices import Invoices
from meterflow.billing.outbox import Schedule, Sender
from meterflow.billing.render import priced_period_json
from meterflow.billing.webhooks import Webhooks, new_secret, sign
from meterflow.config import Settings
from meterflow.records import Records, open_records
from meterflow.records.tables import webhook_deliveries
from meterflow.runtime import started
from tests.harness.backends import Backend
from tests.harness.invoice_samples import draft, priced
from tests.harness.meterflow import WEBHOOKS_TO_LOOPBACK, MeterFlowServer
from tests.harness.processes import free_port, until

FAST = Schedule(first_ms=50, max_ms=200, give_up_ms=60_000, timeout_ms=2_000, poll_ms=20)
# The receivers are loopback servers: http for 127.0.0.1 and its address allowed, as WEBHOOKS_TO_LOOPBACK does.
LOOPBACK = Destinations.from_settings(Settings(**{k[3:].lower(): v for k, v in WEBHOOKS_TO_LOOPBACK.items()}))


@dataclass
class Receiver:
    """A webhook receiver on a loopback port: answers 500 to the first `fail` requests, then 204; with `hold`,
    every request waits for that event first (a receiver that hangs)."""

    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    fail: int = 0
    hold: asyncio.Event | None = None
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    accepted: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hooks"

    async def _handle(self, request: web.Request) -> web.Response:
        item = ({k.lower(): v for k, v in request.headers.items()}, await request.read())
        self.received.append(item)
        if self.hold is not None:
            await self.hold.wait()
        if len(self.received) <= self.fail:
            return web.Response(status=500)
        self.accepted.append(item)
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def stop(self) -> None:
        if self.hold is not None:
            self.hold.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    yield r
    await r.stop()


@pytest.fixture
async def sender(records: Records) -> AsyncIterator[Sender]:
    s = Sender(records, FAST, destinations=LOOPBACK)
    s.start()
    yield s
    await s.stop()


async def deliveries(records: Records) -> list[dict[str, Any]]:
    async with records.connect() as conn:
        return [dict(r._mapping) for r in (await conn.execute(sa.select(webhook_deliveries))).all()]


def test_signature_is_the_one_standardwebhooks_verifies() -> None:
    secret = new_secret()
    body = b'{"type":"invoice.paid","timestamp":"2026-01-01T00:00:00.000Z","data":{}}'
    stamp = int(time.time())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign(secret, "msg_1", stamp, body),
    }
    assert Webhook(secret).verify(body, headers)["type"] == "invoice.paid"
    with pytest.raises(Exception, match="signature"):
        Webhook(new_secret()).verify(body, headers)


async def test_receiver_failing_twice_gets_the_event_once_signed(
    records: Records, receiver: Receiver, sender: Sender
) -> None:
    receiver.fail = 2
    await receiver.start()
    hook = await Webhooks(records, LOOPBACK).register(receiver.url, ["invoice.finalized"], None)
    invoices = Invoices(records, None)
    inv = await invoices.transition((await draft(invoices))["id"], "finalize")
    assert inv is not None
    await until(lambda: len(receiver.accepted) == 1, "the third attempt succeeds")
    headers, body = receiver.accepted[0]
    event = Webhook(hook["secret"]).verify(body, headers)
    assert event["type"] == "invoice.finalized" and event["data"]["number"] == inv["number"]
    # Every attempt carried the same message id, so a receiver can drop repeats by it.
    assert len(receiver.received) == 3 and len({h["webhook-id"] for h, _ in receiver.received}) == 1

    # The receiver has answered 204; the sender records the attempt just after.
    async def recorded() -> bool:
        return bool((await deliveries(records))[0]["status"] == "delivered")

    await until(recorded, "the delivery recorded as delivered")
    log = await Webhooks(records).deliveries(hook["id"], "", 10)
    assert [log[0]["status"], [a["status_code"] for a in log[0]["attempts"]]] == ["delivered", [500, 500, 204]]


async def test_stopped_receiver_leaves_deliveries_pending_and_retried(records: Records, sender: Sender) -> None:
    down = Receiver()  # never started: connections are refused
    hook = await Webhooks(records, LOOPBACK).register(down.url, ["invoice.finalized", "invoice.paid"], None)
    invoices = Invoices(records, None)
    d = await draft(invoices)
    # Closing (finalizing) does not wait for delivery: it commits the outbox rows and returns.
    assert await invoices.transition(d["id"], "finalize") is not None
    assert await invoices.transition(d["id"], "mark_paid") is not None

    async def retried() -> bool:
        rows = await deliveries(records)
        return len(rows) == 2 and all(r["attempts"] >= 3 and r["status"] == "pending" for r in rows)

    await until(retried, "both deliveries retried")
    log = await Webhooks(records).deliveries(hook["id"], "", 10)
    # The log holds the error's class, never its text (which named the host and port).
    assert all(a["status_code"] is None and a["error"] == "refused" for x in log for a in x["attempts"])
    assert all(x["next_attempt_at"] is not None for x in log)
    await down.start()
    try:
        await until(lambda: len(down.accepted) == 2, "delivered once the receiver is back")
    finally:
        await down.stop()


async def test_two_senders_send_each_delivery_once(records: Records, receiver: Receiver) -> None:
    await receiver.start()
    await Webhooks(records, LOOPBACK).register(receiver.url, ["invoice.finalized"], None)
    invoices = Invoices(records, None)
    for i in range(20):
        await invoices.transition((await draft(invoices, f"c{i}", f"s{i}"))["id"], "finalize")
    a, b = (Sender(records, FAST, batch=50, destinations=LOOPBACK) for _ in range(2))
    a.start()
    b.start()
    try:
        await until(lambda: len(receiver.accepted) >= 20, "every delivery sent")
        await until(lambda: all_done(records), "every delivery marked delivered")
    finally:
        await a.stop()
        await b.stop()
    ids = [h["webhook-id"] for h, _ in receiver.received]
    assert len(ids) == 20 and len(set(ids)) == 20


async def test_a_hanging_receiver_delays_only_its_own_deliveries(records: Records) -> None:
    """Issue 23, finding 5: deliveries were sent one after another, each waiting up to the timeout, so a
    receiver that hangs held every other receiver's deliveries. Each endpoint has its own queue now."""
    hanging, healthy = Receiver(hold=asyncio.Event()), Receiver()
    await hanging.start()
    await healthy.start()
    try:
        hooks, invoices = Webhooks(records, LOOPBACK), Invoices(records, None)
        await hooks.register(hanging.url, ["invoice.finalized"], None)
        for i in range(5):  # the hanging receiver's deliveries are due first, and there are five of them
            await invoices.transition((await draft(invoices, f"c{i}", f"s{i}"))["id"], "finalize")
        await hooks.register(healthy.url, ["invoice.finalized"], None)
        await invoices.transition((await draft(invoices, "c5", "s5"))["id"], "finalize")
        # Each attempt may wait a minute: sent one after another, the healthy receiver would wait five.
        slow = Schedule(first_ms=50, max_ms=200, give_up_ms=3_600_000, timeout_ms=60_000, poll_ms=20)
        s = Sender(records, slow, destinations=LOOPBACK)
        s.start()
        try:
            await until(lambda: len(hanging.received) == 1, "the hanging receiver holds its first delivery")
            await until(lambda: len(healthy.accepted) == 1, "the healthy receiver served meanwhile", timeout=20)
            # The hanging endpoint's queue sends one at a time: its other deliveries wait behind the first.
            assert len(hanging.received) == 1
        finally:
            await s.stop()
    finally:
        await hanging.stop()
        await healthy.stop()


async def test_a_5000_line_invoice_sends_its_summary_and_links(
    records: Records, receiver: Receiver, sender: Sender
) -> None:
    """Issue 23, finding 1 (webhooks): the payload carried every line (6.7 MB for 5,000); now the summary."""
    await receiver.start()
    hook = await Webhooks(records, LOOPBACK).register(receiver.url, ["invoice.finalized"], None)
    invoices = Invoices(records, None)
    p = priced()
    doc = priced_period_json(p)
    doc["lines"] = [doc["lines"][i % len(doc["lines"])] for i in range(5000)]
    made, _ = await invoices.create_draft_document("cust_big", "sub_big", p.period.period, p.currency, doc)
    inv = await invoices.transition(made["id"], "finalize")
    assert inv is not None and len(inv["lines"]) == 5000
    await until(lambda: len(receiver.accepted) == 1, "the summary delivered")
    headers, body = receiver.accepted[0]
    assert len(body) < 4096, len(body)
    data = Webhook(hook["secret"]).verify(body, headers)["data"]
    assert "lines" not in data and data["line_count"] == 5000
    assert {k: data[k] for k in ("id", "number", "status", "customer_id", "currency", "subtotal", "total",
                                 "amount_due", "due_at")} == {k: inv[k] for k in (
        "id", "number", "status", "customer_id", "currency", "subtotal", "total", "amount_due", "due_at")}  # fmt: skip
    base = f"/v1/invoices/{inv['id']}"
    assert data["links"] == {"self": base, "html": base + ".html", "pdf": base + ".pdf"}


async def all_done(records: Records) -> bool:
    return all(r["status"] == "delivered" for r in await deliveries(records))


async def test_give_up_after_the_retry_window(records: Records) -> None:
    down = Receiver()
    await Webhooks(records, LOOPBACK).register(down.url, ["invoice.finalized"], None)
    invoices = Invoices(records, None)
    await invoices.transition((await draft(invoices))["id"], "finalize")
    s = Sender(records, Schedule(first_ms=50, max_ms=100, give_up_ms=300, timeout_ms=1_000, poll_ms=20),
               destinations=LOOPBACK)
    s.start()
    try:
        await until(lambda: all_failed(records), "given up after the window")
    finally:
        await s.stop()


async def all_failed(records: Records) -> bool:
    rows = await deliveries(records)
    return bool(rows) and all(r["status"] == "failed" and r["attempts"] >= 2 for r in rows)


FAST_ENV = {"MF_WEBHOOK_BACKOFF_MS": "100", "MF_WEBHOOK_BACKOFF_MAX_MS": "200", "MF_WEBHOOK_POLL_MS": "50",
            **WEBHOOKS_TO_LOOPBACK}


async def test_http_api_and_a_restart_keep_pending_deliveries(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer]
) -> None:
    backend = make_backend("embedded")
    server = start_server(backend, **FAST_ENV)
    down = Receiver()
    async with httpx.AsyncClient(base_url=server.url, headers=server.auth, timeout=30) as c:
        made = await c.post("/v1/webhooks", json={"url": down.url, "events": ["invoice.finalized"]})
        assert made.status_code == 201 and made.json()["secret"].startswith("whsec_")
        hook = made.json()
        listed = (await c.get("/v1/webhooks")).json()["data"]
        assert [w["id"] for w in listed] == [hook["id"]] and "secret" not in listed[0]  # shown once only
        bad = await c.post("/v1/webhooks", json={"url": "ftp://x"})
        assert bad.status_code == 400 and "`url`" in bad.json()["message"]

        records = open_records(Settings(data_dir=backend.env["MF_DATA_DIR"]))
        async with started(records):
            d = await draft(Invoices(records, None))
        finalized = await c.post(f"/v1/invoices/{d['id']}/finalize")
        assert finalized.status_code == 200, finalized.text
        again = await c.post(f"/v1/invoices/{d['id']}/finalize")
        assert again.status_code == 409 and again.json()["error"] == "invalid_status"
        assert "finalized" in again.json()["message"]
        listed = (await c.get("/v1/invoices", params={"status": "finalized", "customer_id": "cust_1"})).json()
        assert [i["number"] for i in listed["data"]] == [finalized.json()["number"]]

        async def retried() -> bool:
            log = (await c.get(f"/v1/webhooks/{hook['id']}/deliveries")).json()["data"]
            return len(log) == 1 and log[0]["status"] == "pending" and len(log[0]["attempts"]) >= 2

        await until(retried, "the delivery retried while the receiver is down")
    server.stop()

    server = start_server(backend, **FAST_ENV)  # the same data directory: the outbox survived
    await down.start()
    try:
        await until(lambda: len(down.accepted) == 1, "delivered after the restart")
        headers, body = down.accepted[0]
        assert Webhook(hook["secret"]).verify(body, headers)["data"]["id"] == d["id"]
        async with httpx.AsyncClient(base_url=server.url, headers=server.auth, timeout=30) as c:

            async def recorded() -> bool:  # the receiver has answered; the sender records it just after
                log = (await c.get(f"/v1/webhooks/{hook['id']}/deliveries")).json()["data"]
                return bool(log[0]["status"] == "delivered" and log[0]["attempts"][-1]["status_code"] == 204)

            await until(recorded, "the delivery recorded as delivered")
            assert (await c.delete(f"/v1/webhooks/{hook['id']}")).status_code == 204
            assert (await c.delete(f"/v1/webhooks/{hook['id']}")).status_code == 404
    finally:
        await down.stop()
