"""Usage queries: a meter applied to one customer's events over a half-open period.

Every transaction counts once, before ClickHouse merges duplicates too: the
inner query groups by transaction_id. SQL is built only from identifiers
checked against the meter and values escaped by `quote`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from meterflow.config import Settings
from meterflow.customers import ID_RE
from meterflow.errors import FieldError
from meterflow.metering.catalog import MeterCatalog
from meterflow.metering.meters import NUMERIC, Meter
from meterflow.metering.windows import WINDOWS, Window, bucket_sql, count_spans, hour_shift_ms, spans
from meterflow.storage.base import QueryLimits, Storage, quote

GROUP_SEPARATOR = "|"
NINE_PLACES = Decimal("0.000000001")
DAY_MS = 86_400_000


class UsageError(FieldError):
    """A query parameter is wrong; `field` is the parameter."""


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


def _int_param(params: Mapping[str, str], name: str) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        raise UsageError(name, f"`{name}` is required: epoch milliseconds.")
    try:
        return int(raw)
    except ValueError:
        raise UsageError(name, f"`{name}` must be an integer of epoch milliseconds, got {raw!r}.") from None


async def parse_request(
    params: Mapping[str, str], filters: Mapping[str, Sequence[str]], catalog: MeterCatalog, settings: Settings
) -> UsageRequest:
    customer = params.get("customer_id") or ""
    if not ID_RE.fullmatch(customer):
        raise UsageError("customer_id", "`customer_id` is required: 1 to 255 of A-Z, a-z, 0-9, '_' or '-'.")
    code = params.get("meter") or params.get("metric")
    if not code:
        raise UsageError("meter", "`meter` (or its alias `metric`) is required.")
    meter = await catalog.get(code)
    if meter is None:
        raise UsageError("meter", f"There is no meter {code!r}; GET /v1/meters lists them.")
    start, end = _int_param(params, "start"), _int_param(params, "end")
    if end <= start:
        raise UsageError("end", f"`end` ({end}) must be after `start` ({start}); the period is [start, end).")
    max_ms = settings.usage_max_period_days * DAY_MS
    if end - start > max_ms:
        raise UsageError(
            "end", f"The period from `start` to `end` is longer than {settings.usage_max_period_days} days, the limit."
        )
    group_by = tuple(g for g in (params.get("group_by") or "").split(",") if g)
    if len(set(group_by)) != len(group_by) or len(group_by) > len(meter.group_by):
        raise UsageError(
            "group_by", f"`group_by` may name each of meter {code!r}'s {len(meter.group_by)} group-by properties once."
        )
    for g in group_by:
        if g not in meter.group_by:
            allowed = ", ".join(meter.group_by) or "none"
            raise UsageError("group_by", f"`group_by` {g!r} is not a group-by property of meter {code!r} ({allowed}).")
    window_raw = (params.get("window") or "").upper() or None
    if window_raw is not None and window_raw not in WINDOWS:
        raise UsageError("window", f"`window` must be one of {', '.join(WINDOWS)}, got {params.get('window')!r}.")
    tz_name = params.get("tz") or "UTC"
    try:
        tz = ZoneInfo(tz_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise UsageError("tz", f"`tz` {tz_name!r} is not an IANA time zone name.") from None
    if window_raw is not None and count_spans(window_raw, start, end) > settings.usage_max_windows:  # type: ignore[arg-type]
        raise UsageError(
            "window", f"`window={window_raw}` over this period gives more than {settings.usage_max_windows} windows."
        )
    given = sum(len(v) for v in filters.values())
    if given > settings.usage_max_filter_values:
        raise UsageError(
            "filter", f"`filter[...]` gives {given} values; the limit is {settings.usage_max_filter_values} in all."
        )
    extra = []
    for prop, values in filters.items():
        if prop not in meter.group_by:
            raise UsageError(
                f"filter[{prop}]", f"`filter[{prop}]`: {prop!r} is not a group-by property of meter {code!r}."
            )
        extra.append((prop, tuple(values)))
    return UsageRequest(customer, meter, start, end, group_by, window_raw, tz, tuple(extra))  # type: ignore[arg-type]


def _prop_text(p: str, keys: str = "str_keys", values: str = "str_values") -> str:
    """A property's value as text ('' when the event lacks it)."""
    return f"{values}[indexOf({keys}, {quote(p)})]"


def _inner_sql(r: UsageRequest) -> str:
    m = r.meter
    conds = [
        f"customer_id = {quote(r.customer_id)}",
        f"event_type = {quote(m.event_type)}",
        f"timestamp_ms >= {int(r.start)}",
        f"timestamp_ms < {int(r.end)}",
    ]
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
        f"WHERE {' AND '.join(conds)} GROUP BY transaction_id"
    )


def _agg_sql(m: Meter) -> str:
    v = f"nv[indexOf(nk, {quote(m.property or '')})]"
    return {
        "COUNT": "toString(count()) AS v, count() AS c",
        "SUM": f"toString(sum({v})) AS v, count() AS c",
        "MAX": f"toString(max({v})) AS v, count() AS c",
        "MIN": f"toString(min({v})) AS v, count() AS c",
        "AVG": f"toString(sum({v})) AS v, count() AS c",
        "UNIQUE_COUNT": f"toString(uniqExact(sv[indexOf(sk, {quote(m.property or '')})])) AS v, count() AS c",
        "LATEST": f"toString(argMax({v}, (t, id))) AS v, count() AS c",
    }[m.aggregation]


def _value(m: Meter, row: Mapping[str, Any]) -> Decimal:
    count = int(row["c"])
    if count == 0:
        return Decimal(0)
    v = Decimal(str(row["v"]))
    if m.aggregation == "AVG":
        v = (v / count).quantize(NINE_PLACES, rounding=ROUND_HALF_EVEN)
    return v


def query_limits(settings: Settings) -> QueryLimits:
    """What each usage query may cost (MF_USAGE_MAX_*)."""
    return QueryLimits(settings.usage_max_execution_s, settings.usage_max_query_bytes, settings.usage_max_result_rows)


async def run_usage(storage: Storage, r: UsageRequest, limits: QueryLimits) -> dict[str, Any]:
    """The usage answer; values are Decimals (exact), the API writes them as JSON numbers.
    Each query runs under `limits` (QueryLimitExceeded past them)."""
    m = r.meter
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
    out: dict[str, Any] = {
        "customer_id": r.customer_id,
        "meter": m.code,
        "period": {"start": r.start, "end": r.end},
        "value": _value(m, results["total"][0]) if results["total"] else Decimal(0),
        "unit": m.unit,
        "aggregation": m.aggregation,
    }
    if r.filters:
        out["filters"] = {p: list(v) for p, v in r.filters}
    if r.group_by:
        out["group_by"] = list(r.group_by)
        out["breakdown"] = {
            GROUP_SEPARATOR.join(str(row[f"g{i}"]) for i in range(len(r.group_by))): _value(m, row)
            for row in sorted(results["breakdown"], key=lambda x: [str(x[f"g{i}"]) for i in range(len(r.group_by))])
        }
    if r.window:
        by_key = {int(row["b"]): _value(m, row) for row in results["series"]}
        out["window"] = r.window
        out["tz"] = r.tz.key
        out["series"] = [
            {"start": s.start, "end": s.end, "value": by_key.get(s.key, Decimal(0))}
            for s in spans(r.window, r.tz, shift, r.start, r.end)
        ]
    return out

