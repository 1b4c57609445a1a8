"""POST /v1/events: the ingest endpoint."""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.auth import check_rate
from meterflow.api.errors import ApiError
from meterflow.api.openapi import operation
from meterflow.api.responses import check_json, json_response, read_body
from meterflow.auth.keys import Principal
from meterflow.ingest.service import DecodeError, Unavailable
from meterflow.runtime import runtime_of

_DECODE_STATUS = {"too_many_events": 413}
_BACKEND_DOWN = {"storage_unavailable": "Storage", "dedup_unavailable": "The dedup store"}
log = logging.getLogger("meterflow.api")


@operation("Ingest a batch of usage events, idempotent per transaction", {
    200: "Per-event problems are listed in `failed` and never fail the whole batch.",
    503: "Storage or dedup is down, or the flush queue or the archive spool is full."}, body="Batch",
    result="IngestResult")  # fmt: skip
async def post_events(request: Request) -> Response:
    rt = runtime_of(request)
    service, settings = rt.ingest, rt.settings
    check_json(request)
    body = await read_body(request, settings.max_body_bytes, settings.http_body_timeout_s)
    principal: Principal = request.state.principal

    async def admit(events: int) -> None:
        # After decoding, before any reservation: a refused batch leaves no trace.
        await check_rate(rt.limiter, settings, principal, "events", events)

    try:
        result = await service.ingest(body, principal.customer_id, admit)
    except DecodeError as e:
        code, message = e.args
        service.metrics.inc("meterflow_requests_total", status=str(_DECODE_STATUS.get(code, 400)))
        raise ApiError(_DECODE_STATUS.get(code, 400), code, message) from None
    except Unavailable as e:
        service.metrics.inc("meterflow_requests_total", status="503")
        message = e.message
        if e.code in _BACKEND_DOWN:  # the backend's own text (hosts, SQL) goes to the log only
            log.warning("ingest refused: backend unavailable", extra={"error": e.message[:500]})
            message = f"{_BACKEND_DOWN[e.code]} is unavailable; retry after {settings.retry_after_s} s."
        raise ApiError(503, e.code, message, {"Retry-After": str(settings.retry_after_s)}) from None
    service.metrics.inc("meterflow_requests_total", status="200")
    return json_response(result.as_json())
