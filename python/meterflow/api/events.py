"""/v1/events: ingest a batch (POST), the stored events newest first (GET); /v1/events/lag: the async backlog."""

from __future__ import annotations

import logging
import time

import orjson
from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.auth import check_rate
from meterflow.api.errors import ApiError
from meterflow.api.openapi import Param, operation
from meterflow.api.responses import check_json, json_response, read_body
from meterflow.auth.keys import Principal
from meterflow.ingest.dedup import DedupUnavailable
from meterflow.ingest.service import DecodeError, Unavailable
from meterflow.ingest.stream import Lag
from meterflow.metering.events import EVENTS_PAGE_MAX, EventsError, OtherCustomer, list_events, parse_query
from meterflow.metering.usage import query_limits
from meterflow.params import EPOCH_MS_MAX, EPOCH_MS_MIN
from meterflow.runtime import runtime_of
from meterflow.storage.base import QueryLimitExceeded

_DECODE_STATUS = {"too_many_events": 413}
_BACKEND_DOWN = {"storage_unavailable": "Storage", "dedup_unavailable": "The dedup store"}
log = logging.getLogger("meterflow.api")


@operation("Ingest a batch of usage events, idempotent per transaction", {
    200: "Stored. Per-event problems are listed in `failed` and never fail the whole batch.",
    202: "Async mode (`MF_INGEST_MODE=async`): the accepted events are durably queued for the workers; "
         "the body is the same as 200's.",
    503: "Storage or dedup is down, or the flush queue, the event stream or the archive spool is full."}, body="Batch",
    result="IngestResult")  # fmt: skip
async def post_events(request: Request) -> Response:
    rt = runtime_of(request)
    service, settings = rt.ingest, rt.settings
    check_json(request)
    body = await read_body(request, settings.max_body_bytes, settings.http_body_timeout_s)
    principal: Principal = request.state.principal
    try:
        batch = await service.decode(body, principal.customer_id)
        # After decoding, before any reservation: a refused batch leaves no trace.
        t0 = time.perf_counter()
        await check_rate(rt.limiter, settings, principal, "events", batch.received)
        service.metrics.stage("rate_check", time.perf_counter() - t0)
        result = await service.accept(batch)
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
    # Async mode: accepted means durably queued, not yet stored.
    status = 202 if service.stream is not None else 200
    service.metrics.inc("meterflow_requests_total", status=str(status))
    return json_response(result.as_json(), status)


@operation("The async mode's backlog: stream length, oldest pending age, dead letters, per-worker throughput", {
    200: "The backlog (all zero in sync mode, which queues nothing).",
    503: "Redis is unavailable."})  # fmt: skip
async def events_lag(request: Request) -> Response:
    rt = runtime_of(request)
    stream = rt.ingest.stream
    if stream is None:
        return json_response({"mode": "sync", **Lag(0, 0, 0, {}).as_json()})
    try:
        lag = await stream.lag()
    except DedupUnavailable as e:
        log.warning("lag unavailable", extra={"error": str(e)[:500]})
        raise ApiError(503, "dedup_unavailable", f"Redis is unavailable; retry after {rt.settings.retry_after_s} s.",
                       {"Retry-After": str(rt.settings.retry_after_s)}) from None  # fmt: skip
    return json_response({"mode": "async", **lag.as_json()})


EPOCH = {"type": "integer", "minimum": EPOCH_MS_MIN, "maximum": EPOCH_MS_MAX}


@operation("The stored events, newest first, a page at a time", {
    200: "A page of events (`properties` as sent, exact numbers)", 400: "A parameter is invalid; the message names it.",
    403: "The key lacks the scope this route needs, or is bound to another customer.",
    422: "The query went over a time, size or row limit (`events_query_too_expensive`)."}, result="Page", params=(
    Param("customer_id", "Only this customer's events (a key bound to a customer sees its own only)."),
    Param("event_type", "Only events of this type."),
    Param("start", "Only events at or after this time, epoch milliseconds.", schema=EPOCH),
    Param("end", "Only events before this time, epoch milliseconds.", schema=EPOCH),
    Param("limit", f"Page size, 1 to {EVENTS_PAGE_MAX} (default 100).",
          schema={"type": "integer", "minimum": 1, "maximum": EVENTS_PAGE_MAX}),
    Param("cursor", "The `next_cursor` of the previous page."),
))  # fmt: skip
async def get_events(request: Request) -> Response:
    rt = runtime_of(request)
    principal: Principal = request.state.principal
    try:
        query = parse_query(request.query_params, principal.customer_id)
        page = await list_events(rt.storage, query, query_limits(rt.settings))
    except OtherCustomer as e:
        raise ApiError(403, "other_customer", e.message) from None
    except EventsError as e:
        raise ApiError(400, "invalid_parameter", e.message) from None
    except QueryLimitExceeded:
        s = rt.settings
        raise ApiError(
            422, "events_query_too_expensive",
            f"The events query went over a limit ({s.usage_max_execution_s} s, {s.usage_max_result_rows} rows); "
            "ask for a shorter period or a smaller `limit`.",
        ) from None  # fmt: skip
    data = [
        {"transaction_id": e.transaction_id, "customer_id": e.customer_id, "event_type": e.event_type,
         "timestamp": e.timestamp_ms, "properties": orjson.Fragment(e.properties)}  # stored JSON, exact numbers
        for e in page.events
    ]  # fmt: skip
    return json_response({"data": data, "next_cursor": page.next_cursor})
