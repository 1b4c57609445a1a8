"""Issue 21's acceptance: a Hypothesis state machine plays billing histories in process and checks the books.

It interleaves ingest (on time and late), cancels and plan changes at past and future instants, time-zone,
plan and meter edits, closing passes, early finalization, payment, voiding and manual credit on the embedded
backend (chdb storage, SQLite records), and checks after every step that no total is negative, that no two
invoices of a subscription overlap, that finalized documents never change and that numbers are gapless; at the
end, with every period closed, that each subscription's invoices minus its credit notes equal what
`books_reference` (written from the README, not from the code) says its final timeline owes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import itertools
import os
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from meterflow import samples
from meterflow.billing.catalog import PlanCatalog
from meterflow.billing.closing import Closer
from meterflow.billing.credit_notes import CreditExceedsInvoice, CreditNotes
from meterflow.billing.invoices import WrongStatus
from meterflow.billing.rendered import credit_note_bytes, invoice_bytes
from meterflow.billing.subscriptions import SubscriptionConflict, SubscriptionEnded, Subscriptions
from meterflow.config import Settings
from meterflow.customers import Customers, validate
from meterflow.kernel.clock import ManualClock
from meterflow.kernel.rust import Limits, decode_batch
from meterflow.metering.catalog import MeterCatalog
from meterflow.metering.meters import parse_meter
from meterflow.records import open_records
from meterflow.runtime import ClosingRuntime, open_invoices, started
from meterflow.storage.base import SCHEMA
from meterflow.storage.embedded import EmbeddedStorage
from tests.billing.books_reference import (
    DAY_MS,
    Timeline,
    aggregate,
    calendar_period,
    meter_in_force,
    owed,
    periods,
    to_ms,
)

HOUR_MS = 3_600_000
UTC_ = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return to_ms(dt.datetime(year, month, day, hour, minute, second, tzinfo=UTC_))


def berlin(year: int, month: int, day: int) -> int:
    return to_ms(dt.datetime(year, month, day, tzinfo=BERLIN))


# --- the reference on the README's own examples ----------------------------------------------------------------


def test_the_period_walk_follows_the_readme_example_utc_to_berlin_on_10_march() -> None:
    history = [(utc(2026, 1, 1), "UTC"), (utc(2026, 3, 10, 12), "Europe/Berlin")]
    got = periods(history, "month", utc(2026, 2, 15), utc(2026, 6, 15))
    assert got == [
        (utc(2026, 2, 1), utc(2026, 3, 1)),
        (utc(2026, 3, 1), utc(2026, 4, 1)),  # March stays in UTC: it had begun
        (utc(2026, 4, 1), utc(2026, 4, 30, 22)),  # 1 April 00:00 UTC to 1 May 00:00 Berlin
        (berlin(2026, 5, 1), berlin(2026, 6, 1)),  # then May in Berlin
        (berlin(2026, 6, 1), berlin(2026, 7, 1)),
    ]


def test_a_zone_change_into_a_zone_behind_runs_to_the_end_of_the_month_holding_two_days_later() -> None:
    # 1 April 00:00 UTC is 31 March 17:00 in Los Angeles; two days later is in April there.
    history = [(utc(2026, 1, 1), "UTC"), (utc(2026, 3, 20), "America/Los_Angeles")]
    la = ZoneInfo("America/Los_Angeles")
    got = periods(history, "month", utc(2026, 3, 5), utc(2026, 5, 15))
    assert got == [(utc(2026, 3, 1), utc(2026, 4, 1)),
                   (utc(2026, 4, 1), to_ms(dt.datetime(2026, 5, 1, tzinfo=la))),
                   (to_ms(dt.datetime(2026, 5, 1, tzinfo=la)), to_ms(dt.datetime(2026, 6, 1, tzinfo=la)))]  # fmt: skip


def test_two_changes_inside_one_period_take_the_last_and_a_change_back_is_a_change() -> None:
    history = [(utc(2026, 1, 1), "UTC"), (utc(2026, 3, 3), "Asia/Tokyo"), (utc(2026, 3, 9), "Europe/Berlin"),
               (utc(2026, 4, 9), "UTC")]  # fmt: skip
    got = periods(history, "month", utc(2026, 1, 1), utc(2026, 6, 2))[2:]  # a subscription from January
    assert got == [(utc(2026, 3, 1), utc(2026, 4, 1)), (utc(2026, 4, 1), berlin(2026, 5, 1)),
                   (berlin(2026, 5, 1), utc(2026, 6, 1)), (utc(2026, 6, 1), utc(2026, 7, 1))]  # fmt: skip


def test_years_are_calendar_years_of_the_zone() -> None:
    history = [(utc(2025, 6, 1), "Europe/Berlin")]
    assert periods(history, "year", utc(2026, 3, 1), utc(2026, 3, 2)) == [(berlin(2026, 1, 1), berlin(2027, 1, 1))]
    assert calendar_period(berlin(2026, 1, 1) - 1, "Europe/Berlin", "year") == (berlin(2025, 1, 1), berlin(2026, 1, 1))


FLAT_PLAN = {"code": "p", "currency": "EUR", "interval": "month", "minimum": "100.00",
             "charges": [{"type": "flat", "amount": "49.00"},
                         {"type": "unit", "meter": "calls", "unit_amount": "0.50", "free_units": "1"}]}  # fmt: skip
CALLS: dict[str, Any] = {"code": "calls", "event_type": "api_request", "aggregation": "COUNT"}


def test_a_start_on_15_march_in_berlin_bills_407_of_743_hours() -> None:
    sub = Timeline("s", "c", FLAT_PLAN, berlin(2026, 3, 15), berlin(2026, 4, 1))
    [p] = owed(sub, [], [(utc(2026, 1, 1), "Europe/Berlin")], {"calls": [(0, CALLS)]})
    assert (p.billed[1] - p.billed[0], p.period[1] - p.period[0]) == (407 * HOUR_MS, 743 * HOUR_MS)
    flat = p.priced["lines"][0]
    assert flat.amount == Fraction("26.84")
    assert p.priced["minimum"] == Fraction("54.78") and p.total == Fraction("54.78")  # 100 x 407/743, half up


def test_the_period_after_a_zone_change_counts_as_whole() -> None:
    history = [(utc(2026, 1, 1), "UTC"), (utc(2026, 3, 10, 12), "Europe/Berlin")]
    sub = Timeline("s", "c", FLAT_PLAN, utc(2026, 3, 1), utc(2026, 4, 30, 22))  # it began before the change
    _, p = owed(sub, [], history, {"calls": [(0, CALLS)]})
    assert p.billed == p.period and p.priced["lines"][0].amount == 49 and p.total == 100


def ev(tid: str, ts: int, customer: str = "c", kind: str = "api_request", **props: object) -> dict[str, object]:
    return {"transaction_id": tid, "customer_id": customer, "event_type": kind, "timestamp": ts, "properties": props}


def test_usage_counts_each_transaction_once_inside_the_billed_part_with_the_version_at_its_start() -> None:
    t0 = utc(2026, 3, 1)
    events = [ev("a", t0 + 1, bytes=10, region="eu"), ev("a", t0 + 1, bytes=10, region="eu"),
              ev("b", t0 + 2, bytes="2.5", region="us"), ev("c", t0 + 3, kind="other", bytes=100),
              ev("d", t0 + 4, customer="x", bytes=7), ev("e", t0 - 1, bytes=1000),
              ev("f", utc(2026, 4, 1), bytes=1000)]  # fmt: skip
    eu_only: dict[str, Any] = {"code": "calls", "event_type": "api_request", "aggregation": "COUNT", "filters": {"region": "eu"}}
    history: list[tuple[int, dict[str, Any] | None]] = [(utc(2026, 3, 1, 0, 0, 1), eu_only), (utc(2026, 2, 1), CALLS)]
    assert meter_in_force(history, t0) is CALLS and meter_in_force(history, 0) is CALLS
    assert meter_in_force(history, utc(2026, 4, 1)) is eu_only
    assert aggregate(CALLS, events, "c", t0, utc(2026, 4, 1)) == 2
    assert aggregate(eu_only, events, "c", t0, utc(2026, 4, 1)) == 1
    bandwidth = {"code": "bw", "event_type": "api_request", "aggregation": "SUM", "property": "bytes"}
    assert aggregate(bandwidth, events, "c", t0, utc(2026, 4, 1)) == Fraction("12.5")
    sub = Timeline("s", "c", FLAT_PLAN, utc(2026, 2, 20), utc(2026, 5, 1))
    march = owed(sub, events, [(0, "UTC")], {"calls": history})[1]
    # March is priced with the version in force on 1 March 00:00 (the COUNT one): 2 calls, 1 free.
    assert march.usage == {"calls": 2} and march.priced["lines"][1].amount == Fraction("0.50")
    april = owed(sub, events, [(0, "UTC")], {"calls": history})[2]
    assert april.usage == {"calls": 0}  # "f" has no region: the filter in force in April leaves it out



# --- the machine -------------------------------------------------------------------------------------------------

# 37 minutes past midnight: the clock moves by whole hours, so a zone change never falls on a period boundary
# (the one case the README leaves open: see books_reference.zone_at).
T0 = utc(2026, 1, 1) + 37 * 60_000
HORIZON = utc(2026, 5, 10)  # the clock stops here; every instant stays in 2026
EARLIEST = T0 - 20 * DAY_MS  # the earliest subscription start
GRACE_S = 6 * 3600
MAX_AGE_MS = 400 * DAY_MS
LIMITS = Limits(max_age_ms=MAX_AGE_MS)
ZONES = ("UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo", "Australia/Sydney")
CUSTOMERS = ("c1", "c2")
EVENT_TYPES = ("api_request", "api_request", "api_request", "job")
REGIONS = ("eu", "us", None)

METERS: dict[str, list[dict[str, Any]]] = {
    "calls": [
        {"code": "calls", "name": "Calls", "event_type": "api_request", "aggregation": "COUNT"},
        {"code": "calls", "name": "Calls", "event_type": "api_request", "aggregation": "COUNT", "filters": {"region": "eu"}},
        {"code": "calls", "name": "Calls", "event_type": "api_request", "aggregation": "COUNT", "filters": {"region": ["eu", "us"]}},
    ],
    "bytes": [
        {"code": "bytes", "name": "Bytes", "event_type": "api_request", "aggregation": "SUM", "property": "bytes"},
        {"code": "bytes", "name": "Bytes", "event_type": "api_request", "aggregation": "SUM", "property": "bytes", "filters": {"region": "us"}},
        {"code": "bytes", "name": "Bytes", "event_type": "job", "aggregation": "SUM", "property": "bytes"},
    ],
}  # fmt: skip


def _plan(code: str, interval: str, minimum: str | None, *charges: dict[str, Any]) -> dict[str, Any]:
    return {"code": code, "name": code.title(), "currency": "EUR", "interval": interval,
            **({"minimum": minimum} if minimum else {}), "charges": list(charges)}  # fmt: skip


PLANS: dict[str, list[dict[str, Any]]] = {
    "basic": [
        _plan("basic", "month", None, {"type": "flat", "amount": "10.00"},
              {"type": "unit", "meter": "calls", "unit_amount": "0.25", "free_units": "2"}),
        _plan("basic", "month", "15.00", {"type": "flat", "amount": "12.50"},
              {"type": "unit", "meter": "calls", "unit_amount": "0.3333"}),
    ],
    "pro": [
        _plan("pro", "month", "60.00", {"type": "flat", "amount": "49.00"},
              {"type": "unit", "meter": "calls", "unit_amount": "0.5"},
              {"type": "graduated", "meter": "bytes", "tiers": [{"up_to": "1000", "unit_amount": "0"},
                                                                {"up_to": None, "unit_amount": "0.001", "flat_amount": "1.00"}]}),
        _plan("pro", "month", "80.00", {"type": "flat", "amount": "59.00"},
              {"type": "unit", "meter": "calls", "unit_amount": "0.45", "free_units": "3"},
              {"type": "package", "meter": "bytes", "package_size": "500", "package_amount": "2.50"}),
    ],
    "team": [
        _plan("team", "year", "100.00", {"type": "flat", "amount": "120.00"},
              {"type": "volume", "meter": "calls", "tiers": [{"up_to": "5", "unit_amount": "1.00"},
                                                             {"up_to": None, "unit_amount": "0.80", "flat_amount": "2.00"}]},
              {"type": "unit", "meter": "bytes", "unit_amount": "0.0007"}),
        _plan("team", "year", None, {"type": "flat", "amount": "99.99"},
              {"type": "volume", "meter": "calls", "tiers": [{"up_to": "3", "unit_amount": "1.10"},
                                                             {"up_to": None, "unit_amount": "0.70"}]}),
    ],
}  # fmt: skip

EVENT = st.fixed_dictionaries({
    "kind": st.sampled_from(EVENT_TYPES),
    "bytes": st.one_of(st.integers(0, 3000), st.sampled_from(["0.5", "12.25", "1999.75"])),
    "region": st.sampled_from(REGIONS),
    "ago_s": st.integers(1, 6 * 3600),
})  # fmt: skip
# An instant relative to now, in hours (back up to 60 days, ahead up to 40), optionally snapped to the start of
# the local month in the customer's zone (so whole, uncut periods happen too).
WHEN = st.tuples(st.integers(-60 * 24, 40 * 24), st.booleans())
PICK = st.integers(0, 10_000)


@dataclass
class Sub:
    """The model of one subscription: what the reference prices at the end."""

    id: str
    customer: str
    plan: str
    doc: dict[str, Any]
    start: int
    end: int | None


def frac(x: Any) -> Fraction:
    return Fraction(str(x))


def attributed(line: dict[str, Any], owner: str | None) -> str | None:
    """The subscription a line belongs to: the one its late_for names, else its document's."""
    late = line.get("late_for")
    return str(late["subscription_id"]) if late else owner


