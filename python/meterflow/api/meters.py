"""/v1/meters: the meter catalog (config meters read-only, API meters stored)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.errors import ApiError
from meterflow.api.openapi import PAGE, STALE, operation
from meterflow.api.responses import json_body, json_response, page_params
from meterflow.metering.catalog import MeterCatalog, MeterConflict
from meterflow.metering.meters import Meter, MeterError, parse_meter
from meterflow.records import IfMatch
from meterflow.records.versions import etag
from meterflow.runtime import runtime_of


def _catalog(request: Request) -> MeterCatalog:
    return runtime_of(request).meters


def _answer(meter: Meter, version: int | None, status: int = 200) -> Response:
    """A meter with its version (config meters have none, and no ETag)."""
    headers = {"ETag": etag(version)} if version is not None else None
    return json_response({**meter.as_json(), "version": version}, status, headers)


def _parse(doc: object, code: str | None = None) -> Meter:
    try:
        return parse_meter(doc, "api", code)
    except MeterError as e:
        raise ApiError(400, "invalid_meter", f"{e.field}: {e.message}") from None


@operation("List meters, in code order", {200: "A page of meters", 400: "`limit` or `cursor` is invalid."},
           result="Page", params=PAGE)  # fmt: skip
async def list_meters(request: Request) -> Response:
    limit, cursor = page_params(request)
    meters = await _catalog(request).list(cursor, limit + 1)
    more = len(meters) > limit
    meters = meters[:limit]
    data = [{**m.as_json(), "version": v} for m, v in meters]
    return json_response({"data": data, "next_cursor": meters[-1][0].code if more and meters else None})


@operation("Create a meter", {201: "Created", 409: "A meter with this code exists."}, body="Meter", result="Meter")
async def create_meter(request: Request) -> Response:
    meter = _parse(await json_body(request))
    try:
        version = await _catalog(request).create(meter)
    except MeterConflict as e:
        raise ApiError(409, "meter_exists", str(e)) from None
    return _answer(meter, version, 201)


@operation("Get a meter", {200: "The meter", 404: "There is no such meter."}, result="Meter")
async def get_meter(request: Request) -> Response:
    code = request.path_params["code"]
    found = await _catalog(request).get_versioned(code)
    if found is None:
        raise ApiError(404, "meter_not_found", f"There is no meter {code!r}.")
    return _answer(*found)


@operation("Create or replace a meter (not one defined in the config)",
           {200: "Replaced", 201: "Created", 409: "The meter is defined in the config file.", **STALE}, body="Meter",
           result="Meter")  # fmt: skip
async def put_meter(request: Request) -> Response:
    code = request.path_params["code"]
    meter = _parse(await json_body(request), code)
    try:
        created, version = await _catalog(request).replace(meter, IfMatch.parse(request.headers.get("if-match")))
    except MeterConflict as e:
        raise ApiError(409, "meter_read_only", str(e)) from None
    return _answer(meter, version, 201 if created else 200)


@operation("Delete a meter", {204: "Deleted", 404: "There is no such meter.",
                              409: "The meter is defined in the config file.", **STALE})  # fmt: skip
async def delete_meter(request: Request) -> Response:
    code = request.path_params["code"]
    try:
        deleted = await _catalog(request).delete(code, IfMatch.parse(request.headers.get("if-match")))
    except MeterConflict as e:
        raise ApiError(409, "meter_read_only", str(e)) from None
    if not deleted:
        raise ApiError(404, "meter_not_found", f"There is no meter {code!r}.")
    return Response(status_code=204)
