"""/v1/webhooks: register a receiver (its secret shown once), list, delete, read its delivery log."""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.errors import ApiError
from meterflow.api.openapi import PAGE, operation
from meterflow.api.responses import json_body, json_response, page_params
from meterflow.billing.webhooks import WebhookError, Webhooks, validate
from meterflow.runtime import runtime_of

WEBHOOK_ID_RE = re.compile(r"wh_[0-9a-f]{24}")


def _store(request: Request) -> Webhooks:
    return runtime_of(request).webhooks


def _id(request: Request) -> str:
    wid = str(request.path_params["webhook_id"])
    if not WEBHOOK_ID_RE.fullmatch(wid):
        raise ApiError(404, "webhook_not_found", f"There is no webhook {wid[:100]!r}.")
    return wid


@operation("Register a webhook receiver; the answer holds its signing secret, shown this once",
           {201: "Registered"}, body="WebhookRequest", result="Webhook")  # fmt: skip
async def create_webhook(request: Request) -> Response:
    try:
        url, events, description = validate(await json_body(request))
    except WebhookError as e:
        raise ApiError(400, "invalid_webhook", e.message) from None
    return json_response(await _store(request).register(url, events, description), 201)


@operation("List webhook receivers, in id order", {200: "A page of webhooks", 400: "A parameter is invalid."},
           result="Page", params=PAGE)  # fmt: skip
async def list_webhooks(request: Request) -> Response:
    limit, cursor = page_params(request)
    rows = await _store(request).list(cursor, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return json_response({"data": rows, "next_cursor": rows[-1]["id"] if more and rows else None})


@operation("Delete a webhook receiver (its pending deliveries are dropped; the log stays)",
           {204: "Deleted", 404: "There is no such webhook."})  # fmt: skip
async def delete_webhook(request: Request) -> Response:
    wid = _id(request)
    if not await _store(request).delete(wid):
        raise ApiError(404, "webhook_not_found", f"There is no webhook {wid!r}.")
    return Response(status_code=204)


@operation("A webhook's deliveries, each with every attempt, in id order",
           {200: "A page of deliveries", 400: "A parameter is invalid.", 404: "There is no such webhook."},
           result="Page", params=PAGE)  # fmt: skip
async def list_deliveries(request: Request) -> Response:
    wid = _id(request)
    limit, cursor = page_params(request)
    store = _store(request)
    if not await store.exists(wid):
        raise ApiError(404, "webhook_not_found", f"There is no webhook {wid!r}.")
    rows = await store.deliveries(wid, cursor, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return json_response({"data": rows, "next_cursor": rows[-1]["id"] if more and rows else None})
