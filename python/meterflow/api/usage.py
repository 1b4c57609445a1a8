"""GET /v1/usage: how much a customer used of a meter in [start, end)."""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.errors import ApiError
from meterflow.api.responses import json_response
from meterflow.metering.usage import UsageError, parse_request, run_usage
from meterflow.runtime import runtime_of
from meterflow.storage import StorageError

FILTER_RE = re.compile(r"filter\[(.+)\]")


async def get_usage(request: Request) -> Response:
    rt = runtime_of(request)
    params = request.query_params
    filters: dict[str, list[str]] = {}
    for key, value in params.multi_items():
        if m := FILTER_RE.fullmatch(key):
            filters.setdefault(m.group(1), []).append(value)
    try:
        req = await parse_request(params, filters, rt.meters, rt.settings)
        result = await run_usage(rt.storage, req)
    except UsageError as e:
        raise ApiError(400, "invalid_parameter", e.message) from None
    except StorageError as e:
        raise ApiError(503, "storage_unavailable", f"Storage is unavailable: {e}",
                       {"Retry-After": str(rt.settings.retry_after_s)}) from None  # fmt: skip
    return json_response(result)
