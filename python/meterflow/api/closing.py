"""/v1/closing/failures: the subscriptions whose periods the last closing passes could not close or settle."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.openapi import PAGE, operation
from meterflow.billing.failures import ClosingFailures
from meterflow.web.pagination import page_params, page_response
from meterflow.web.state import runtime_of


@operation("List closing failures, in subscription id order (retried every pass until they close)",
           {200: "A page of failures", 400: "A parameter is invalid."}, result="Page", params=PAGE)  # fmt: skip
async def list_closing_failures(request: Request) -> Response:
    limit, cursor = page_params(request)
    rows = await ClosingFailures(runtime_of(request).records).list(cursor, limit + 1)
    return page_response(rows, limit, lambda r: str(r["subscription_id"]))
