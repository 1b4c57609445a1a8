"""Usage queries: a meter applied to one customer's events over a half-open period.

Every transaction counts once, before ClickHouse merges duplicates too: the
inner query groups by transaction_id. SQL is built only from identifiers
checked against the meter and values escaped by `quote`.

Values are exact or an error. A Decimal128(9) sum wraps silently past about
1.7e29, so sums are split per row into an integer part (summed as
Decimal128(0), room for 1.7e38) and a fraction (under 1 each); every number
leaves the engine as text of at most 19 integer digits, because ClickHouse
18.16's `toString` garbles wider Decimal128 values. Python joins the parts
as integers of 1e-9 units and refuses values of 1e29 or more (README).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from meterflow.config import Settings
from meterflow.kernel.calendar import time_zone
from meterflow.kernel.clock import DAY_MS
from meterflow.kernel.errors import FieldError
from meterflow.kernel.ids import ID_RE, ID_RULE
from meterflow.metering.catalog import MeterCatalog
from meterflow.metering.gauge import Point, integrate, value_hours
from meterflow.metering.meters import NUMERIC, Meter
from meterflow.metering.windows import WINDOWS, Window, bucket_sql, count_spans, hour_shift_ms, spans
from meterflow.storage.base import QueryLimits, Storage, quote

GROUP_SEPARATOR = "|"
# Usage values are exact and smaller than 1e29 in magnitude: the 38 digits of
# Decimal128(9). Values are handled as integers of 1e-9 units (`raw`).
USAGE_LIMIT = 10**29
_RAW_LIMIT = USAGE_LIMIT * 10**9
# Integer parts are summed in an Int128 (Decimal128(0)): a sum is exact while
# count x the largest magnitude stays under 1e38 (2^127 is about 1.7e38).
_EXACT_SUM_BOUND = 1e38
_SPLIT = 10**19
_BY_SPLIT = "toDecimal128('0.0000000000000000001', 19)"  # 1e-19


class UsageError(FieldError):
    """A query parameter is wrong; `field` is the parameter."""


class UsageOutOfRange(Exception):
    """A usage value is 1e29 or more in magnitude, or cannot be summed exactly."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class UsageRequest:
    customer_id: str
    meter: Meter
    start: int
    end: int
    group_by: tuple[str, ...] = ()
    window: Window | None = None
    tz: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    filters: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class UsageQuery:
    """A usage question as asked, in typed values: the meter by its code, the time zone by its name, the window
    in any case. `usage_request` checks it against the meter catalog and the limits; the API reads it from
    URL parameters (`api.usage.parse_request`), the dashboard builds it from its own choices."""

    customer_id: str
    meter: str
    start: int
    end: int
    group_by: tuple[str, ...] = ()
    window: str | None = None  # MINUTE, HOUR, DAY or MONTH
    tz: str = "UTC"
    filters: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (group-by property, the values it may have)


async def usage_meter(customer_id: str, code: str, catalog: MeterCatalog) -> Meter:
    """The meter asked for, after the customer id's rule (UsageError names the field)."""
    if not ID_RE.fullmatch(customer_id):
        raise UsageError("customer_id", f"`customer_id` is required: {ID_RULE}.")
    if not code:
        raise UsageError("meter", "`meter` (or its alias `metric`) is required.")
    meter = await catalog.get(code)
    if meter is None:
        raise UsageError("meter", f"There is no meter {code!r}; GET /v1/meters lists them.")
    return meter


