"""/v1/customers: create or replace, read, patch, soft-delete, list with a cursor."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.errors import ApiError
from meterflow.api.responses import json_body, json_response, page_params
from meterflow.customers import ID_RE, CustomerError, Customers, validate
from meterflow.records import IfMatch
from meterflow.records.versions import etag
from meterflow.runtime import runtime_of


def _store(request: Request) -> Customers:
    return runtime_of(request).customers


def _if_match(request: Request) -> IfMatch | None:
    return IfMatch.parse(request.headers.get("if-match"))


def _answer(customer: dict[str, object], status: int = 200) -> Response:
    return json_response(customer, status, {"ETag": etag(int(str(customer["version"])))})


def _id(request: Request) -> str:
    cid = str(request.path_params["customer_id"])
    if not ID_RE.fullmatch(cid):
        raise ApiError(400, "invalid_customer_id", "A customer id is 1 to 255 of A-Z, a-z, 0-9, '_' or '-'.")
    return cid


def _fields(doc: object, partial: bool) -> dict[str, object]:
    try:
        return validate(doc, partial)
    except CustomerError as e:
        raise ApiError(400, "invalid_customer", e.message) from None


async def put_customer(request: Request) -> Response:
    cid = _id(request)
    doc = await json_body(request)
    if isinstance(doc, dict) and doc.get("id", cid) != cid:
        raise ApiError(400, "invalid_customer", f"`id` is {doc.get('id')!r} but the URL names {cid!r}.")
    customer, created = await _store(request).put(cid, _fields(doc, partial=False), _if_match(request))
    return _answer(customer, 201 if created else 200)


async def patch_customer(request: Request) -> Response:
    cid = _id(request)
    customer = await _store(request).patch(cid, _fields(await json_body(request), partial=True), _if_match(request))
    if customer is None:
        raise ApiError(404, "customer_not_found", f"There is no customer {cid!r}.")
    return _answer(customer)


async def get_customer(request: Request) -> Response:
    cid = _id(request)
    customer = await _store(request).get(cid)
    if customer is None:
        raise ApiError(404, "customer_not_found", f"There is no customer {cid!r}.")
    return _answer(customer)


async def delete_customer(request: Request) -> Response:
    cid = _id(request)
    if not await _store(request).delete(cid, _if_match(request)):
        raise ApiError(404, "customer_not_found", f"There is no customer {cid!r}.")
    return Response(status_code=204)


async def list_customers(request: Request) -> Response:
    limit, cursor = page_params(request)
    q = request.query_params
    rows = await _store(request).list(cursor, limit + 1, q.get("name", ""), q.get("email", ""))
    more = len(rows) > limit
    rows = rows[:limit]
    return json_response({"data": rows, "next_cursor": rows[-1]["id"] if more and rows else None})
