"""/v1/keys: create (secret shown once), list (never the secret), revoke."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.openapi import PAGE, STALE, operation
from meterflow.auth.keys import KeyError_, check_rate_limits
from meterflow.customers import NUL, NUL_MESSAGE
from meterflow.records import IfMatch
from meterflow.records.versions import etag
from meterflow.web.errors import ApiError
from meterflow.web.pagination import page_params, page_response
from meterflow.web.responses import json_body, json_response
from meterflow.web.state import runtime_of


@operation("Create an API key; the secret is in this answer only", {201: "Created, with `key`"}, body="KeyRequest")
async def create_key(request: Request) -> Response:
    keys = runtime_of(request).keys
    doc = await json_body(request)
    if not isinstance(doc, dict) or set(doc) - {"scope", "name", "customer_id", "rate_limits"}:
        raise ApiError("invalid_key", "A key takes `scope`, and optionally `name`, `customer_id` and `rate_limits`.")
    name = doc.get("name") or ""
    customer = doc.get("customer_id")
    if not isinstance(name, str) or (customer is not None and not isinstance(customer, str)):
        raise ApiError("invalid_key", "`name` and `customer_id` must be strings.")
    if NUL in name:
        raise ApiError("invalid_key", NUL_MESSAGE.format("name"))
    try:
        limits = check_rate_limits(doc.get("rate_limits"))
        key, secret = await keys.create(str(doc.get("scope")), name, customer, limits)
    except KeyError_ as e:
        raise ApiError("invalid_key", str(e)) from None
    return json_response({**key, "key": secret}, 201, {"ETag": etag(key["version"])})


@operation("List API keys (never the secret)", {200: "A page of keys", 400: "`limit` or `cursor` is invalid."},
           result="Page", params=PAGE)  # fmt: skip
async def list_keys(request: Request) -> Response:
    keys = runtime_of(request).keys
    limit, cursor = page_params(request)
    rows = await keys.list(cursor, limit + 1)
    return page_response(rows, limit)


@operation("Revoke an API key", {204: "Revoked", 404: "There is no active key with this id.", **STALE})
async def revoke_key(request: Request) -> Response:
    keys = runtime_of(request).keys
    if not await keys.revoke(request.path_params["key_id"], IfMatch.parse(request.headers.get("if-match"))):
        raise ApiError("key_not_found", f"There is no active key {request.path_params['key_id']!r}.")
    return Response(status_code=204)