async def usage_request(q: UsageQuery, catalog: MeterCatalog, settings: Settings) -> UsageRequest:
    """The request to run for `q`, every value checked in this order (UsageError names the field): customer,
    meter, period, group_by, window, tz, the number of windows, filters."""
    code, start, end = q.meter, q.start, q.end
    meter = await usage_meter(q.customer_id, code, catalog)
    if end <= start:
        raise UsageError("end", f"`end` ({end}) must be after `start` ({start}); the period is [start, end).")
    max_ms = settings.usage_max_period_days * DAY_MS
    if end - start > max_ms:
        raise UsageError(
            "end", f"The period from `start` to `end` is longer than {settings.usage_max_period_days} days, the limit."
        )
    group_by = q.group_by
    if len(set(group_by)) != len(group_by) or len(group_by) > len(meter.group_by):
        raise UsageError(
            "group_by", f"`group_by` may name each of meter {code!r}'s {len(meter.group_by)} group-by properties once."
        )
    for g in group_by:
        if g not in meter.group_by:
            allowed = ", ".join(meter.group_by) or "none"
            raise UsageError("group_by", f"`group_by` {g!r} is not a group-by property of meter {code!r} ({allowed}).")
    window = q.window.upper() if q.window else None
    if window is not None and window not in WINDOWS:
        raise UsageError("window", f"`window` must be one of {', '.join(WINDOWS)}, got {q.window!r}.")
    tz = time_zone(q.tz)
    if tz is None:
        raise UsageError("tz", f"`tz` {q.tz[:100]!r} is not an IANA time zone name such as Europe/Paris.")
    if window is not None and count_spans(window, start, end) > settings.usage_max_windows:  # type: ignore[arg-type]
        raise UsageError(
            "window", f"`window={window}` over this period gives more than {settings.usage_max_windows} windows."
        )
    given = sum(len(v) for _, v in q.filters)
    if given > settings.usage_max_filter_values:
        raise UsageError(
            "filter", f"`filter[...]` gives {given} values; the limit is {settings.usage_max_filter_values} in all."
        )
    for prop, values in q.filters:
        if prop not in meter.group_by:
            raise UsageError(
                f"filter[{prop}]", f"`filter[{prop}]`: {prop!r} is not a group-by property of meter {code!r}."
            )
        if len(set(values)) != len(values):
            repeated = next(v for v in values if values.count(v) > 1)
            raise UsageError(f"filter[{prop}]", f"`filter[{prop}]` gives {repeated[:100]!r} more than once.")
    return UsageRequest(q.customer_id, meter, start, end, group_by, window, tz, q.filters)  # type: ignore[arg-type]


def _prop_text(p: str, keys: str = "str_keys", values: str = "str_values") -> str:
    """A property's value as text ('' when the event lacks it)."""
    return f"{values}[indexOf({keys}, {quote(p)})]"


def _inner_sql(r: UsageRequest, start: int | None = None, end: int | None = None) -> str:
    """One row per transaction of the request's events in [start, end) (default: the request's period;
    start None with end given: every event before end)."""
    m = r.meter
    lo, hi = (r.start, r.end) if start is None and end is None else (start, end)
    conds = [f"customer_id = {quote(r.customer_id)}", f"event_type = {quote(m.event_type)}"]
    if lo is not None:
        conds.append(f"timestamp_ms >= {int(lo)}")
    if hi is not None:
        conds.append(f"timestamp_ms < {int(hi)}")
    for prop, values in (*m.filters.items(), *r.filters):
        conds.append(f"has(str_keys, {quote(prop)})")
        conds.append(f"{_prop_text(prop)} IN ({', '.join(quote(v) for v in values)})")
    if m.aggregation in NUMERIC:
        conds.append(f"has(num_keys, {quote(m.property or '')})")
    elif m.aggregation == "UNIQUE_COUNT":
        conds.append(f"has(str_keys, {quote(m.property or '')})")
    return (
        "SELECT transaction_id AS id, any(timestamp_ms) AS t, any(num_keys) AS nk, any(num_values) AS nv, "
        "any(str_keys) AS sk, any(str_values) AS sv FROM events "
        f"WHERE {' AND '.join(conds)} GROUP BY customer_id, transaction_id"
    )


def _text19(x: str, name: str) -> str:
    """`x` (a Decimal128 under 1e38) as two texts of at most 19 integer digits:
    `name_h` = trunc(x / 1e19) and `name_l` = the rest. Multiplying by 1e-19,
    a Decimal128 whose raw integer is 1, only moves the point: no overflow."""
    hi = f"toDecimal128(({x}) * {_BY_SPLIT}, 0)"
    return f"toString({hi}) AS {name}_h, toString(({x}) - {hi} * toDecimal128('{_SPLIT}', 0)) AS {name}_l"


def _agg_sql(m: Meter) -> str:
    v = f"nv[indexOf(nk, {quote(m.property or '')})]"
    whole = f"toDecimal128({v}, 0)"  # truncated toward zero
    if m.aggregation in ("SUM", "AVG"):
        return (
            f"{_text19(f'sum({whole})', 's')}, toString(sum({v} - {whole})) AS f, "
            f"max(abs(toFloat64({v}))) AS m, count() AS c"
        )
    if m.aggregation in ("MAX", "MIN", "LATEST"):
        x = {"MAX": f"max({v})", "MIN": f"min({v})", "LATEST": f"argMax({v}, (t, id))"}[m.aggregation]
        return f"{_text19(x, 'v')}, count() AS c"
    if m.aggregation == "UNIQUE_COUNT":
        return f"toString(uniqExact(sv[indexOf(sk, {quote(m.property or '')})])) AS v, count() AS c"
    return "toString(count()) AS v, count() AS c"


