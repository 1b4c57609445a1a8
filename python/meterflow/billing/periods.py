"""Billing periods: calendar months or years in the customer's time zone, and the parts a subscription bills.

A period is half-open, [start, end) in epoch milliseconds, from one local
midnight to another (the calendar arithmetic is `kernel.calendar`, shared
with usage windows). A subscription that starts, ends or changes plan inside a
period bills only the part it covers: a `ServicePeriod`, whose share of the
period's milliseconds prorates flat charges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from meterflow.billing.plans import Interval
from meterflow.kernel.calendar import month_start_ms, next_month_start_ms, next_year_start_ms, year_start_ms


@dataclass(frozen=True)
class Period:
    """One calendar month or year: [start, end) in epoch milliseconds."""

    start: int
    end: int


@dataclass(frozen=True)
class ServicePeriod:
    """The part [start, end) of `period` that is billed; all of it unless cut by a start, end or plan change."""

    period: Period
    start: int
    end: int

    @property
    def served_ms(self) -> int:
        return self.end - self.start

    @property
    def period_ms(self) -> int:
        return self.period.end - self.period.start

    @property
    def is_cut(self) -> bool:
        return (self.start, self.end) != (self.period.start, self.period.end)


def period_containing(interval: Interval, tz: ZoneInfo, at: int) -> Period:
    """The calendar month or year (local to `tz`) that contains the instant `at`."""
    if interval == "month":
        return Period(month_start_ms(tz, at), next_month_start_ms(tz, at))
    return Period(year_start_ms(tz, at), next_year_start_ms(tz, at))


def periods_between(interval: Interval, tz: ZoneInfo, start: int, end: int) -> list[Period]:
    """Every calendar period that meets [start, end), in order (none if the range is empty)."""
    out: list[Period] = []
    t = start
    while t < end:
        p = period_containing(interval, tz, t)
        out.append(p)
        t = p.end
    return out


def cut(period: Period, start: int, end: int | None) -> ServicePeriod | None:
    """The part of `period` inside [start, end) (end None: open), or None if they do not meet."""
    s = max(period.start, start)
    e = period.end if end is None else min(period.end, end)
    return ServicePeriod(period, s, e) if s < e else None


def service_periods(interval: Interval, tz: ZoneInfo, start: int, end: int | None, through: int) -> list[ServicePeriod]:
    """The billed parts of a subscription active over [start, end), from its first period to the one holding `through`.

    `end` is the cancellation or plan change (None while active); periods
    after `through` (usually now) are not listed. A period the subscription
    covers only partly is cut to the part it covers.
    """
    last = through if end is None else min(through, end - 1)
    out: list[ServicePeriod] = []
    for p in periods_between(interval, tz, start, last + 1):
        part = cut(p, start, end)
        if part is not None:
            out.append(part)
    return out


# Time offsets differ by at most 26 hours, so two days after a boundary is inside the new
# zone's period that follows it.
SETTLE_IN_MS = 2 * 86_400_000

Zones = Sequence[tuple[int, ZoneInfo]]  # [(changed_at, zone)] oldest first; the first in force since ever


def zone_at(zones: Zones, t: int) -> ZoneInfo:
    """The zone in force at instant `t`: the last one set at or before it (the first one before any)."""
    found = zones[0][1]
    for at, z in zones:
        if at > t:
            break
        found = z
    return found


def subscription_periods(interval: Interval, zones: Zones, start: int, end: int) -> list[Period]:
    """The billing periods of a subscription that starts at `start`, in order, every one that meets [start, end).

    The first is the calendar period holding `start` in the zone in force then. A period that has
    begun keeps its bounds: a zone set later takes effect at the next boundary, where a period runs
    to the end of the new zone's period holding the instant two days later (a whole period, not a
    cut one); from there on periods are the new zone's calendar periods.
    """
    out: list[Period] = []
    zone = zone_at(zones, start)
    p = period_containing(interval, zone, start)
    while p.start < end:
        out.append(p)
        t = p.end
        new = zone_at(zones, t)
        if new.key != zone.key:
            p = Period(t, period_containing(interval, new, t + SETTLE_IN_MS).end)
            zone = new
        else:
            p = period_containing(interval, zone, t)
    return out
