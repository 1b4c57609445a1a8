"""Time windows aligned in a time zone, and the SQL that puts an event in one.

MINUTE and HOUR windows are fixed lengths of UTC time shifted by the zone's
offset within the hour (so a DST fall-back hour is two windows, as the clock
shows it twice); DAY and MONTH windows are the zone's local dates and months.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from meterflow.kernel.calendar import day_after, local_datetime, local_midnight_ms, month_after
from meterflow.storage.base import quote

Window = Literal["MINUTE", "HOUR", "DAY", "MONTH"]
WINDOWS = ("MINUTE", "HOUR", "DAY", "MONTH")
MINUTE_MS = 60_000
HOUR_MS = 3_600_000


@dataclass(frozen=True)
class Span:
    key: int  # what `bucket_sql` yields for events in this window
    start: int
    end: int


def hour_shift_ms(tz: ZoneInfo, at_ms: int) -> int:
    """The zone's UTC offset modulo one hour (e.g. 30 minutes for Asia/Kolkata)."""
    offset = datetime.fromtimestamp(at_ms / 1000, tz).utcoffset() or timedelta(0)
    return int(offset.total_seconds() * 1000) % HOUR_MS


def bucket_sql(window: Window, tz: ZoneInfo, shift_ms: int, t: str = "t") -> str:
    if window == "MINUTE":
        return f"intDiv({t}, {MINUTE_MS}) * {MINUTE_MS}"
    if window == "HOUR":
        return f"intDiv({t} - {shift_ms}, {HOUR_MS}) * {HOUR_MS} + {shift_ms}"
    fn = "toYYYYMMDD" if window == "DAY" else "toYYYYMM"
    return f"{fn}(toDateTime(intDiv({t}, 1000)), {quote(tz.key)})"


def event_key(window: Window, tz: ZoneInfo, shift_ms: int, t: int) -> int:
    """The window key of an instant, as `bucket_sql` computes it."""
    if window == "MINUTE":
        return t // MINUTE_MS * MINUTE_MS
    if window == "HOUR":
        return (t - shift_ms) // HOUR_MS * HOUR_MS + shift_ms
    d = local_datetime(tz, t)
    return d.year * 10000 + d.month * 100 + d.day if window == "DAY" else d.year * 100 + d.month


def spans(window: Window, tz: ZoneInfo, shift_ms: int, start: int, end: int) -> list[Span]:
    """Every window meeting [start, end), clipped to it, in order."""
    out: list[Span] = []
    t = start
    while t < end:
        key = event_key(window, tz, shift_ms, t)
        if window in ("MINUTE", "HOUR"):
            w_end = key + (MINUTE_MS if window == "MINUTE" else HOUR_MS)
        else:
            d = local_datetime(tz, t)
            nxt = day_after(d) if window == "DAY" else month_after(d)
            w_end = local_midnight_ms(tz, nxt.year, nxt.month, nxt.day)
        w_end = max(w_end, t + 1)
        out.append(Span(key=key, start=t, end=min(w_end, end)))
        t = w_end
    return out


def count_spans(window: Window, start: int, end: int) -> int:
    """An upper bound on the number of windows, cheap, to refuse huge series early."""
    size = {"MINUTE": MINUTE_MS, "HOUR": HOUR_MS, "DAY": 23 * HOUR_MS, "MONTH": 28 * 24 * HOUR_MS}[window]
    return (end - start) // size + 2