# Fields of a finalized invoice that may still change (README: its status and the time of that change; the
# credit notes against it). Everything else is frozen.
MOVING = frozenset({"status", "paid_at", "voided_at", "updated_at", "status_changed_at", "amount_credited",
                    "amount_due", "version"})  # fmt: skip


def frozen_part(invoice: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in invoice.items() if k not in MOVING}


def number_of(text: str, prefix: str) -> tuple[int, int]:
    m = re.fullmatch(rf"{prefix}-(\d{{4}})-(\d{{6}})", text)
    assert m, f"{text!r} is not a {prefix}-YYYY-NNNNNN number"
    return int(m[1]), int(m[2])


def assert_gapless(numbers: list[str], prefix: str) -> None:
    by_year: dict[int, list[int]] = defaultdict(list)
    for n in numbers:
        y, k = number_of(n, prefix)
        by_year[y].append(k)
    for y, ks in by_year.items():
        assert sorted(ks) == list(range(1, len(ks) + 1)), f"{prefix} numbers of {y} are not 1..n: {sorted(ks)}"


def step(f: Callable[..., None]) -> Callable[..., None]:
    """A rule that marks the machine broken when it fails, so that teardown does not bury the failure under
    a second one from the final settlement."""

    @functools.wraps(f)
    def wrapper(self: Books, *args: Any, **kwargs: Any) -> None:
        try:
            f(self, *args, **kwargs)
        except BaseException:
            self.broken = True
            raise

    return wrapper


