"""/v1/events: ingest a batch (POST), the stored events newest first (GET); /v1/events/lag: the async backlog."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace

import orjson
from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.openapi import Param, operation
from meterflow.auth.keys import Principal
from meterflow.ingest.dedup import DedupUnavailable
from meterflow.ingest.service import DecodeError, Unavailable
from meterflow.ingest.stream import Lag
from meterflow.kernel.errors import FieldError, status_of
from meterflow.kernel.params import EPOCH_MS_MAX, EPOCH_MS_MIN, epoch_ms, integer
from meterflow.metering.events import (
    EVENTS_PAGE_MAX,
    Cursor,
    EventsError,
    EventsQuery,
    OtherCustomer,
    check_subject,
    events_query,
    list_events,
)
from meterflow.metering.usage import query_limits
from meterflow.web.errors import ApiError, answering, too_expensive
from meterflow.web.guard import check_rate
from meterflow.web.responses import check_json, json_response, read_body
from meterflow.web.state import runtime_of

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
        service.metrics.inc("meterflow_requests_total", status=str(status_of(code)))
        raise ApiError(code, message) from None
    except Unavailable as e:
        service.metrics.inc("meterflow_requests_total", status="503")
        message = e.message
        if e.code in _BACKEND_DOWN:  # the backend's own text (hosts, SQL) goes to the log only
            log.warning("ingest refused: backend unavailable", extra={"error": e.message[:500]})
            message = f"{_BACKEND_DOWN[e.code]} is unavailable; retry after {settings.retry_after_s} s."
        raise ApiError(e.code, message, {"Retry-After": str(settings.retry_after_s)}) from None
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
        raise ApiError("dedup_unavailable", f"Redis is unavailable; retry after {rt.settings.retry_after_s} s.",
                       {"Retry-After": str(rt.settings.retry_after_s)}) from None  # fmt: skip
    return json_response({"mode": "async", **lag.as_json()})


EPOCH = {"type": "integer", "minimum": EPOCH_MS_MIN, "maximum": EPOCH_MS_MAX}


def parse_query(params: Mapping[str, str], bound_customer: str | None = None) -> EventsQuery:
    """The events query from URL parameters (EventsError names the parameter); a key bound to a customer sees
    that customer only. Errors come in the parameters' order: who and what, the period and page, the cursor."""
    customer = params.get("customer_id") or None
    event_type = params.get("event_type") or None
    check_subject(customer, event_type, bound_customer)
    try:
        start = epoch_ms(params, "start") if params.get("start") else EPOCH_MS_MIN
        end = epoch_ms(params, "end") if params.get("end") else EPOCH_MS_MAX
        limit = integer(params, "limit", 1, EVENTS_PAGE_MAX, default=100)
    except FieldError as e:
        raise EventsError(e.field, e.message) from None
    query = events_query(customer, event_type, start, end, limit, bound_customer=bound_customer)
    return replace(query, cursor=Cursor.decode(params["cursor"])) if params.get("cursor") else query


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
    s = rt.settings
    limits = f"{s.usage_max_execution_s} s, {s.usage_max_result_rows} rows"
    with too_expensive("events", limits, "ask for a shorter period or a smaller `limit`"),\
            answering({OtherCustomer: "other_customer", EventsError: "invalid_parameter"}):  # fmt: skip
        query = parse_query(request.query_params, principal.customer_id)
        page = await list_events(rt.storage, query, query_limits(rt.settings))
    data = [
        {"transaction_id": e.transaction_id, "customer_id": e.customer_id, "event_type": e.event_type,
         "timestamp": e.timestamp_ms, "properties": orjson.Fragment(e.properties)}  # stored JSON, exact numbers
        for e in page.events
    ]  # fmt: skip
    return json_response({"data": data, "next_cursor": page.next_cursor})
