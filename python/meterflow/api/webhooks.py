"""/v1/webhooks: register a receiver (its secret shown once), list, delete, read its delivery log."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.openapi import PAGE, operation
from meterflow.billing.webhooks import WebhookError, Webhooks, validate
from meterflow.kernel.ids import WEBHOOK_ID_RE
from meterflow.web.errors import ApiError
from meterflow.web.pagination import page_params, page_response
from meterflow.web.params import path_id
from meterflow.web.responses import json_body, json_response
from meterflow.web.state import runtime_of


def _store(request: Request) -> Webhooks:
    return runtime_of(request).webhooks


def _id(request: Request) -> str:
    return path_id(request, "webhook_id", WEBHOOK_ID_RE, "webhook_not_found", "There is no webhook {id}.")


@operation("Register a webhook receiver; the answer holds its signing secret, shown this once",
           {201: "Registered"}, body="WebhookRequest", result="Webhook")  # fmt: skip
async def create_webhook(request: Request) -> Response:
    try:
        url, events, description = validate(await json_body(request))
        return json_response(await _store(request).register(url, events, description), 201)
    except WebhookError as e:
        raise ApiError("invalid_webhook", e.message) from None


@operation("List webhook receivers, in id order", {200: "A page of webhooks", 400: "A parameter is invalid."},
           result="Page", params=PAGE)  # fmt: skip
async def list_webhooks(request: Request) -> Response:
    limit, cursor = page_params(request)
    rows = await _store(request).list(cursor, limit + 1)
    return page_response(rows, limit)


@operation("Delete a webhook receiver (its pending deliveries are dropped; the log stays)",
           {204: "Deleted", 404: "There is no such webhook."})  # fmt: skip
async def delete_webhook(request: Request) -> Response:
    wid = _id(request)
    if not await _store(request).delete(wid):
        raise ApiError("webhook_not_found", f"There is no webhook {wid!r}.")
    return Response(status_code=204)


@operation("A webhook's deliveries, each with every attempt, in id order",
           {200: "A page of deliveries", 400: "A parameter is invalid.", 404: "There is no such webhook."},
           result="Page", params=PAGE)  # fmt: skip
async def list_deliveries(request: Request) -> Response:
    wid = _id(request)
    limit, cursor = page_params(request)
    store = _store(request)
    if not await store.exists(wid):
        raise ApiError("webhook_not_found", f"There is no webhook {wid!r}.")
    rows = await store.deliveries(wid, cursor, limit + 1)
    return page_response(rows, limit)
