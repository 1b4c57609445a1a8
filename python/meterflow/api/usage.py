"""GET /v1/usage: how much a customer used of a meter in [start, end)."""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.errors import ApiError
from meterflow.api.responses import json_response
from meterflow.metering.usage import UsageError, UsageOutOfRange, parse_request, query_limits, run_usage
from meterflow.storage import StorageError
from meterflow.storage.base import QueryLimitExceeded

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
        result = await run_usage(state.storage, req, query_limits(state.settings))
    except UsageError as e:
        raise ApiError(400, "invalid_parameter", e.message) from None
    except UsageOutOfRange as e:
        raise ApiError(422, "usage_out_of_range", e.message) from None
    except QueryLimitExceeded:
        s = state.settings
        raise ApiError(
            422, "usage_query_too_expensive",
            f"The usage query went over a limit ({s.usage_max_execution_s} s, {s.usage_max_result_rows} rows, "
            f"{s.usage_max_query_bytes} bytes of SQL); ask for a shorter period, fewer windows or groups.",
        ) from None  # fmt: skip
    except StorageError as e:
        raise ApiError(503, "storage_unavailable", f"Storage is unavailable: {e}",
                       {"Retry-After": str(state.settings.retry_after_s)}) from None  # fmt: skip
    return json_response(result)
