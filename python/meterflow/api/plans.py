"""/v1/plans: rate cards (config plans read-only, API plans stored and versioned)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.openapi import PAGE, operation
from meterflow.billing.catalog import PlanCatalog, PlanConflict, StoredPlan
from meterflow.billing.plans import Plan, PlanError
from meterflow.records import IfMatch
from meterflow.records.versions import etag
from meterflow.web.errors import ApiError, answering, or_not_found
from meterflow.web.pagination import page_params, page_response
from meterflow.web.responses import json_body, json_response
from meterflow.web.state import runtime_of


def _catalog(request: Request) -> PlanCatalog:
    return runtime_of(request).plans


def _answer(p: StoredPlan, status: int = 200) -> Response:
    headers = {"ETag": etag(p.version)} if p.version is not None else None
    return json_response(p.as_json(), status, headers)


async def _parse(request: Request, code: str | None = None) -> Plan:
    doc = await json_body(request)
    try:
        return await _catalog(request).parse(doc, code)
    except PlanError as e:
        raise ApiError("invalid_plan", f"{e.field}: {e.message}") from None


@operation("List plans, in code order", {200: "A page of plans", 400: "`limit` or `cursor` is invalid."},
           result="Page", params=PAGE)  # fmt: skip
async def list_plans(request: Request) -> Response:
    limit, cursor = page_params(request)
    found = await _catalog(request).list(cursor, limit + 1)
    return page_response(found, limit, lambda p: p.plan.code, lambda p: p.as_json())


@operation("Create a plan", {201: "Created", 409: "A plan with this code exists (or is defined in the config)."},
           body="Plan", result="Plan")  # fmt: skip
async def create_plan(request: Request) -> Response:
    plan = await _parse(request)
    try:
        stored = await _catalog(request).create(plan)
    except PlanConflict as e:
        raise ApiError("plan_exists", str(e)) from None
    return _answer(stored, 201)


@operation("Get a plan (the version new subscriptions take)", {200: "The plan", 404: "There is no such plan."},
           result="Plan")  # fmt: skip
async def get_plan(request: Request) -> Response:
    code = request.path_params["code"]
    found = or_not_found(await _catalog(request).get(code), "plan_not_found", f"There is no plan {code!r}.")
    return _answer(found)


@operation("Create or change a plan; a version with subscriptions is kept and a new version made",
           {200: "Changed", 201: "Created", 409: "The plan is defined in the config file."}, body="Plan",
           result="Plan")  # fmt: skip
async def put_plan(request: Request) -> Response:
    code = request.path_params["code"]
    plan = await _parse(request, code)
    try:
        created, stored = await _catalog(request).replace(plan, IfMatch.parse(request.headers.get("if-match")))
    except PlanConflict as e:
        raise ApiError("plan_read_only", str(e)) from None
    return _answer(stored, 201 if created else 200)


@operation("Archive a plan: no new subscriptions, existing ones go on",
           {204: "Archived", 404: "There is no such plan, or it is archived already.",
            409: "The plan is defined in the config file."})  # fmt: skip
async def delete_plan(request: Request) -> Response:
    code = request.path_params["code"]
    with answering({PlanConflict: "plan_read_only"}):
        archived = await _catalog(request).archive(code, IfMatch.parse(request.headers.get("if-match")))
    if not archived:
        raise ApiError("plan_not_found", f"There is no live plan {code!r}.")
    return Response(status_code=204)
