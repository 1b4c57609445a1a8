"""GET /v1/usage: how much a customer used of a meter in [start, end)."""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.errors import ApiError
from meterflow.api.openapi import Param, operation
from meterflow.api.responses import json_response
from meterflow.metering.usage import (
    GROUP_SEPARATOR,
    Usage,
    UsageError,
    UsageOutOfRange,
    parse_request,
    query_limits,
    run_usage,
)
from meterflow.metering.windows import WINDOWS
from meterflow.params import EPOCH_MS_MAX, EPOCH_MS_MIN
from meterflow.runtime import runtime_of
from meterflow.storage.base import QueryLimitExceeded

FILTER_RE = re.compile(r"filter\[(.+)\]")


def usage_json(u: Usage) -> dict[str, Any]:
    """The JSON shape of a usage answer: values as exact numbers, breakdown keys joined by `|`."""
    r = u.request
    out: dict[str, Any] = {
        "customer_id": r.customer_id,
        "meter": r.meter.code,
        "period": {"start": r.start, "end": r.end},
        "value": u.value,
        "unit": r.meter.unit,
        "aggregation": r.meter.aggregation,
    }
    if r.filters:
        out["filters"] = {p: list(v) for p, v in r.filters}
    if u.breakdown is not None:
        out["group_by"] = list(r.group_by)
        out["breakdown"] = {GROUP_SEPARATOR.join(k): v for k, v in u.breakdown.items()}
    if u.series is not None:
        out["window"] = r.window
        out["tz"] = r.tz.key
        out["series"] = [{"start": w.start, "end": w.end, "value": w.value} for w in u.series]
    return out


EPOCH = {"type": "integer", "minimum": EPOCH_MS_MIN, "maximum": EPOCH_MS_MAX}


@operation("Usage of one meter by one customer in [start, end)", {
    200: "The usage", 400: "A parameter is invalid; the message names it.",
    422: "The value is outside the exact range (`usage_out_of_range`), or the query went over a time, size or row "
         "limit (`usage_query_too_expensive`)."}, result="Usage", params=(
    Param("customer_id", "The customer.", required=True),
    Param("meter", "The meter's code (alias: `metric`).", required=True),
    Param("start", "Period start, epoch milliseconds, inclusive.", required=True, schema=EPOCH),
    Param("end", "Period end, epoch milliseconds, exclusive.", required=True, schema=EPOCH),
    Param("group_by", "Comma-separated group-by properties of the meter."),
    Param("window", "MINUTE, HOUR, DAY or MONTH: a series of windows.", schema={"enum": list(WINDOWS)}),
    Param("tz", "IANA time zone of the windows (default UTC)."),
    Param("filter[<property>]", "Only events whose group-by property has this value (repeatable)."),
))  # fmt: skip
async def get_usage(request: Request) -> Response:
    rt = runtime_of(request)
    params = request.query_params
    filters: dict[str, list[str]] = {}
    for key, value in params.multi_items():
        if m := FILTER_RE.fullmatch(key):
            filters.setdefault(m.group(1), []).append(value)
    try:
        req = await parse_request(params, filters, rt.meters, rt.settings)
        result = await run_usage(rt.storage, req, query_limits(rt.settings))
    except UsageError as e:
        raise ApiError(400, "invalid_parameter", e.message) from None
    except UsageOutOfRange as e:
        raise ApiError(422, "usage_out_of_range", e.message) from None
    except QueryLimitExceeded:
        s = rt.settings
        raise ApiError(
            422, "usage_query_too_expensive",
            f"The usage query went over a limit ({s.usage_max_execution_s} s, {s.usage_max_result_rows} rows, "
            f"{s.usage_max_query_bytes} bytes of SQL); ask for a shorter period, fewer windows or groups.",
        ) from None  # fmt: skip
    return json_response(usage_json(result))
