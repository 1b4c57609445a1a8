"""A reference for the books after the fact, written from issue 21 and the README alone: what each period owes.

It never imports `meterflow`. From the stored events, a subscription's final timeline (plan document, start,
end), the customer's time-zone history and each meter's version history, it walks the customer's billing
periods (README, "Periods and proration" and "Time-zone changes"), cuts them to the subscription, aggregates
each meter's usage from the raw events itself (each transaction of a customer once) with the meter version in
force at the start of the billed part, and prices every period with `pricing_reference` in exact Fractions.

The meters it knows are the simple ones: `COUNT` of an event type, `SUM` of a numeric property, with optional
`filters` {property: value or list of values}. Definitions are meter documents as a user writes them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo

from tests.harness.pricing_reference import reference_price

DAY_MS = 86_400_000
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


# --- calendar arithmetic in a zone ------------------------------------------------------------------------------


def to_ms(t: dt.datetime) -> int:
    """An aware datetime as epoch ms, exactly (integer timedelta arithmetic, no float)."""
    return (t - EPOCH) // dt.timedelta(milliseconds=1)


def local(ms: int, tz: str) -> dt.datetime:
    return (EPOCH + dt.timedelta(milliseconds=ms)).astimezone(ZoneInfo(tz))


def local_midnight(year: int, month: int, tz: str) -> int:
    """The instant of local midnight starting the 1st of the month (zones used here have no DST at midnight)."""
    return to_ms(dt.datetime(year, month, 1, tzinfo=ZoneInfo(tz)))


def calendar_period(ms: int, tz: str, interval: str) -> tuple[int, int]:
    """The local calendar month or year, from one local midnight to the next, holding the instant."""
    t = local(ms, tz)
    if interval == "month":
        start = local_midnight(t.year, t.month, tz)
        end = local_midnight(t.year + (t.month == 12), t.month % 12 + 1, tz)
    elif interval == "year":
        start, end = local_midnight(t.year, 1, tz), local_midnight(t.year + 1, 1, tz)
    else:
        raise ValueError(f"unknown interval {interval!r}")
    assert start <= ms < end, (ms, tz, start, end)
    return start, end


# --- the periods of a customer ----------------------------------------------------------------------------------


def zone_at(history: Sequence[tuple[int, str]], at: int) -> str:
    """The zone of the customer when a period begins at `at`.

    A change made at the very instant a period begins is taken as made during that period (the period "has
    begun"), so it waits for the next boundary; the machine never changes a zone on a boundary, so this choice,
    which the README leaves open, is never exercised. Before the first entry, the first entry's zone."""
    zone = history[0][1]
    for changed_at, tz in sorted(history, key=lambda h: h[0]):
        if changed_at < at:
            zone = tz
    return zone


def periods(history: Sequence[tuple[int, str]], interval: str, lo: int, hi: int) -> list[tuple[int, int]]:
    """The billing periods of a subscription that starts at `lo`, overlapping [lo, hi), each (start, end) whole.

    README: "A subscription's first period is the calendar period holding its start, in the zone in force at
    that instant" (the last zone set at or before it). Each next period begins where the previous one ended;
    when the zone in force at that boundary differs from the zone the previous period ran in, the period runs
    to the end of the new zone's calendar period holding the instant two days later (a whole period);
    otherwise it is the zone's next calendar period."""
    if not history:
        raise ValueError("a customer has at least its first time zone")
    zone = history[0][1]
    for changed_at, tz in sorted(history, key=lambda h: h[0]):
        if changed_at <= lo:
            zone = tz
    start, end = calendar_period(lo, zone, interval)
    out: list[tuple[int, int]] = []
    while start < hi:
        if end > lo:
            out.append((start, end))
        start = end
        new = zone_at(history, start)
        shift = 2 * DAY_MS if new != zone else 0
        zone = new
        end = calendar_period(start + shift, zone, interval)[1]
        assert end > start
    return out


# --- meters and usage -------------------------------------------------------------------------------------------


def meter_in_force(history: Sequence[tuple[int, Mapping[str, Any] | None]], at: int) -> Mapping[str, Any] | None:
    """The version in force at `at`: the latest effective at or before it; before any, the earliest."""
    ordered = sorted(history, key=lambda h: h[0])
    if not ordered:
        raise ValueError("a meter has at least one version")
    found = ordered[0][1]
    for effective_at, doc in ordered:
        if effective_at <= at:
            found = doc
    return found


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def matches(meter: Mapping[str, Any], event: Mapping[str, Any]) -> bool:
    if event["event_type"] != meter["event_type"]:
        return False
    props = event.get("properties") or {}
    for prop, wanted in (meter.get("filters") or {}).items():
        values = wanted if isinstance(wanted, list) else [wanted]
        if prop not in props or _text(props[prop]) not in {_text(v) for v in values}:
            return False
    return True


def once(events: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], Mapping[str, Any]]:
    """Each (customer, transaction) once. A repeat must be a copy: the README does not say which copy wins."""
    out: dict[tuple[str, str], Mapping[str, Any]] = {}
    for e in events:
        key = (e["customer_id"], e["transaction_id"])
        if key in out and out[key] != e:
            raise ValueError(f"transaction {key} stored twice with different contents")
        out.setdefault(key, e)
    return out