class Books(RuleBasedStateMachine):
    """One customer base on the embedded backend, a clock that only moves forward, and the model beside it."""

    storage: EmbeddedStorage  # the session's chdb, set by the test

    def __init__(self) -> None:
        super().__init__()
        self.broken = False
        self.loop = asyncio.new_event_loop()
        self.tmp = tempfile.mkdtemp(prefix="mf_books_")
        self.stack = AsyncExitStack()
        self.clock = ManualClock(T0)
        self.events: list[dict[str, Any]] = []
        self.tz: dict[str, list[tuple[int, str]]] = {}
        self.meter_history: dict[str, list[tuple[int, dict[str, Any] | None]]] = {}
        self.plan_doc = {code: docs[0] for code, docs in PLANS.items()}
        self.subs: dict[str, Sub] = {}
        self.invoices_now: list[dict[str, Any]] = []  # as of the last check
        self.frozen: dict[str, tuple[dict[str, Any], Any]] = {}  # finalized invoice id: (JSON, document)
        self.frozen_notes: dict[str, tuple[dict[str, Any], Any]] = {}  # credit note id: (JSON, document)
        self.seq = 0
        try:
            self.run(self._open())
        except BaseException:
            self._dispose()
            raise

    # -- plumbing --------------------------------------------------------------------------------------------

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def _open(self) -> None:
        self.settings = Settings(data_dir=self.tmp, max_age_ms=MAX_AGE_MS, invoice_grace_s=GRACE_S,
                                 dedup_window_s=MAX_AGE_MS // 1000 + 3600)
        records = open_records(self.settings)
        await self.stack.enter_async_context(started(records))
        await self.storage.execute("DROP TABLE IF EXISTS events")
        for ddl in SCHEMA:
            await self.storage.execute(ddl)
        meters = MeterCatalog(records, (), clock=self.clock,
                              late_window_ms=self.settings.max_age_ms + self.settings.max_future_ms)
        for code, versions in METERS.items():
            await meters.create(parse_meter(versions[0]))
            self.meter_history[code] = [(T0, versions[0])]
        plans = PlanCatalog(records, meters, ())
        await plans.start()
        for docs in PLANS.values():
            await plans.create(await plans.parse(docs[0]))
        customers = Customers(records, clock=self.clock)

        self.deps = ClosingRuntime(self.settings, self.storage, records, meters, plans,
                                   Subscriptions(records, plans, clock=self.clock),
                                   open_invoices(self.settings, records, None, customers, meters, self.clock),
                                   CreditNotes(records, clock=self.clock), customers, self.clock)
        self.closer = Closer(self.deps)

    def _dispose(self) -> None:
        try:
            self.run(self.stack.aclose())
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def now(self) -> int:
        return self.clock.now_ms()

    def zone(self, customer: str) -> str:
        return self.tz[customer][-1][1]

    def instant(self, customer: str, when: tuple[int, bool], after: int) -> int:
        hours, snap = when
        t = self.now() + hours * HOUR_MS
        if snap:
            t = calendar_period(t, self.zone(customer), "month")[0]
        if t <= after:
            t = after + HOUR_MS * (1 + abs(hours) % 72)
        return t

    def pick(self, items: list[Any], i: int) -> Any:
        return items[i % len(items)]

    async def store(self, events: list[dict[str, Any]]) -> None:
        b = decode_batch(samples.body(events), self.now(), LIMITS)
        assert not b.failed, b.failed
        await self.storage.insert_events(b.storage_rows())
        self.events.extend(events)

    def event(self, customer: str, ts: int, e: dict[str, Any]) -> dict[str, Any]:
        self.seq += 1
        props: dict[str, Any] = {"bytes": e["bytes"] if isinstance(e["bytes"], int) else float(e["bytes"])}
        if e["region"] is not None:
            props["region"] = e["region"]
        return {"transaction_id": f"t{self.seq}", "customer_id": customer, "event_type": e["kind"], "timestamp": ts,
                "properties": props}  # fmt: skip

    async def all_invoices(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for c in CUSTOMERS:
            after = ""
            while True:
                page = await self.deps.invoices.list(after, 100, customer_id=c)
                out.extend(page)
                if len(page) < 100:
                    break
                after = page[-1]["id"]
        return out

    async def all_credit_notes(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        after = ""
        while True:
            page = await self.deps.credit_notes.list(after, 100)
            out.extend(page)
            if len(page) < 100:
                break
            after = page[-1]["id"]
        return out

    # -- rules -------------------------------------------------------------------------------------------------

    @initialize(zones=st.tuples(st.sampled_from(ZONES), st.sampled_from(ZONES)),
                plans=st.tuples(st.sampled_from(sorted(PLANS)), st.sampled_from(sorted(PLANS))),
                starts=st.tuples(WHEN, WHEN))  # fmt: skip
    @step
    def customers(self, zones: tuple[str, str], plans: tuple[str, str], starts: tuple[Any, Any]) -> None:
        """Both customers, each with a first subscription (so every history has something to bill)."""
        for c, tz in zip(CUSTOMERS, zones, strict=True):
            self.run(self.deps.customers.put(c, validate({"name": c, "timezone": tz})))
            self.tz[c] = [(self.now(), tz)]
        for c, plan, when in zip(CUSTOMERS, plans, starts, strict=True):
            self.subscribe(c, plan, when)

    @rule(customer=st.sampled_from(CUSTOMERS), plan=st.sampled_from(sorted(PLANS)), when=WHEN)
    @step
    def subscribe(self, customer: str, plan: str, when: tuple[int, bool]) -> None:
        start = self.instant(customer, when, EARLIEST)
        overlap = any(s.customer == customer and s.plan == plan and (s.end is None or s.end > start)
                      for s in self.subs.values())  # fmt: skip
        try:
            sub = self.run(self.deps.subscriptions.create(customer, plan, start))
        except SubscriptionConflict:
            assert overlap, f"create({customer}, {plan}, {start}) refused without an overlap"
            return
        assert not overlap, f"create({customer}, {plan}, {start}) accepted over an overlap"
        assert (sub.start, sub.end, sub.plan) == (start, None, plan)
        self.subs[sub.id] = Sub(sub.id, customer, plan, self.plan_doc[plan], start, None)

    @precondition(lambda self: self.subs)
    @rule(i=PICK, when=WHEN)
    @step
    def cancel(self, i: int, when: tuple[int, bool]) -> None:
        s: Sub = self.pick(list(self.subs.values()), i)
        at = self.instant(s.customer, when, s.start)
        try:
            got = self.run(self.deps.subscriptions.cancel(s.id, at))
        except SubscriptionEnded:
            assert s.end is not None, f"cancel of {s.id} refused though it has no end"
            return
        assert s.end is None, f"{s.id} cancelled twice"
        assert got is not None and got.end == at
        s.end = at

    @precondition(lambda self: self.subs)
    @rule(i=PICK, plan=st.sampled_from(sorted(PLANS)), when=WHEN)
    @step
    def change(self, i: int, plan: str, when: tuple[int, bool]) -> None:
        s: Sub = self.pick(list(self.subs.values()), i)
        at = self.instant(s.customer, when, s.start)
        overlap = any(o.id != s.id and o.customer == s.customer and o.plan == plan and (o.end is None or o.end > at)
                      for o in self.subs.values())  # fmt: skip
        try:
            got = self.run(self.deps.subscriptions.change(s.id, plan, at))
        except SubscriptionEnded:
            assert s.end is not None, f"change of {s.id} refused as ended though it has no end"
            return
        except SubscriptionConflict:
            assert s.end is None and overlap, f"change of {s.id} to {plan} at {at} refused without an overlap"
            return
        assert s.end is None and not overlap, f"change of {s.id} to {plan} at {at} accepted"
        assert got is not None
        ended, new = got
        assert ended.end == at and (new.start, new.end, new.plan) == (at, None, plan)
        s.end = at
        self.subs[new.id] = Sub(new.id, s.customer, plan, self.plan_doc[plan], at, None)

    @rule(customer=st.sampled_from(CUSTOMERS), zone=st.sampled_from(ZONES))
    @step
    def move_customer(self, customer: str, zone: str) -> None:
        self.run(self.deps.customers.patch(customer, validate({"timezone": zone}, partial=True)))
        if zone != self.zone(customer):
            self.tz[customer].append((self.now(), zone))

    @rule(plan=st.sampled_from(sorted(PLANS)), variant=st.integers(0, 1))
    @step
    def edit_plan(self, plan: str, variant: int) -> None:
        doc = PLANS[plan][variant]
        self.run(self.deps.plans.replace(self.run(self.deps.plans.parse(doc))))
        self.plan_doc[plan] = doc

    @rule(code=st.sampled_from(sorted(METERS)), variant=st.integers(0, 2), when=WHEN)
    @step
    def edit_meter(self, code: str, variant: int, when: tuple[int, bool]) -> None:
        hours, snap = when
        at = self.now() + hours * HOUR_MS
        if snap:
            at = calendar_period(at, "UTC", "month")[0]
        while any(t == at for t, _ in self.meter_history[code]):
            at += 1
        doc = METERS[code][variant]
        self.run(self.deps.meters.replace(parse_meter(doc), None, effective_at=at))
        self.meter_history[code].append((at, doc))

    @rule(customer=st.sampled_from(CUSTOMERS), events=st.lists(EVENT, min_size=1, max_size=4))
    @step
    def ingest(self, customer: str, events: list[dict[str, Any]]) -> None:
        self.run(self.store([self.event(customer, self.now() - e["ago_s"] * 1000, e) for e in events]))

    def closed(self) -> list[dict[str, Any]]:
        return [inv for inv in self.invoices_now if inv["status"] != "draft" and inv["kind"] == "period"]

    @precondition(lambda self: self.closed())
    @rule(i=PICK, events=st.lists(st.tuples(EVENT, st.floats(0, 1, exclude_max=True)), min_size=1, max_size=3))
    @step
    def ingest_late(self, i: int, events: list[tuple[dict[str, Any], float]]) -> None:
        closed = self.closed()
        inv = self.pick(closed, i)
        lo, hi = inv["period"]["start"], inv["period"]["end"]
        stamped = [self.event(inv["customer_id"], lo + int((hi - lo) * f), e) for e, f in events]
        self.run(self.store([e for e in stamped if e["timestamp"] < self.now()]))

    @precondition(lambda self: self.events)
    @rule(i=PICK)
    @step
    def ingest_again(self, i: int) -> None:
        self.run(self.store([dict(self.pick(self.events, i))]))  # a retry: the same transaction, counted once

    @rule(hours=st.one_of(st.integers(1, 12), st.integers(13, 20 * 24)), then_close=st.booleans())
    @step
    def advance(self, hours: int, then_close: bool) -> None:
        self.clock.set(min(self.now() + hours * HOUR_MS, max(HORIZON, self.now())))
        if then_close:
            self.close_pass()

    @rule()
    @step
    def close(self) -> None:
        self.close_pass()

    def close_pass(self) -> None:
        report = self.run(self.closer.run(self.now()))
        failures = self.run(self.closer.failures.list())
        assert report.failed == 0 and not failures, f"closing failed: {failures}"

    @precondition(lambda self: self.invoices_now)
    @rule(i=PICK, action=st.sampled_from(["finalize", "mark_paid", "void"]))
    @step
    def transition(self, i: int, action: str) -> None:
        inv = self.pick(self.invoices_now, i)
        allowed = {"finalize": {"draft"}, "mark_paid": {"finalized"}, "void": {"finalized"}}[action]
        if inv["status"] == "paid" and action == "void":
            return  # the README does not say whether a paid invoice can be voided
        try:
            got = self.run(self.deps.invoices.transition(inv["id"], action))
        except WrongStatus:
            assert inv["status"] not in allowed, f"{action} of a {inv['status']} invoice refused"
            return
        assert inv["status"] in allowed, f"{action} of a {inv['status']} invoice accepted"
        assert got is not None

    def creditable(self) -> list[dict[str, Any]]:
        return [inv for inv in self.invoices_now if inv["status"] in ("finalized", "paid")
                and frac(inv["total"]) > frac(inv["amount_credited"])]  # fmt: skip

    @precondition(lambda self: self.creditable())
    @rule(i=PICK, share=st.one_of(st.none(), st.integers(1, 100)), over=st.booleans())
    @step
    def credit(self, i: int, share: int | None, over: bool) -> None:
        open_ = self.creditable()
        inv = self.pick(open_, i)
        left = Decimal(inv["total"]) - Decimal(inv["amount_credited"])
        if over:
            with pytest.raises(CreditExceedsInvoice):
                self.run(self.deps.credit_notes.create_manual(inv["id"], left + Decimal("0.01"), memo="over"))
            return
        amount = None if share is None else max(Decimal("0.01"), (left * share / 100).quantize(Decimal("0.01"), ROUND_DOWN))
        note = self.run(self.deps.credit_notes.create_manual(inv["id"], amount, memo="goodwill"))
        assert note is not None and Decimal(note["total"]) == (left if amount is None else amount)
        assert note["reason"] == "manual"

    # -- invariants ---------------------------------------------------------------------------------------------

    @invariant()
    def books_hold(self) -> None:
        try:
            self.check()
        except BaseException:
            self.broken = True
            raise

    def check(self) -> None:
        invoices = self.run(self.all_invoices())
        notes = self.run(self.all_credit_notes())
        self.invoices_now = invoices
        by_id = {inv["id"]: inv for inv in invoices}
        by_invoice: dict[str, Fraction] = defaultdict(Fraction)
        for n in notes:
            assert frac(n["total"]) >= 0, f"credit note {n['number']} total {n['total']} is negative"
            assert frac(n["total"]) == sum((frac(ln["amount"]) for ln in n["lines"]), Fraction(0)), n
            by_invoice[n["invoice_id"]] += frac(n["total"])
            doc = self.run(credit_note_bytes(self.deps.records, n, by_id[n["invoice_id"]], "html"))
            if n["id"] in self.frozen_notes:
                was, was_doc = self.frozen_notes[n["id"]]
                assert n == was, f"credit note {n['number']} changed"
                assert doc == was_doc, f"the document of credit note {n['number']} changed"
            self.frozen_notes[n["id"]] = (n, doc)
        spans: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
        for inv in invoices:
            total = frac(inv["total"])
            assert total >= 0, f"invoice {inv['id']} total {total} is negative"
            lines = sum((frac(ln["amount"]) for ln in inv["lines"]), Fraction(0))
            assert total == lines + frac(inv.get("minimum_adjustment") or 0), f"{inv['id']}: lines do not add up"
            credited = frac(inv["amount_credited"])
            assert credited == by_invoice.get(inv["id"], 0), f"{inv['id']}: amount_credited is not its credit notes"
            assert 0 <= credited <= total and frac(inv["amount_due"]) == total - credited, inv
            if inv["kind"] == "period":
                spans[inv["subscription_id"]].append((inv["period"]["start"], inv["period"]["end"], inv["id"]))
            if inv["status"] == "draft":
                assert inv["number"] is None
                assert inv["id"] not in self.frozen, f"{inv['id']} went back to draft"
                continue
            doc = self.run(invoice_bytes(self.deps.records, inv, "html"))
            if inv["id"] in self.frozen:
                was, was_doc = self.frozen[inv["id"]]
                assert frozen_part(inv) == was, f"finalized invoice {inv['number']} changed"
                assert doc == was_doc, f"the document of finalized invoice {inv['number']} changed"
            else:
                self.frozen[inv["id"]] = (frozen_part(inv), doc)
        for sid, ss in spans.items():
            ss.sort()
            for (_, end, a), (start, _, b) in itertools.pairwise(ss):
                assert end <= start, f"invoices {a} and {b} of {sid} overlap"
        assert_gapless([i["number"] for i in invoices if i["number"] is not None], "MF")
        assert_gapless([n["number"] for n in notes], "CN")

    # -- the end: close everything and compare with the reference -------------------------------------------------

    def teardown(self) -> None:
        try:
            if not self.broken:
                self.settle_everything()
                self.check()
                self.compare_with_reference()
        finally:
            self._dispose()

    def settle_everything(self) -> None:
        for s in list(self.subs.values()):
            if s.end is None:
                at = max(self.now(), s.start + HOUR_MS)
                self.run(self.deps.subscriptions.cancel(s.id, at))
                s.end = at
        ends = [s.end for s in self.subs.values() if s.end is not None]
        self.clock.set(max([self.now(), *ends]) + GRACE_S * 1000 + HOUR_MS)
        seen = None
        for _ in range(8):
            self.close_pass()
            state = (sorted((i["id"], i["status"], i["total"]) for i in self.run(self.all_invoices())),
                     sorted(n["id"] for n in self.run(self.all_credit_notes())))  # fmt: skip
            if state == seen:
                return
            seen = state
        raise AssertionError("closing passes still change the books after 8 passes")

    def compare_with_reference(self) -> None:
        invoices, notes = self.invoices_now, self.run(self.all_credit_notes())
        assert all(i["status"] != "draft" for i in invoices), "a draft is left once every period is closed"
        billed: dict[str | None, Fraction] = defaultdict(Fraction)
        credited: dict[str | None, Fraction] = defaultdict(Fraction)
        manual: dict[str | None, Fraction] = defaultdict(Fraction)
        voided: dict[str | None, Fraction] = defaultdict(Fraction)  # README: a void is a concession too
        for inv in invoices:
            into_void = inv["status"] == "void"
            for ln in inv["lines"]:
                billed[attributed(ln, inv["subscription_id"])] += frac(ln["amount"])
                if into_void:
                    voided[attributed(ln, inv["subscription_id"])] += frac(ln["amount"])
            billed[inv["subscription_id"]] += frac(inv.get("minimum_adjustment") or 0)
            if into_void:
                voided[inv["subscription_id"]] += frac(inv.get("minimum_adjustment") or 0)
        for n in notes:
            for ln in n["lines"]:
                into = manual if n["reason"] == "manual" else credited
                into[attributed(ln, n["subscription_id"])] += frac(ln["amount"])
        assert None not in billed and None not in credited, "a line belongs to no subscription"
        for s in self.subs.values():
            assert s.end is not None
            timeline = Timeline(s.id, s.customer, s.doc, s.start, s.end)
            periods_owed = owed(timeline, self.events, self.tz[s.customer], self.meter_history)
            reference = sum((p.total for p in periods_owed), Fraction(0))
            net = billed[s.id] - credited[s.id]
            given = manual[s.id] + voided[s.id]  # concessions: what settling does not undo
            detail = self.explain(s, periods_owed, invoices, notes)
            if given == 0:
                assert net == reference, (f"{s.id}: billed {billed[s.id]} - credited {credited[s.id]} = {net}, "
                                          f"reference {reference}\n{detail}")  # fmt: skip
            else:
                collectible = net - given
                assert reference - given <= collectible <= reference, (
                    f"{s.id}: collectible {collectible} (given {given}), reference {reference}\n{detail}")

    def explain(self, s: Sub, periods_owed: list[Any], invoices: list[dict[str, Any]], notes: list[dict[str, Any]]) -> str:
        out = [f"subscription {s.id} {s.customer} {s.plan} [{s.start}, {s.end}) tz {self.tz[s.customer]}"]
        for p in periods_owed:
            lines = ", ".join(f"{ln.charge}:{ln.amount}" for ln in p.priced["lines"])
            out.append(f"  owed {p.billed} of {p.period}: usage {dict(p.usage)} -> {lines}; "
                       f"adj {p.priced['adjustment']} = {p.total}")  # fmt: skip
        for inv in invoices:
            mine = [ln for ln in inv["lines"] if attributed(ln, inv["subscription_id"]) == s.id]
            if mine or inv["subscription_id"] == s.id:
                out.append(f"  invoice {inv['number']} {inv['status']} {inv['kind']} {inv['period']} of {inv['billing_period']}: "
                           f"{[(ln.get('line_key'), ln.get('quantity'), ln['amount'], ln.get('late_for')) for ln in mine]}"
                           f" adj {inv.get('minimum_adjustment')} total {inv['total']}")  # fmt: skip
        for n in notes:
            mine = [ln for ln in n["lines"] if attributed(ln, n["subscription_id"]) == s.id]
            if mine:
                out.append(f"  credit {n['number']} {n['reason']}: "
                           f"{[(ln.get('line_key'), ln['amount'], ln.get('late_for')) for ln in mine]}")  # fmt: skip
        return "\n".join(out)


EXAMPLES = int(os.environ.get("MF_BOOKS_EXAMPLES", "200"))


def test_the_books_hold_for_any_history(chdb_storage: EmbeddedStorage) -> None:
    Books.storage = chdb_storage
    run_state_machine_as_test(Books, settings=settings(
        max_examples=EXAMPLES, stateful_step_count=25, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]))
