"""/v1/meters: the meter catalog (config meters read-only, API meters stored)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.openapi import PAGE, STALE, operation
from meterflow.kernel.params import EPOCH_MS_MAX, EPOCH_MS_MIN
from meterflow.metering.catalog import MeterCatalog, MeterConflict, MeterInUse, MeterVersion
from meterflow.metering.meters import Meter, MeterError, parse_meter
from meterflow.records import IfMatch
from meterflow.records.versions import etag
from meterflow.web.errors import ApiError, answering, or_not_found
from meterflow.web.pagination import page_params, page_response
from meterflow.web.responses import json_body, json_response
from meterflow.web.state import runtime_of


def _catalog(request: Request) -> MeterCatalog:
    return runtime_of(request).meters


def _answer(meter: Meter, version: int | None, status: int = 200) -> Response:
    """A meter with its version (config meters have none, and no ETag)."""
    headers = {"ETag": etag(version)} if version is not None else None
    return json_response({**meter.as_json(), "version": version}, status, headers)


def _parse(doc: object, code: str | None = None) -> tuple[Meter, int | None]:
    """The meter of a request body and its `effective_at` (None: from now), which is not a meter field."""
    effective_at = None
    if isinstance(doc, dict) and "effective_at" in doc:
        doc = dict(doc)
        v = doc.pop("effective_at")
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not EPOCH_MS_MIN <= v <= EPOCH_MS_MAX):
            raise ApiError("invalid_meter", f"effective_at: `effective_at` must be epoch milliseconds from "
                           f"{EPOCH_MS_MIN} to {EPOCH_MS_MAX}, got {str(v)[:40]!r}.")  # fmt: skip
        effective_at = v
    try:
        return parse_meter(doc, "api", code), effective_at
    except MeterError as e:
        raise ApiError("invalid_meter", f"{e.field}: {e.message}") from None


def _version_json(v: MeterVersion) -> dict[str, object]:
    return {"effective_at": v.effective_at, "created_at": v.created_at, "deleted": v.deleted,
            "meter": None if v.meter is None else v.meter.as_json()}  # fmt: skip


@operation("List meters, in code order", {200: "A page of meters", 400: "`limit` or `cursor` is invalid."},
           result="Page", params=PAGE)  # fmt: skip
async def list_meters(request: Request) -> Response:
    limit, cursor = page_params(request)
    meters = await _catalog(request).list(cursor, limit + 1)
    return page_response(meters, limit, lambda mv: mv[0].code, lambda mv: {**mv[0].as_json(), "version": mv[1]})


@operation("Create a meter, in force from `effective_at` (default now)",
           {201: "Created", 409: "A meter with this code exists."}, body="Meter", result="Meter")  # fmt: skip
async def create_meter(request: Request) -> Response:
    meter, effective_at = _parse(await json_body(request))
    try:
        version = await _catalog(request).create(meter, effective_at)
    except MeterConflict as e:
        raise ApiError("meter_exists", str(e)) from None
    return _answer(meter, version, 201)


@operation("Get a meter", {200: "The meter", 404: "There is no such meter."}, result="Meter")
async def get_meter(request: Request) -> Response:
    code = request.path_params["code"]
    found = or_not_found(await _catalog(request).get_versioned(code), "meter_not_found", f"There is no meter {code!r}.")
    return _answer(*found)


@operation("Create or replace a meter (not one defined in the config): a version in force from `effective_at` "
           "(default now)",
           {200: "Replaced", 201: "Created", 409: "The meter is defined in the config file.", **STALE}, body="Meter",
           result="Meter")  # fmt: skip
async def put_meter(request: Request) -> Response:
    code = request.path_params["code"]
    meter, effective_at = _parse(await json_body(request), code)
    if_match = IfMatch.parse(request.headers.get("if-match"))
    try:
        created, version = await _catalog(request).replace(meter, if_match, effective_at)
    except MeterConflict as e:
        raise ApiError("meter_read_only", str(e)) from None
    return _answer(meter, version, 201 if created else 200)


@operation("Delete a meter from now on", {204: "Deleted", 404: "There is no such meter.",
    409: "The meter is defined in the config file (`meter_read_only`), or a subscription that is active or may "
         "still receive late usage bills with a plan version that prices it (`meter_in_use`).", **STALE})  # fmt: skip
async def delete_meter(request: Request) -> Response:
    code = request.path_params["code"]
    with answering({MeterConflict: "meter_read_only", MeterInUse: "meter_in_use"}):
        deleted = await _catalog(request).delete(code, IfMatch.parse(request.headers.get("if-match")))
    if not deleted:
        raise ApiError("meter_not_found", f"There is no meter {code!r}.")
    return Response(status_code=204)


@operation("A meter's versions, oldest first, each in force from its `effective_at` until the next",
           {200: "The versions (`deleted`: from then on the meter is deleted)",
            404: "There is no such meter."})  # fmt: skip
async def list_meter_versions(request: Request) -> Response:
    code = request.path_params["code"]
    found = or_not_found(await _catalog(request).versions(code), "meter_not_found", f"There is no meter {code!r}.")
    return json_response({"data": [_version_json(v) for v in found]})