def _raw(text: str) -> int:
    """Decimal text from the engine as an exact integer of 1e-9 units."""
    digits = text.removeprefix("-")
    whole, _, frac = digits.partition(".")
    if not (whole.isascii() and whole.isdigit() and len(frac) <= 9 and (frac == "" or frac.isdigit())):
        raise ValueError(f"not a Decimal128(9) text: {text!r}")
    raw = int(whole) * 10**9 + int(frac.ljust(9, "0"))
    return -raw if text.startswith("-") else raw


def _joined(row: Mapping[str, Any], name: str) -> int:
    return _raw(str(row[f"{name}_h"])) * _SPLIT + _raw(str(row[f"{name}_l"]))


def _decimal(raw: int) -> Decimal:
    return Decimal(f"{raw}E-9")  # exact: the constructor never rounds


def _value(m: Meter, row: Mapping[str, Any], cell: str) -> Decimal:
    """One usage value, exact; `cell` names it in an out-of-range error."""
    count = int(row["c"])
    if count == 0:
        return Decimal(0)
    if m.aggregation in ("COUNT", "UNIQUE_COUNT"):
        return Decimal(int(row["v"]))
    what = f"`{cell}` ({m.aggregation} of meter {m.code!r})"
    if m.aggregation in ("SUM", "AVG"):
        if count * float(row["m"]) >= _EXACT_SUM_BOUND:
            raise UsageOutOfRange(
                f"{what} cannot be computed exactly: {count} values up to {float(row['m']):.3g} in magnitude "
                "exceed the 1e38 bound of an exact sum; narrow the period or filter."
            )
        raw = _joined(row, "s") + _raw(str(row["f"]))
        if m.aggregation == "AVG":
            q, r = divmod(raw, count)  # the exact mean, rounded half to even to 9 places
            raw = q + (1 if 2 * r > count or (2 * r == count and q % 2) else 0)
    else:
        raw = _joined(row, "v")
    if abs(raw) >= _RAW_LIMIT:
        raise UsageOutOfRange(f"{what} is {_decimal(raw):.3e}; usage values must be smaller than 1e29 in magnitude.")
    return _decimal(raw)


def query_limits(settings: Settings) -> QueryLimits:
    """What each usage query may cost (MF_USAGE_MAX_*)."""
    return QueryLimits(settings.usage_max_execution_s, settings.usage_max_query_bytes, settings.usage_max_result_rows)


@dataclass(frozen=True)
class WindowValue:
    """One window of a series: [start, end) and the meter's value inside it."""

    start: int
    end: int
    value: Decimal


@dataclass(frozen=True)
class Usage:
    """A usage answer, typed: exact Decimals; breakdown keys are tuples of the `group_by` values, in order."""

    request: UsageRequest
    value: Decimal
    breakdown: dict[tuple[str, ...], Decimal] | None = None  # sorted by key; None without group_by
    series: tuple[WindowValue, ...] | None = None  # None without a window


async def run_usage(storage: Storage, r: UsageRequest, limits: QueryLimits) -> Usage:
    """The usage of `r`, exact. Each query runs under `limits` (QueryLimitExceeded past them)."""
    m = r.meter
    if m.aggregation == "TIME_WEIGHTED_SUM":
        return await time_weighted(storage, r, limits)
    inner = _inner_sql(r)
    aggs = _agg_sql(m)
    jobs: dict[str, Any] = {"total": storage.query(f"SELECT {aggs} FROM ({inner})", limits)}
    if r.group_by:
        keys = ", ".join(f"{_prop_text(g, 'sk', 'sv')} AS g{i}" for i, g in enumerate(r.group_by))
        names = ", ".join(f"g{i}" for i in range(len(r.group_by)))
        jobs["breakdown"] = storage.query(f"SELECT {keys}, {aggs} FROM ({inner}) GROUP BY {names}", limits)
    shift = hour_shift_ms(r.tz, r.start)
    if r.window:
        b = bucket_sql(r.window, r.tz, shift)
        jobs["series"] = storage.query(f"SELECT {b} AS b, {aggs} FROM ({inner}) GROUP BY b", limits)
    results = dict(zip(jobs, await asyncio.gather(*jobs.values()), strict=True))
    value = _value(m, results["total"][0], "value") if results["total"] else Decimal(0)
    breakdown: dict[tuple[str, ...], Decimal] | None = None
    if r.group_by:
        n = len(r.group_by)
        keyed = sorted(
            ((tuple(str(row[f"g{i}"]) for i in range(n)), row) for row in results["breakdown"]), key=lambda kr: kr[0]
        )
        breakdown = {k: _value(m, row, f"breakdown[{GROUP_SEPARATOR.join(k)!r}]") for k, row in keyed}
    series: tuple[WindowValue, ...] | None = None
    if r.window:
        by_key = {int(row["b"]): row for row in results["series"]}
        series = tuple(
            WindowValue(s.start, s.end, _value(m, by_key[s.key], f"series[{i}]") if s.key in by_key else Decimal(0))
            for i, s in enumerate(spans(r.window, r.tz, shift, r.start, r.end))
        )
    return Usage(r, value, breakdown, series)


