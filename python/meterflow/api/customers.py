"""/v1/customers: create or replace, read, patch, soft-delete, list with a cursor."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.openapi import PAGE, STALE, Param, operation
from meterflow.customers import NUL, NUL_MESSAGE, CustomerError, Customers, validate
from meterflow.kernel.ids import ID_RE, ID_RULE
from meterflow.records import IfMatch
from meterflow.records.versions import etag
from meterflow.web.errors import ApiError, or_not_found
from meterflow.web.pagination import page_params, page_response
from meterflow.web.params import path_id
from meterflow.web.responses import json_body, json_response
from meterflow.web.state import runtime_of

FILTER_MAX = 500  # the longest name a customer may have


def _store(request: Request) -> Customers:
    return runtime_of(request).customers


def _if_match(request: Request) -> IfMatch | None:
    return IfMatch.parse(request.headers.get("if-match"))


def _answer(customer: dict[str, object], status: int = 200) -> Response:
    return json_response(customer, status, {"ETag": etag(int(str(customer["version"])))})


def _id(request: Request) -> str:
    return path_id(request, "customer_id", ID_RE, "invalid_customer_id", f"A customer id is {ID_RULE}.")


def _fields(doc: object, partial: bool) -> dict[str, object]:
    try:
        return validate(doc, partial)
    except CustomerError as e:
        raise ApiError("invalid_customer", e.message) from None


@operation("Create or replace a customer", {200: "Replaced", 201: "Created", **STALE}, body="Customer",
           result="Customer")  # fmt: skip
async def put_customer(request: Request) -> Response:
    cid = _id(request)
    doc = await json_body(request)
    if isinstance(doc, dict) and doc.get("id", cid) != cid:
        raise ApiError("invalid_customer", f"`id` is {doc.get('id')!r} but the URL names {cid!r}.")
    customer, created = await _store(request).put(cid, _fields(doc, partial=False), _if_match(request))
    return _answer(customer, 201 if created else 200)


@operation("Change some fields of a customer", {200: "Changed", 404: "There is no such customer.", **STALE},
           body="Customer", result="Customer")  # fmt: skip
async def patch_customer(request: Request) -> Response:
    cid = _id(request)
    fields = _fields(await json_body(request), partial=True)
    customer = or_not_found(await _store(request).patch(cid, fields, _if_match(request)), "customer_not_found",
                            f"There is no customer {cid!r}.")  # fmt: skip
    return _answer(customer)


@operation("Get a customer", {200: "The customer", 400: "The id is not a valid customer id.",
                               404: "There is no such customer."}, result="Customer")  # fmt: skip
async def get_customer(request: Request) -> Response:
    cid = _id(request)
    customer = or_not_found(await _store(request).get(cid), "customer_not_found", f"There is no customer {cid!r}.")
    return _answer(customer)


@operation("Delete a customer (soft: kept for past invoices)", {
    204: "Deleted", 400: "The id is not a valid customer id.", 404: "There is no such customer.", **STALE})  # fmt: skip
async def delete_customer(request: Request) -> Response:
    cid = _id(request)
    if not await _store(request).delete(cid, _if_match(request)):
        raise ApiError("customer_not_found", f"There is no customer {cid!r}.")
    return Response(status_code=204)


@operation("List customers, in id order", {200: "A page of customers", 400: "A parameter is invalid."},
           result="Page", params=(*PAGE, Param("name", "Only names containing this text (any case)."),
                                  Param("email", "Only emails containing this text (any case).")))  # fmt: skip
async def list_customers(request: Request) -> Response:
    limit, cursor = page_params(request)
    q = request.query_params
    for name in ("name", "email"):
        if len(q.get(name, "")) > FILTER_MAX:
            raise ApiError("invalid_parameter", f"`{name}` is longer than {FILTER_MAX} characters, the limit.")
        if NUL in q.get(name, ""):
            raise ApiError("invalid_parameter", NUL_MESSAGE.format(name))
    rows = await _store(request).list(cursor, limit + 1, q.get("name", ""), q.get("email", ""))
    return page_response(rows, limit)
