"""Plans, subscriptions and the upcoming invoice, end to end, checked against the reference pricer."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from meterflow import samples
from meterflow.billing.catalog import PlanCatalog
from meterflow.billing.periods import Period, period_containing
from meterflow.billing.plans import FlatCharge, Plan, configured_plans
from meterflow.billing.preview import price_subscription_period
from meterflow.billing.render import priced_period_json
from meterflow.billing.subscriptions import Subscriptions
from meterflow.config import ConfigError, Settings, load
from meterflow.customers import Customers, validate
from meterflow.kernel.rust import Limits, decode_batch
from meterflow.metering.catalog import MeterCatalog
from meterflow.metering.meters import configured_meters
from meterflow.records import Records
from meterflow.storage import Storage
from tests.harness.http import post_events
from tests.harness.meterflow import MeterFlowServer
from tests.harness.pricing_reference import ISSUE_PLAN, half_up, reference_price

UTC = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")
LIMITS = Limits(max_age_ms=20 * 365 * 86_400_000)
REGIONS = ("eu-west-1", "us-east-1", "ap-south-1", "")

# The plan of issue 12, plus a dimensional charge (each region priced on its own).
PRO = ISSUE_PLAN


def plans_of(settings: Settings) -> tuple[Plan, ...]:
    return configured_plans(settings, configured_meters(settings))


def seed_events(customer: str, lo: int, hi: int, api_calls: int, seed: int) -> list[dict[str, Any]]:
    """Events of the seed catalog's four meters for one customer, at instants in [lo, hi)."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []

    def event(kind: str, props: dict[str, Any]) -> None:
        out.append({"transaction_id": f"{customer}_{seed}_{len(out)}", "customer_id": customer, "event_type": kind,
                    "timestamp": rng.randrange(lo, hi), "properties": props})  # fmt: skip

    for i in range(api_calls):
        region = REGIONS[i % len(REGIONS)]
        props = {"bytes": rng.randrange(100_000, 300_000), "endpoint": "/v1/orders", "method": "GET"}
        event("api_request", {**props, **({"region": region} if region else {})})
    for _ in range(40):
        event("compute", {"cpu_ms": 100_000 + rng.randrange(0, 3), "region": "eu-west-1", "instance_type": "m5"})
    for gb in ("120", "250.5", "80", "0.25"):
        event("storage", {"gb_stored": float(gb), "region": "eu-west-1"})
    return out


