"""Invoices as records: one per (subscription, period), the lifecycle and its 409s, gapless yearly numbers,
frozen documents, the archive copy and the webhook deliveries a transition writes; on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa

from meterflow.archive import DirectoryStore
from meterflow.billing.invoices import Invoices, WrongStatus, number_text
from meterflow.billing.periods import Period
from meterflow.billing.webhooks import Webhooks
from meterflow.records import Records
from meterflow.records.tables import webhook_deliveries
from tests.billing.test_webhooks import LOOPBACK
from tests.harness.invoice_samples import DAY, JAN_2026, draft, priced


def year() -> int:
    return dt.datetime.now(dt.UTC).year


async def test_a_period_gets_one_invoice_whoever_asks(records: Records) -> None:
    invoices = Invoices(records, None)
    made = await asyncio.gather(*(invoices.create_draft("cust_1", "sub_1", priced()) for _ in range(5)))
    assert sorted(created for _, created in made) == [False, False, False, False, True]
    assert len({inv["id"] for inv, _ in made}) == 1
    assert len(await invoices.list("", 100)) == 1
    other = await invoices.create_draft("cust_1", "sub_1", priced(period=Period(JAN_2026.end, JAN_2026.end + 28 * DAY)))
    assert other[1] and other[0]["id"] != made[0][0]["id"]


async def test_concurrent_finalizations_number_without_gaps(records: Records) -> None:
    invoices = Invoices(records, None)
    drafts = [await draft(invoices, f"cust_{i}", f"sub_{i}") for i in range(30)]
    done = await asyncio.gather(*(invoices.transition(d["id"], "finalize") for d in drafts))
    numbers = sorted(inv["number"] for inv in done if inv is not None)
    assert numbers == [number_text(year(), n) for n in range(1, 31)]
    assert all(inv is not None and inv["status"] == "finalized" and inv["issued_at"] for inv in done)


async def test_wrong_transitions_name_the_current_status_and_void_keeps_the_number(records: Records) -> None:
    invoices = Invoices(records, None)
    d = await draft(invoices)
    for action in ("void", "mark_paid"):
        with pytest.raises(WrongStatus) as e:
            await invoices.transition(d["id"], action)
        assert e.value.current == "draft"
    finalized = await invoices.transition(d["id"], "finalize")
    assert finalized is not None and finalized["number"] == number_text(year(), 1)
    with pytest.raises(WrongStatus) as e:
        await invoices.transition(d["id"], "finalize")
    assert e.value.current == "finalized"
    voided = await invoices.transition(d["id"], "void")
    assert voided is not None and voided["status"] == "void" and voided["number"] == finalized["number"]
    for action in ("finalize", "void", "mark_paid"):
        with pytest.raises(WrongStatus) as e:
            await invoices.transition(d["id"], action)
        assert e.value.current == "void"
    # The next invoice of the year takes the next number: the voided one is not reused.
    nxt = await invoices.transition((await draft(invoices, "cust_2", "sub_2"))["id"], "finalize")
    assert nxt is not None and nxt["number"] == number_text(year(), 2)
    assert await invoices.transition("inv_" + "0" * 24, "finalize") is None


async def test_paid_invoice_keeps_its_lines_and_totals(records: Records) -> None:
    invoices = Invoices(records, None)
    d = await draft(invoices)
    finalized = await invoices.transition(d["id"], "finalize")
    paid = await invoices.transition(d["id"], "mark_paid")
    assert finalized is not None and paid is not None and paid["paid_at"]
    keep = ("lines", "subtotal", "minimum_adjustment", "total", "currency", "number", "issued_at", "period")
    assert {k: paid[k] for k in keep} == {k: finalized[k] for k in keep} == {k: (d | finalized)[k] for k in keep}
    assert paid["total"] == "200.00"  # 49.00 + 302500 x 0.0004 + 1.5e9 x 0.00000002, equal to the reference


async def test_finalized_invoice_is_archived_as_json(records: Records, tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "archive")
    await store.start()
    invoices = Invoices(records, store)
    inv = await invoices.transition((await draft(invoices))["id"], "finalize")
    assert inv is not None
    at = dt.datetime.fromtimestamp(inv["issued_at"] / 1000, dt.UTC)
    key = f"invoices/{at:%Y}/{at:%m}/{inv['number']}.json"
    assert orjson.loads(await store.get(key)) == inv


async def test_each_transition_writes_its_event_for_each_webhook_in_the_same_transaction(records: Records) -> None:
    hooks = Webhooks(records, LOOPBACK)
    await hooks.register("http://127.0.0.1:9/a", ["invoice.finalized", "invoice.paid"], None)
    await hooks.register("http://127.0.0.1:9/b", ["invoice.voided"], None)
    invoices = Invoices(records, None)
    a, b = await draft(invoices, "c1", "s1"), await draft(invoices, "c2", "s2")
    for iid, action in ((a["id"], "finalize"), (a["id"], "mark_paid"), (b["id"], "finalize"), (b["id"], "void")):
        await invoices.transition(iid, action)
    async with records.connect() as conn:
        rows = (await conn.execute(sa.select(webhook_deliveries.c.event_type, webhook_deliveries.c.payload))).all()
    assert sorted(r.event_type for r in rows) == ["invoice.finalized", "invoice.finalized", "invoice.paid",
                                                   "invoice.voided"]  # fmt: skip
    paid = next(orjson.loads(r.payload) for r in rows if r.event_type == "invoice.paid")
    assert paid["type"] == "invoice.paid" and paid["data"]["id"] == a["id"] and paid["data"]["status"] == "paid"