def aggregate(meter: Mapping[str, Any], events: Iterable[Mapping[str, Any]], customer: str, lo: int, hi: int) -> Fraction:
    """The meter's value over the customer's events with lo <= timestamp < hi."""
    agg = meter["aggregation"]
    total = Fraction(0)
    for (cust, _), e in once(events).items():
        if cust != customer or not lo <= e["timestamp"] < hi or not matches(meter, e):
            continue
        if agg == "COUNT":
            total += 1
        elif agg == "SUM":
            v = (e.get("properties") or {}).get(meter["property"])
            if v is not None and not isinstance(v, bool) and isinstance(v, int | float | str):
                total += Fraction(str(v))
        else:
            raise ValueError(f"the reference knows COUNT and SUM, not {agg}")
    return total


# --- what a subscription owes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timeline:
    """One subscription as it finally stands."""

    subscription_id: str
    customer_id: str
    plan: Mapping[str, Any]  # the plan document of its plan version
    start: int
    end: int


@dataclass(frozen=True)
class Owed:
    subscription_id: str
    period: tuple[int, int]  # the whole period
    billed: tuple[int, int]  # the part the subscription covers
    usage: dict[str, Fraction]
    priced: dict[str, Any]  # pricing_reference's answer

    @property
    def total(self) -> Fraction:
        total = self.priced["total"]
        assert isinstance(total, Fraction)
        return total


def owed(
    sub: Timeline,
    events: Sequence[Mapping[str, Any]],
    tz_history: Sequence[tuple[int, str]],
    meter_histories: Mapping[str, Sequence[tuple[int, Mapping[str, Any] | None]]],
) -> list[Owed]:
    """Every period of the subscription with what it owes, priced with all the events given."""
    if sub.end <= sub.start:
        return []
    out: list[Owed] = []
    interval = sub.plan.get("interval", "month")
    codes = sorted({c["meter"] for c in sub.plan["charges"] if "meter" in c})
    for start, end in periods(tz_history, interval, sub.start, sub.end):
        lo, hi = max(start, sub.start), min(end, sub.end)
        usage: dict[str, Fraction] = {}
        for code in codes:
            meter = meter_in_force(meter_histories[code], lo)
            if meter is None:
                raise ValueError(f"meter {code} is deleted at {lo}")
            usage[code] = aggregate(meter, events, sub.customer_id, lo, hi)
        doc = {code: {"total": q, "by": {}} for code, q in usage.items()}  # the pricer reads Fractions as given
        priced = reference_price(dict(sub.plan), doc, hi - lo, end - start)
        out.append(Owed(sub.subscription_id, (start, end), (lo, hi), usage, priced))
    return out

