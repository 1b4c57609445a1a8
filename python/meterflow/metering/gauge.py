"""TIME_WEIGHTED_SUM arithmetic: the integral of a gauge's last reported value over time, exactly.

Values are integers of 1e-9 units (as usage queries read them) and instants
epoch milliseconds, so the integral is an exact integer of 1e-9 unit-ms. It
becomes value-hours by one division by 3,600,000, rounded half to even to
9 decimal places (the precision of every usage value), the only rounding.
Before the first reported value the gauge is 0.
"""

from __future__ import annotations

HOUR_MS = 3_600_000
Point = tuple[int, int]  # (instant in ms, value in 1e-9 units), in report order


def integrate(before: int | None, points: list[Point], start: int, end: int) -> int:
    """The integral over [start, end) in 1e-9 unit-ms; `before` is the value in force at `start`
    (the last reported before it, None: none), `points` those reported inside, in order."""
    acc, current, at = 0, before or 0, start
    for t, v in points:
        acc += current * (t - at)
        current, at = v, t
    return acc + current * (end - at)


def value_hours(unit_ms: int) -> int:
    """1e-9 unit-ms as 1e-9 value-hours, rounded half to even."""
    q, r = divmod(unit_ms, HOUR_MS)
    if 2 * r > HOUR_MS or (2 * r == HOUR_MS and q % 2):
        q += 1
    return q
