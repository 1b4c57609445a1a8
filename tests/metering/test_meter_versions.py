"""Versioned meters: the version in force at an instant, settling after a version dated in the past, and
no delete while a subscription may still be billed for the meter; in the catalog and over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import sqlalchemy as sa

from meterflow import samples
from meterflow.billing.catalog import PlanCatalog, StoredPlanBroken
from meterflow.billing.periods import period_containing
from meterflow.billing.subscriptions import Subscription, Subscriptions
from meterflow.customers import Customers, validate
from meterflow.kernel.clock import ManualClock
from meterflow.kernel.params import EPOCH_MS_MAX
from meterflow.metering.catalog import MeterCatalog, MeterInUse
from meterflow.metering.meters import Meter, parse_meter
from meterflow.records import Records
from meterflow.records.tables import meters, subscriptions
from tests.harness.http import post_events
from tests.harness.meterflow import MeterFlowServer

T = 1_800_000_000_000  # the catalog's "now" (January 2027)
WINDOW = 1_000_000  # the late window the catalog is given here


def meter(event_type: str, code: str = "calls") -> Meter:
    return parse_meter({"code": code, "event_type": event_type, "aggregation": "COUNT"}, "api")


def priced_by(code: str, *meter_codes: str) -> dict[str, Any]:
    charges = [{"type": "unit", "meter": m, "unit_amount": "1"} for m in meter_codes]
    return {"code": code, "currency": "EUR", "charges": charges or [{"type": "flat", "amount": "1.00"}]}


@dataclass
class Books:
    clock: ManualClock
    meters: MeterCatalog
    plans: PlanCatalog
    subs: Subscriptions
    records: Records

    async def plan(self, doc: dict[str, Any]) -> None:
        await self.plans.replace(await self.plans.parse(doc))

    async def subscribe(self, customer: str, plan: str, start: int, end: int | None = None) -> Subscription:
        await Customers(self.records).put(customer, validate({}))
        sub = await self.subs.create(customer, plan, start)
        if end is not None:
            ended = await self.subs.cancel(sub.id, end)
            assert ended is not None
            return ended
        return sub

    async def settle_from(self) -> dict[str, int | None]:
        async with self.records.connect() as conn:
            rows = (await conn.execute(sa.select(subscriptions.c.id, subscriptions.c.settle_from))).all()
        return {str(i): s for i, s in rows}


@pytest.fixture
async def books(records: Records) -> AsyncIterator[Books]:
    clock = ManualClock(T)
    config = parse_meter({"code": "cfg", "event_type": "c", "aggregation": "COUNT"}, "config")
    catalog = MeterCatalog(records, (config,), clock, late_window_ms=WINDOW)
    plans = PlanCatalog(records, catalog, ())
    # These histories run on instants from 1970: no backdate horizon here.
    subs = Subscriptions(records, plans, clock=clock, max_backdate_days=100 * 366)
    yield Books(clock, catalog, plans, subs, records)


async def event_type_at(books: Books, t: int, code: str = "calls") -> str | None:
    m = await books.meters.at(code, t)
    return None if m is None else m.event_type


# --- the catalog, on SQLite and PostgreSQL ------------------------------------------------------


async def test_the_version_in_force_is_the_latest_from_the_instant_or_before_and_a_deletion_ends_it(
    books: Books,
) -> None:
    await books.meters.create(meter("a"), effective_at=1_000)
    await books.meters.replace(meter("b"), effective_at=5_000)
    await books.meters.replace(meter("c"), effective_at=3_000)  # between the two
    got = {t: await event_type_at(books, t) for t in (0, 999, 1_000, 2_999, 3_000, 4_999, 5_000, 10**13)}
    # Before the first version: the first (the meter made after the instant still prices it).
    assert got == {0: "a", 999: "a", 1_000: "a", 2_999: "a", 3_000: "c", 4_999: "c", 5_000: "b", 10**13: "b"}
    found = await books.meters.get("calls")
    assert found is not None and found.event_type == "c"  # the record is the last written, whatever its date

    assert await books.meters.delete("calls")
    assert [await event_type_at(books, t) for t in (0, 4_000, T - 1, T, T + 1)] == ["a", "c", "b", None, None]
    versions = await books.meters.versions("calls")
    assert versions is not None
    assert [(v.effective_at, v.deleted, v.meter and v.meter.event_type) for v in versions] == [
        (1_000, False, "a"), (3_000, False, "c"), (5_000, False, "b"), (T, True, None)]  # fmt: skip
    # A tombstone is SQL NULL (not the JSON text 'null'), as the table says.
    async with books.records.connect() as conn:
        q = sa.text("SELECT COUNT(*) FROM meter_versions WHERE code = 'calls' AND definition IS NULL")
        assert (await conn.execute(q)).scalar() == 1

    # Config meters are the same at every instant; unknown codes, and meters without versions, have none.
    cfg = await books.meters.at("cfg", 0)
    assert cfg is not None and cfg.event_type == "c" and await books.meters.at("cfg", 10**13) == cfg
    cfg_versions = await books.meters.versions("cfg")
    assert cfg_versions is not None and [(v.effective_at, v.meter) for v in cfg_versions] == [(0, cfg)]
    assert await books.meters.at("nope", T) is None and await books.meters.versions("nope") is None
    async with books.records.begin() as conn:  # a record from before versions were kept
        await conn.execute(sa.insert(meters).values(code="bare", definition={"code": "bare", "event_type": "x",
                           "aggregation": "COUNT"}, created_at=1, updated_at=1, version=1))  # fmt: skip
    assert await books.meters.at("bare", T) is None and await books.meters.versions("bare") == []


async def test_a_write_at_the_same_instant_replaces_that_version(books: Books) -> None:
    await books.meters.create(meter("a"), effective_at=1_000)
    await books.meters.replace(meter("b"), effective_at=2_000)
    await books.meters.replace(meter("z"), effective_at=2_000)
    versions = await books.meters.versions("calls")
    assert versions is not None and [(v.effective_at, v.meter and v.meter.event_type) for v in versions] == [
        (1_000, "a"), (2_000, "z")]  # fmt: skip
    # No effective_at: from the catalog's clock.
    await books.meters.replace(meter("n"))
    assert await event_type_at(books, T - 1) == "z" and await event_type_at(books, T) == "n"


async def test_a_meter_made_again_from_before_its_deletion_is_in_force_from_then(books: Books) -> None:
    await books.meters.create(meter("a"), effective_at=1_000)
    assert await books.meters.delete("calls")
    await books.meters.create(meter("b"), effective_at=T - 100)
    assert [await event_type_at(books, t) for t in (1_000, T - 100, T, T + 1)] == ["a", "b", "b", "b"]


async def test_a_version_dated_in_the_past_marks_settle_from_on_the_subscriptions_it_touches_only(
    books: Books,
) -> None:
    e = 50_000
    await books.meters.create(meter("a"), effective_at=0)
    await books.meters.create(meter("o", "other"), effective_at=0)
    await books.plan(priced_by("pm", "calls"))
    await books.plan(priced_by("po", "other"))
    touched = [await books.subscribe("c_open", "pm", 10_000),
               await books.subscribe("c_after", "pm", 60_000),  # starts after the version: all its periods
               await books.subscribe("c_late", "pm", 10_000, e + 1)]  # fmt: skip
    untouched = [await books.subscribe("c_before", "pm", 10_000, e - 1),
                 await books.subscribe("c_at", "pm", 10_000, e),  # [start, e): no instant from e on
                 await books.subscribe("c_other", "po", 10_000)]  # fmt: skip
    earlier = await books.subscribe("c_earlier", "pm", 10_000)
    later = await books.subscribe("c_later", "pm", 10_000)
    await books.plan(priced_by("pm"))  # version 2 of the plan no longer prices the meter
    on_v2 = await books.subscribe("c_v2", "pm", 10_000)
    assert on_v2.plan_version == 2 and earlier.plan_version == 1
    async with books.records.begin() as conn:
        await conn.execute(sa.update(subscriptions).values(settle_from=None))  # as a closing pass leaves them
        for sub, at in ((earlier, 20_000), (later, 90_000)):
            await conn.execute(sa.update(subscriptions).where(subscriptions.c.id == sub.id).values(settle_from=at))

    # Versions from now on, or later, change no finalized period.
    await books.meters.replace(meter("b"))
    await books.meters.replace(meter("c"), effective_at=T + 1)
    assert set((await books.settle_from()).values()) == {None, 20_000, 90_000}

    await books.meters.replace(meter("d"), effective_at=e)
    marks = await books.settle_from()
    assert {s.id: marks[s.id] for s in touched} == {s.id: e for s in touched}
    assert {s.id: marks[s.id] for s in [*untouched, on_v2]} == {s.id: None for s in [*untouched, on_v2]}
    assert (marks[earlier.id], marks[later.id]) == (20_000, e)  # the earliest of the two stays
    # A version of another meter dated earlier marks only what prices that meter.
    await books.meters.replace(meter("o2", "other"), effective_at=5_000)
    marks = await books.settle_from()
    assert marks[untouched[2].id] == 5_000 and marks[touched[0].id] == e


async def test_delete_is_refused_while_a_subscription_may_still_be_billed_for_the_meter(books: Books) -> None:
    await books.meters.create(meter("a"), effective_at=0)
    await books.meters.create(meter("o", "other"), effective_at=0)
    await books.plan(priced_by("pm", "calls"))
    await books.plan(priced_by("po", "other"))
    await books.plan(priced_by("flat"))
    await books.plan(priced_by("idle", "calls"))  # prices it, but nobody subscribes
    await books.subscribe("c_flat", "flat", 1_000)
    await books.subscribe("c_other", "po", 1_000)
    sub = await books.subscribe("c_pm", "pm", 1_000)

    with pytest.raises(MeterInUse) as refused:
        await books.meters.delete("calls")
    assert (refused.value.code, refused.value.subscription_id) == ("calls", sub.id)
    assert str(refused.value) == (f"Meter 'calls' is priced by subscription {sub.id}; cancel it or move it to a "
                                  "plan without the meter first.")  # fmt: skip

    end = T - 10
    assert await books.subs.cancel(sub.id, end) is not None
    books.clock.set(end + WINDOW - 1)  # ended, but late usage may still arrive
    with pytest.raises(MeterInUse):
        await books.meters.delete("calls")
    found = await books.meters.get("calls")
    assert found is not None and await event_type_at(books, books.clock.now_ms()) == "a"  # nothing written

    books.clock.set(end + WINDOW)
    assert await books.meters.delete("calls")
    assert await books.meters.get("calls") is None and await event_type_at(books, end + WINDOW) is None
    assert await books.meters.delete("calls") is False  # gone already
    # A plan version pricing it no longer applies: new subscriptions to it are refused.
    await Customers(books.records).put("c_idle", validate({}))
    with pytest.raises(StoredPlanBroken):
        await books.subs.create("c_idle", "idle", 1_000)


# --- over HTTP, on both backends ------------------------------------------------------------------


def ok(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, r.text
    return r.json() if r.content else None


def test_the_upcoming_invoice_counts_with_the_version_in_force_at_the_period_start(server: MeterFlowServer) -> None:
    with httpx.Client(base_url=server.url, headers=server.auth, timeout=60) as c:
        ok(c.put("/v1/customers/cust_v", json={"timezone": "UTC"}), 201)
        ok(c.post("/v1/meters", json={"code": "calls", "event_type": "a", "aggregation": "COUNT"}), 201)
        ok(c.post("/v1/plans", json=priced_by("metered", "calls")), 201)
        now = samples.now_ms()
        period = period_containing("month", ZoneInfo("UTC"), now)
        ok(c.post("/v1/subscriptions", json={"customer_id": "cust_v", "plan": "metered", "start": period.start}), 201)
        lo = max(period.start, now - 3_600_000)
        events = [{"transaction_id": f"tx_{kind}_{i}", "customer_id": "cust_v", "event_type": kind,
                   "timestamp": lo + i, "properties": {}}
                  for kind, n in (("a", 3), ("b", 5), ("c", 7)) for i in range(n)]  # fmt: skip
        r = ok(post_events(c, events))
        assert r["accepted"] == 15 and not r["failed"], r

        def quantity() -> str:
            invoice = ok(c.get("/v1/customers/cust_v/upcoming_invoice"))
            return str(next(ln["quantity"] for ln in invoice["lines"] if ln["meter"] == "calls"))

        # Made after the period began: its first version prices the whole period.
        assert quantity() == "3"
        # A version from now on changes the next periods only.
        ok(c.put("/v1/meters/calls", json={"event_type": "c", "aggregation": "COUNT"}))
        assert quantity() == "3"
        # One in force from the period's start prices it; one dated inside the period does not change that.
        ok(c.put("/v1/meters/calls", json={"event_type": "b", "aggregation": "COUNT", "effective_at": period.start}))
        assert quantity() == "5"
        inside = {"event_type": "c", "aggregation": "COUNT", "effective_at": period.start + 1}
        ok(c.put("/v1/meters/calls", json=inside))
        assert quantity() == "5"

        versions = ok(c.get("/v1/meters/calls/versions"))["data"]
        dates = [v["effective_at"] for v in versions]
        assert dates == sorted(dates) and dates[:2] == [period.start, period.start + 1] and len(versions) == 4
        assert [v["meter"]["event_type"] for v in versions] == ["b", "c", "a", "c"]
        assert all(not v["deleted"] and isinstance(v["created_at"], int) for v in versions)
        # GET shows the last definition written.
        assert ok(c.get("/v1/meters/calls"))["event_type"] == "c"


def test_versions_endpoint_and_effective_at_validation(server: MeterFlowServer) -> None:
    with httpx.Client(base_url=server.url, headers=server.auth, timeout=60) as c:
        body = {"code": "calls", "event_type": "a", "aggregation": "COUNT"}
        for bad in ("soon", -1, True, 1.5, EPOCH_MS_MAX + 1, [1]):
            for r in (c.post("/v1/meters", json={**body, "effective_at": bad}),
                      c.put("/v1/meters/calls", json={**body, "effective_at": bad})):  # fmt: skip
                assert r.status_code == 400, (bad, r.text)
                assert r.json()["error"] == "invalid_meter" and r.json()["message"].startswith("effective_at"), r.text
        assert c.get("/v1/meters/calls").status_code == 404  # nothing was made
        ok(c.post("/v1/meters", json={**body, "effective_at": 1_000}), 201)
        ok(c.put("/v1/meters/calls", json={**body, "event_type": "b", "effective_at": 2_000}))
        before = samples.now_ms()
        ok(c.delete("/v1/meters/calls"), 204)
        after = samples.now_ms()

        read = ok(c.post("/v1/keys", json={"scope": "read"}), 201)["key"]
        r = httpx.get(f"{server.url}/v1/meters/calls/versions", headers={"Authorization": f"Bearer {read}"})
        versions = ok(r)["data"]
        assert [(v["effective_at"], v["deleted"], v["meter"] and v["meter"]["event_type"]) for v in versions[:2]] == [
            (1_000, False, "a"), (2_000, False, "b")]  # fmt: skip
        assert len(versions) == 3 and versions[2]["deleted"] and versions[2]["meter"] is None
        assert before <= versions[2]["effective_at"] <= after  # deleted from then on
        # No effective_at, or null: from now.
        before = samples.now_ms()
        ok(c.put("/v1/meters/other", json={"event_type": "o", "aggregation": "COUNT", "effective_at": None}), 201)
        (made,) = ok(c.get("/v1/meters/other/versions"))["data"]
        assert before <= made["effective_at"] <= samples.now_ms() and made["meter"]["code"] == "other"

        config = ok(c.get("/v1/meters/api_calls/versions"))["data"]
        assert len(config) == 1 and config[0]["effective_at"] == 0 and config[0]["meter"]["code"] == "api_calls"
        r = c.get("/v1/meters/nope/versions")
        assert (r.status_code, r.json()["error"]) == (404, "meter_not_found")


def test_delete_answers_meter_in_use_while_priced_then_a_broken_plan_refuses_subscriptions(
    server: MeterFlowServer,
) -> None:
    with httpx.Client(base_url=server.url, headers=server.auth, timeout=60) as c:
        for cid in ("cust_d", "cust_e", "cust_r"):
            ok(c.put(f"/v1/customers/{cid}", json={}), 201)
        for code in ("calls", "recent"):
            ok(c.post("/v1/meters", json={"code": code, "event_type": "a", "aggregation": "COUNT"}), 201)
        ok(c.post("/v1/plans", json=priced_by("metered", "calls")), 201)
        ok(c.post("/v1/plans", json=priced_by("lately", "recent")), 201)
        ok(c.post("/v1/plans", json=priced_by("flat")), 201)
        old = samples.now_ms() - 300 * 86_400_000  # long ago, within the backdate horizon
        sub = ok(c.post("/v1/subscriptions", json={"customer_id": "cust_d", "plan": "metered", "start": old}), 201)

        r = c.delete("/v1/meters/calls")
        assert (r.status_code, r.json()["error"]) == (409, "meter_in_use"), r.text
        assert r.json()["message"] == (f"Meter 'calls' is priced by subscription {sub['id']}; cancel it or move it "
                                       "to a plan without the meter first.")  # fmt: skip
        # Moved to a plan without the meter long ago: nothing may still be billed for it.
        ok(c.post(f"/v1/subscriptions/{sub['id']}/change", json={"plan": "flat", "at": old + 1_000}))
        ok(c.delete("/v1/meters/calls"), 204)
        assert c.get("/v1/meters/calls").status_code == 404

        # Ended just now: late usage may still arrive for it.
        recent = ok(c.post("/v1/subscriptions", json={"customer_id": "cust_r", "plan": "lately", "start": old}), 201)
        ok(c.post(f"/v1/subscriptions/{recent['id']}/cancel", json={}))
        r = c.delete("/v1/meters/recent")
        assert (r.status_code, r.json()["error"]) == (409, "meter_in_use"), r.text
        assert recent["id"] in r.json()["message"]

        # D6: the plan's stored version prices a meter that is gone.
        r = c.post("/v1/subscriptions", json={"customer_id": "cust_e", "plan": "metered"})
        assert (r.status_code, r.json()["error"]) == (409, "plan_not_priceable"), r.text
        assert "calls" in r.json()["message"], r.text