def expected_usage(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The seed meters' quantities, computed here from the events (each transaction once)."""
    once = {e["transaction_id"]: e for e in events}.values()
    api = [e for e in once if e["event_type"] == "api_request"]
    regions = Counter(e["properties"].get("region", "") for e in api)
    cpu = sum(e["properties"]["cpu_ms"] for e in once if e["event_type"] == "compute")
    peak = max((Decimal(str(e["properties"]["gb_stored"])) for e in once if e["event_type"] == "storage"), default=0)
    return {
        "api_calls": {"total": len(api), "by": {"region": {k: str(v) for k, v in regions.items()}}},
        "bandwidth": {"total": sum(e["properties"]["bytes"] for e in api), "by": {}},
        "compute_time": {"total": cpu, "by": {}},
        "storage_peak": {"total": peak, "by": {}},
    }


def assert_matches_reference(invoice: dict[str, Any], usage: dict[str, Any], served_ms: int, period_ms: int) -> None:
    ref = reference_price(PRO, usage, served_ms, period_ms)
    got = [(ln["charge"], ln["meter"], Fraction(ln["quantity"]), Fraction(ln["amount"])) for ln in invoice["lines"]]
    assert got == [(r.charge, r.meter, r.quantity, r.amount) for r in ref["lines"]]
    assert Fraction(invoice["subtotal"]) == ref["subtotal"]
    assert Fraction(invoice["minimum_adjustment"]) == ref["adjustment"]
    assert Fraction(invoice["total"]) == ref["total"]


def ingest(c: httpx.Client, events: list[dict[str, Any]]) -> None:
    """Posts `events` in batches of 1000, none failed."""
    """Posts `events` in batches of 1000, none failed."""
    for i in range(0, len(events), 1000):
        r = post_events(c, events[i : i + 1000])
        assert r.status_code == 200 and not r.json()["failed"], r.text


def test_upcoming_invoice_prices_the_issue_plan_as_the_reference_does(server: MeterFlowServer) -> None:
    with httpx.Client(base_url=server.url, headers=server.auth, timeout=60) as c:
        assert c.put("/v1/customers/cust_e2e", json={"name": "E2E", "timezone": "UTC"}).status_code == 201
        r = c.post("/v1/plans", json=PRO)
        assert r.status_code == 201, r.text
        assert r.json()["plan_version"] == 1 and r.headers["ETag"] == '"1"'
        now = samples.now_ms()
        period = period_containing("month", UTC, now)
        r = c.post("/v1/subscriptions", json={"customer_id": "cust_e2e", "plan": "pro", "start": period.start})
        assert r.status_code == 201, r.text
        sub = r.json()
        assert (sub["status"], sub["plan_version"], sub["end"]) == ("active", 1, None)
        lo = max(period.start, now - 3_600_000)
        events = seed_events("cust_e2e", lo, now, 10_300, seed=1)
        ingest(c, events)
        ingest(c, events[:500])  # a retry: counted once
        ingest(c, seed_events("cust_other", lo, now, 50, seed=2))  # another customer's usage
        r = c.get("/v1/customers/cust_e2e/upcoming_invoice")
        assert r.status_code == 200, r.text
        invoice = r.json()
    assert (invoice["customer_id"], invoice["subscription_id"], invoice["plan"]) == ("cust_e2e", sub["id"], "pro")
    assert invoice["period"] == {"start": period.start, "end": period.end} == invoice["billing_period"]
    assert_matches_reference(invoice, expected_usage(events), period.end - period.start, period.end - period.start)
    # The line quantities are those GET /v1/usage answers for the same period.
    with httpx.Client(base_url=server.url, headers=server.auth, timeout=60) as c:
        for line in invoice["lines"]:
            if line["meter"] is None or "dimension" in line:
                continue
            u = c.get("/v1/usage", params={"customer_id": "cust_e2e", "meter": line["meter"],
                                           "start": period.start, "end": period.end}).json()  # fmt: skip
            assert Decimal(line["quantity"]) == Decimal(str(u["value"])), line
    graduated = next(ln for ln in invoice["lines"] if ln["charge"] == "graduated" and ln["meter"] == "bandwidth")
    assert [t["up_to"] for t in graduated["tiers"]] == ["1000000000", None]


def test_a_plan_change_mid_period_prorates_the_flat_fee_and_prices_usage_from_the_change(
    server: MeterFlowServer,
) -> None:
    with httpx.Client(base_url=server.url, headers=server.auth, timeout=60) as c:
        assert c.put("/v1/customers/cust_chg", json={"timezone": "Europe/Berlin"}).status_code == 201
        basic = {"code": "basic", "currency": "EUR", "charges": [{"type": "flat", "amount": "10.00"}]}
        assert c.post("/v1/plans", json=basic).status_code == 201
        assert c.post("/v1/plans", json=PRO).status_code == 201
        now = samples.now_ms()
        period = period_containing("month", BERLIN, now)
        start = period.start - 86_400_000  # from the previous month
        sub = c.post("/v1/subscriptions", json={"customer_id": "cust_chg", "plan": "basic", "start": start}).json()
        at = max(period.start + 1, now - 1_800_000)
        before = seed_events("cust_chg", max(period.start, now - 3_600_000), at, 30, seed=3)
        after = seed_events("cust_chg", at, now, 40, seed=4)
        ingest(c, before + after)
        r = c.post(f"/v1/subscriptions/{sub['id']}/change", json={"plan": "pro", "at": at})
        assert r.status_code == 200, r.text
        ended, new = r.json()["ended"], r.json()["subscription"]
        assert (ended["end"], ended["end_reason"], new["start"], new["plan"]) == (at, "changed", at, "pro")
        invoice = c.get("/v1/customers/cust_chg/upcoming_invoice").json()
    assert invoice["subscription_id"] == new["id"]
    assert invoice["period"] == {"start": at, "end": period.end}
    assert invoice["billing_period"] == {"start": period.start, "end": period.end}
    assert_matches_reference(invoice, expected_usage(after), period.end - at, period.end - period.start)


def test_plan_validation_names_the_field(server: MeterFlowServer) -> None:
    with httpx.Client(base_url=server.url, headers=server.auth, timeout=30) as c:
        lowest = {"code": "lowest", "event_type": "sensor", "aggregation": "MIN", "property": "celsius"}
        assert c.post("/v1/meters", json=lowest).status_code == 201
        unit = {"type": "unit", "meter": "api_calls", "unit_amount": "0.1"}
        tiers = [{"up_to": "10", "unit_amount": "1"}, {"up_to": None, "unit_amount": "0.5"}]
        cases: list[tuple[dict[str, Any], str]] = [
            ({"charges": [{**unit, "meter": "nope"}]}, "charges[0].meter"),
            ({"charges": [{"type": "graduated", "meter": "bandwidth", "tiers": [{"up_to": "10", "unit_amount": "1"},
              *tiers]}]}, "charges[0].tiers[1].up_to"),
            ({"charges": [{"type": "volume", "meter": "bandwidth", "tiers": tiers[:1]}]}, "charges[0].tiers"),
            ({"charges": [{**unit, "unit_amount": "-1"}]}, "charges[0].unit_amount"),
            ({"charges": [{**unit, "unit_amount": 0.1}]}, "charges[0].unit_amount"),
            ({"currency": "EURO"}, "currency"),
            ({"charges": [{"type": "package", "meter": "api_calls", "package_size": "0", "package_amount": "1"}]},
             "charges[0].package_size"),
            ({"charges": [{**unit, "meter": "lowest"}]}, "charges[0].meter"),
        ]  # fmt: skip
        for change, field in cases:
            doc = {"code": "bad", "currency": "EUR", "charges": [unit], **change}
            r = c.post("/v1/plans", json=doc)
            assert r.status_code == 400, (change, r.text)
            assert r.json()["error"] == "invalid_plan" and r.json()["message"].startswith(field), r.text
        assert c.get("/v1/plans/bad").status_code == 404


def test_a_subscription_starts_at_most_the_backdate_horizon_ago(server: MeterFlowServer) -> None:
    """Issue 23, finding 12: a start at epoch 0 invoiced ~680 periods at once; the horizon is 400 days."""
    day = 86_400_000
    with httpx.Client(base_url=server.url, headers=server.auth, timeout=30) as c:
        assert c.put("/v1/customers/cust_old", json={}).status_code == 201
        assert c.put("/v1/plans/old_p", json={"currency": "EUR", "charges": [{"type": "flat", "amount": "1.00"}]}
                     ).status_code == 201  # fmt: skip
        for start in (0, samples.now_ms() - 401 * day):
            r = c.post("/v1/subscriptions", json={"customer_id": "cust_old", "plan": "old_p", "start": start})
            assert r.status_code == 400, r.text
            body = r.json()
            assert body["error"] == "invalid_subscription" and body["message"].startswith("`start`"), body
            assert "MF_SUBSCRIPTION_MAX_BACKDATE_DAYS (400)" in body["message"], body
        assert c.get("/v1/subscriptions", params={"customer_id": "cust_old"}).json()["data"] == []
        r = c.post("/v1/subscriptions", json={"customer_id": "cust_old", "plan": "old_p",
                                              "start": samples.now_ms() - 399 * day})  # fmt: skip
        assert r.status_code == 201, r.text


def test_overlap_409_versioning_on_put_archive_and_if_match(server: MeterFlowServer) -> None:
    b = samples.now_ms() - 300 * 86_400_000  # the history's origin, within the backdate horizon
    with httpx.Client(base_url=server.url, headers=server.auth, timeout=30) as c:
        for cid in ("cust_a", "cust_b"):
            assert c.put(f"/v1/customers/{cid}", json={}).status_code == 201
        one = {"currency": "EUR", "charges": [{"type": "flat", "amount": "10.00"}]}
        two = {"currency": "EUR", "charges": [{"type": "flat", "amount": "20.00"}]}
        assert c.put("/v1/plans/team", json=one).status_code == 201
        r = c.put("/v1/plans/team", json=two)  # no subscription yet: changed in place
        assert (r.status_code, r.json()["plan_version"], r.headers["ETag"]) == (200, 1, '"2"')
        sub = c.post("/v1/subscriptions", json={"customer_id": "cust_a", "plan": "team", "start": b + 1_000}).json()
        assert sub["plan_version"] == 1
        # Overlapping the same plan: 409, whether the new one starts before, inside or after it.
        for start in (b, b + 5_000, b + 10**9):
            r = c.post("/v1/subscriptions", json={"customer_id": "cust_a", "plan": "team", "start": start})
            assert r.status_code == 409 and r.json()["error"] == "subscription_conflict", r.text
        assert c.put("/v1/plans/team", json=one, headers={"If-Match": '"1"'}).status_code == 412
        r = c.put("/v1/plans/team", json=one, headers={"If-Match": '"2"'})
        assert (r.status_code, r.json()["plan_version"], r.json()["charges"][0]["amount"]) == (200, 2, "10.00")
        assert c.get(f"/v1/subscriptions/{sub['id']}").json()["plan_version"] == 1  # kept until moved
        other = c.post("/v1/subscriptions", json={"customer_id": "cust_b", "plan": "team", "start": b + 1_000}).json()
        assert other["plan_version"] == 2
        # Cancelled at 50_000: a new one from then does not overlap; one from before it does.
        r = c.post(f"/v1/subscriptions/{sub['id']}/cancel", json={"at": b + 50_000})
        assert (r.status_code, r.json()["end"], r.json()["status"]) == (200, b + 50_000, "ended")
        assert c.post("/v1/subscriptions", json={"customer_id": "cust_a", "plan": "team",
                                                 "start": b + 49_999}).status_code == 409  # fmt: skip
        again = c.post("/v1/subscriptions", json={"customer_id": "cust_a", "plan": "team", "start": b + 50_000})
        assert again.status_code == 201 and again.json()["plan_version"] == 2
        listed = c.get("/v1/subscriptions", params={"customer_id": "cust_a", "limit": 1}).json()
        rest = c.get("/v1/subscriptions", params={"customer_id": "cust_a", "cursor": listed["next_cursor"]}).json()
        assert sorted(s["id"] for s in listed["data"] + rest["data"]) == sorted([sub["id"], again.json()["id"]])
        # Archived: no new subscriptions; existing ones go on.
        assert c.delete("/v1/plans/team").status_code == 204
        assert c.get("/v1/plans/team").json()["archived"] is True
        r = c.post("/v1/subscriptions", json={"customer_id": "cust_b", "plan": "team", "start": 10**13})
        assert r.status_code == 400 and "archived" in r.json()["message"], r.text
        assert c.get(f"/v1/subscriptions/{other['id']}").json()["status"] == "active"


# --- periods in the customer's time zone, priced with the function invoicing uses --------------


@dataclass(frozen=True)
class Deps:
    settings: Settings
    storage: Storage
    meters: MeterCatalog
    plans: PlanCatalog
    subscriptions: Subscriptions


@pytest.fixture
async def deps(storage: Storage, records: Records) -> AsyncIterator[Deps]:
    settings = Settings()
    meters = MeterCatalog(records, configured_meters(settings))
    plans = PlanCatalog(records, meters, ())
    # The months priced here are fixed (2026): no backdate horizon, or they age out of it.
    yield Deps(settings, storage, meters, plans, Subscriptions(records, plans, max_backdate_days=100 * 366))


def berlin_ms(year: int, month: int, day: int) -> int:
    return int(datetime(year, month, day, tzinfo=BERLIN).timestamp() * 1000)


@pytest.mark.parametrize(("month", "start", "end"), [
    # October 2026 in Berlin: 31 days and the hour DST gives back on the 25th.
    ((2026, 10), (2026, 10, 15), None),
    # February 2026: 28 days; started on the 10th, cancelled on the 20th.
    ((2026, 2), (2026, 2, 10), (2026, 2, 20)),
])  # fmt: skip
async def test_cut_periods_across_dst_and_february_are_prorated_by_milliseconds(
    deps: Deps, records: Records, month: tuple[int, int], start: tuple[int, int, int], end: tuple[int, int, int] | None
) -> None:
    await Customers(records).put("cust_tz", validate({"timezone": "Europe/Berlin"}))
    plan = await deps.plans.parse(PRO)
    await deps.plans.create(plan)
    sub = await deps.subscriptions.create("cust_tz", "pro", berlin_ms(*start))
    if end is not None:
        sub = await deps.subscriptions.cancel(sub.id, berlin_ms(*end))  # type: ignore[assignment]
        assert sub is not None
    y, m = month
    period = Period(berlin_ms(y, m, 1), berlin_ms(y + (m == 12), m % 12 + 1, 1))
    # Events of the whole month, before the start too: only those inside the served part count.
    stored_at = period.end + 1
    events = seed_events("cust_tz", period.start, period.end, 300, seed=5)
    for i in range(0, len(events), 1000):
        b = decode_batch(samples.body(events[i : i + 1000]), stored_at, LIMITS)
        assert not b.failed, b.failed[:3]
        await deps.storage.insert_events(b.storage_rows())
    priced = await price_subscription_period(deps, sub, period)
    served_end = period.end if end is None else berlin_ms(*end)
    assert (priced.period.start, priced.period.end) == (berlin_ms(*start), served_end)
    assert (priced.period.period.start, priced.period.period.end) == (period.start, period.end)
    if month == (2026, 10):
        assert period.end - period.start == (31 * 24 + 1) * 3_600_000
    served = [e for e in events if berlin_ms(*start) <= e["timestamp"] < served_end]
    doc = priced_period_json(priced)
    assert_matches_reference(doc, expected_usage(served), served_end - berlin_ms(*start), period.end - period.start)
    flat = next(ln for ln in doc["lines"] if ln["charge"] == "flat")
    share = Fraction(served_end - berlin_ms(*start), period.end - period.start)
    assert Fraction(flat["amount"]) == half_up(49 * share, 2) > 0


# --- plans in the config file -------------------------------------------------------------------

CONFIG_PLAN = """
[[plans]]
code = "starter"
currency = "EUR"
charges = [{type = "flat", amount = "5.00"}, {type = "unit", meter = "api_calls", unit_amount = "0.001"}]
"""


def test_config_plans_are_parsed_at_load_and_a_bad_one_names_its_field(tmp_path: Path) -> None:
    cfg = tmp_path / "mf.toml"
    cfg.write_text(CONFIG_PLAN)
    (plan,) = plans_of(load(env={"MF_CONFIG": str(cfg)}))
    assert (plan.code, plan.charges[0]) == ("starter", FlatCharge(Decimal("5.00")))
    cfg.write_text(CONFIG_PLAN.replace('meter = "api_calls"', 'meter = "nope"'))
    with pytest.raises(ConfigError, match=r"plans\[0\]\.charges\[1\]\.meter"):
        plans_of(load(env={"MF_CONFIG": str(cfg)}))


async def test_a_config_plan_gets_a_new_version_only_when_its_definition_changes(
    records: Records, tmp_path: Path
) -> None:
    cfg = tmp_path / "mf.toml"
    cfg.write_text(CONFIG_PLAN)
    settings = load(env={"MF_CONFIG": str(cfg)})
    meters = MeterCatalog(records, configured_meters(settings))

    async def started_version(plans: tuple[Plan, ...]) -> int:
        catalog = PlanCatalog(records, meters, plans)
        await catalog.start()
        found = await catalog.get("starter")
        assert found is not None and found.source == "config" and found.version is None
        return found.plan_version

    assert await started_version(configured_plans(settings, configured_meters(settings))) == 1
    assert await started_version(configured_plans(settings, configured_meters(settings))) == 1  # a restart with the same definition
    cfg.write_text(CONFIG_PLAN.replace("5.00", "6.00"))
    changed = plans_of(load(env={"MF_CONFIG": str(cfg)}))
    assert await started_version(changed) == 2
    catalog = PlanCatalog(records, meters, changed)
    assert (await catalog.get_version("starter", 1)).charges[0] == FlatCharge(Decimal("5.00"))
