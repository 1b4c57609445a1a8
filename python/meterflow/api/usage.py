"""GET /v1/usage: how much a customer used of a meter in [start, end)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.openapi import Param, operation
from meterflow.config import Settings
from meterflow.kernel.errors import FieldError
from meterflow.kernel.params import EPOCH_MS_MAX, EPOCH_MS_MIN, epoch_ms
from meterflow.metering.catalog import MeterCatalog
from meterflow.metering.usage import (
    UsageError,
    UsageOutOfRange,
    UsageQuery,
    UsageRequest,
    query_limits,
    run_usage,
    usage_meter,
    usage_request,
)
from meterflow.metering.windows import WINDOWS
from meterflow.web.errors import answering, too_expensive
from meterflow.web.responses import json_response
from meterflow.web.state import runtime_of
from meterflow.web.views import usage_json

FILTER_RE = re.compile(r"filter\[(.+)\]")


async def parse_request(
    params: Mapping[str, str], filters: Mapping[str, Sequence[str]], catalog: MeterCatalog, settings: Settings
) -> UsageRequest:
    """The usage request of URL parameters (`filters`: the `filter[<property>]` values by property), checked as
    `metering.usage.usage_request` checks it; UsageError names the parameter, the first wrong one in its order."""
    customer = params.get("customer_id") or ""
    code = params.get("meter") or params.get("metric") or ""
    try:
        start, end = epoch_ms(params, "start"), epoch_ms(params, "end")
    except FieldError as e:
        await usage_meter(customer, code, catalog)  # a wrong customer or meter is named before the period
        raise UsageError(e.field, e.message) from None
    group_by = tuple(g for g in (params.get("group_by") or "").split(",") if g)
    query = UsageQuery(customer, code, start, end, group_by, params.get("window") or None, params.get("tz") or "UTC",
                       tuple((prop, tuple(values)) for prop, values in filters.items()))  # fmt: skip
    return await usage_request(query, catalog, settings)


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
    s = rt.settings
    limits = f"{s.usage_max_execution_s} s, {s.usage_max_result_rows} rows, {s.usage_max_query_bytes} bytes of SQL"
    with too_expensive("usage", limits, "ask for a shorter period, fewer windows or groups"),\
            answering({UsageError: "invalid_parameter", UsageOutOfRange: "usage_out_of_range"}):  # fmt: skip
        req = await parse_request(params, filters, rt.meters, rt.settings)
        result = await run_usage(rt.storage, req, query_limits(rt.settings))
    return json_response(usage_json(result))
