"""POST /v1/events: the ingest endpoint."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.auth import check_rate
from meterflow.api.errors import ApiError
from meterflow.api.responses import json_response
from meterflow.auth.keys import Principal
from meterflow.ingest.service import DecodeError, Unavailable
from meterflow.runtime import runtime_of

_DECODE_STATUS = {"too_many_events": 413}


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid_content_length", "Content-Length is not a number.")
        if int(declared) > limit:
            raise ApiError(413, "body_too_large", f"The body is {declared} bytes; the limit is {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"The body is over the limit of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def check_json(request: Request) -> None:
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        shown = ctype or "none"
        raise ApiError(415, "unsupported_media_type", f"Content-Type must be application/json, not {shown}.")


async def post_events(request: Request) -> Response:
    rt = runtime_of(request)
    service, settings = rt.ingest, rt.settings
    check_json(request)
    body = await read_body(request, settings.max_body_bytes)
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
        raise ApiError(503, e.code, e.message, {"Retry-After": str(settings.retry_after_s)}) from None
    service.metrics.inc("meterflow_requests_total", status="200")
    return json_response(result.as_json())
