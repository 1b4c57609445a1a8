"""GET /v1/usage: how much a customer used of a meter in [start, end)."""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.errors import ApiError
from meterflow.api.responses import json_response
from meterflow.metering.usage import UsageError, parse_request, run_usage

FILTER_RE = re.compile(r"filter\[(.+)\]")


async def get_usage(request: Request) -> Response:
    state = request.app.state
    params = request.query_params
    filters: dict[str, list[str]] = {}
    for key, value in params.multi_items():
        if m := FILTER_RE.fullmatch(key):
            filters.setdefault(m.group(1), []).append(value)
    try:
        req = await parse_request(params, filters, state.meters, state.settings)
        result = await run_usage(state.storage, req)
    except UsageError as e:
        raise ApiError(400, "invalid_parameter", e.message) from None
    return json_response(result)