async def time_weighted(storage: Storage, r: UsageRequest, limits: QueryLimits) -> Usage:
    """TIME_WEIGHTED_SUM: the reported points in the period and the last one before it, per group,
    integrated in Python (`metering.gauge`)."""
    m = r.meter
    v = f"nv[indexOf(nk, {quote(m.property or '')})]"
    keys = "".join(f"{_prop_text(g, 'sk', 'sv')} AS g{i}, " for i, g in enumerate(r.group_by))
    names = ", ".join(f"g{i}" for i in range(len(r.group_by)))
    points_sql = f"SELECT {keys}t, {_text19(v, 'v')} FROM ({_inner_sql(r)}) ORDER BY t, id"
    carry = f"{_text19(f'argMax({v}, (t, id))', 'v')}, count() AS c"
    jobs = [
        storage.query(points_sql, limits),
        storage.query(f"SELECT {carry} FROM ({_inner_sql(r, None, r.start)})", limits),
    ]
    if r.group_by:
        jobs.append(storage.query(f"SELECT {keys}{carry} FROM ({_inner_sql(r, None, r.start)}) GROUP BY {names}",
                                  limits))  # fmt: skip
    rows, total_carry, *grouped = await asyncio.gather(*jobs)
    n = len(r.group_by)

    def key(row: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple(str(row[f"g{i}"]) for i in range(n))

    def first(rows: Sequence[Mapping[str, Any]]) -> int | None:
        return _joined(rows[0], "v") if rows and int(rows[0]["c"]) else None

    points: list[Point] = [(int(row["t"]), _joined(row, "v")) for row in rows]

    def check(raw: int, cell: str) -> Decimal:
        if abs(raw) >= _RAW_LIMIT:
            raise UsageOutOfRange(f"`{cell}` (TIME_WEIGHTED_SUM of meter {m.code!r}) is {_decimal(raw):.3e}; "
                                  "usage values must be smaller than 1e29 in magnitude.")  # fmt: skip
        return _decimal(raw)

    value = check(value_hours(integrate(first(total_carry), points, r.start, r.end)), "value")
    breakdown: dict[tuple[str, ...], Decimal] | None = None
    if r.group_by:
        carried = {key(row): _joined(row, "v") for row in grouped[0] if int(row["c"])}
        by_group: dict[tuple[str, ...], list[Point]] = {}
        for row in rows:
            by_group.setdefault(key(row), []).append((int(row["t"]), _joined(row, "v")))
        breakdown = {
            k: check(value_hours(integrate(carried.get(k), by_group.get(k, []), r.start, r.end)),
                     f"breakdown[{GROUP_SEPARATOR.join(k)!r}]")
            for k in sorted(set(carried) | set(by_group))
        }  # fmt: skip
    series: tuple[WindowValue, ...] | None = None
    if r.window:
        out: list[WindowValue] = []
        before, i = first(total_carry), 0
        for j, s in enumerate(spans(r.window, r.tz, hour_shift_ms(r.tz, r.start), r.start, r.end)):
            k = i
            while k < len(points) and points[k][0] < s.end:
                k += 1
            out.append(WindowValue(s.start, s.end, check(value_hours(integrate(before, points[i:k], s.start, s.end)),
                                                         f"series[{j}]")))  # fmt: skip
            if k > i:
                before = points[k - 1][1]
            i = k
        series = tuple(out)
    return Usage(r, value, breakdown, series)
