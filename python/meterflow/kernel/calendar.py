"""Calendar arithmetic in an IANA time zone: local dates, days, months and years as epoch milliseconds.

Usage windows (DAY, MONTH) and billing periods (month, year) both start at a
local midnight; this module is the one place that turns local dates into
instants and back. Every zone offset is a whole number of seconds, so the
local date of an instant is that of its whole second.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, available_timezones


@functools.cache
def known_zones() -> frozenset[str]:
    """The zone names both Python and the storage engines know (chdb and ClickHouse 18.16).

    `available_timezones()` already leaves out the `right/` (leap-second) and
    `posix/` trees, which ZoneInfo loads but ClickHouse refuses; `localtime` is
    the host's own zone under a machine-dependent name, and chdb lacks it.
    """
    return frozenset(available_timezones() - {"localtime"})


def time_zone(name: str) -> ZoneInfo | None:
    """The zone called `name`, or None when it is not one every engine can compute windows in."""
    return ZoneInfo(name) if name in known_zones() else None


def local_datetime(tz: ZoneInfo, t_ms: int) -> datetime:
    """The wall-clock time (naive) that the zone shows at an instant, to the second."""
    return datetime.fromtimestamp(t_ms // 1000, tz).replace(tzinfo=None)


def local_midnight_ms(tz: ZoneInfo, year: int, month: int, day: int) -> int:
    """The instant the zone's clock starts the given local date."""
    return int(datetime(year, month, day, tzinfo=tz).timestamp()) * 1000


def day_after(d: datetime) -> datetime:
    """Local midnight of the day after `d` (naive wall time)."""
    n = d + timedelta(days=1)
    return datetime(n.year, n.month, n.day)


def month_after(d: datetime) -> datetime:
    """Local midnight of the first day of the month after `d` (naive wall time)."""
    return datetime(d.year + (d.month == 12), d.month % 12 + 1, 1)


def month_start_ms(tz: ZoneInfo, t_ms: int) -> int:
    """The start of the local calendar month containing an instant."""
    d = local_datetime(tz, t_ms)
    return local_midnight_ms(tz, d.year, d.month, 1)


def next_month_start_ms(tz: ZoneInfo, t_ms: int) -> int:
    """The start of the local calendar month after the one containing an instant."""
    n = month_after(local_datetime(tz, t_ms))
    return local_midnight_ms(tz, n.year, n.month, 1)


def year_start_ms(tz: ZoneInfo, t_ms: int) -> int:
    """The start of the local calendar year containing an instant."""
    return local_midnight_ms(tz, local_datetime(tz, t_ms).year, 1, 1)


def next_year_start_ms(tz: ZoneInfo, t_ms: int) -> int:
    """The start of the local calendar year after the one containing an instant."""
    return local_midnight_ms(tz, local_datetime(tz, t_ms).year + 1, 1, 1)


def parse_time(text: str) -> int:
    """Epoch milliseconds, or an ISO 8601 date/time (UTC unless it says otherwise)."""
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither epoch milliseconds nor an ISO 8601 time") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)

