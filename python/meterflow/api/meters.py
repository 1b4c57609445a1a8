"""/v1/meters: the meter catalog (config meters read-only, API meters stored)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.errors import ApiError
from meterflow.api.openapi import PAGE, operation
from meterflow.api.responses import json_body, json_response, page_params
from meterflow.metering.catalog import MeterCatalog, MeterConflict
from meterflow.metering.meters import Meter, MeterError, parse_meter


def _catalog(request: Request) -> MeterCatalog:
    catalog: MeterCatalog = request.app.state.meters
    return catalog


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
    return json_response(
        {"data": [m.as_json() for m in meters], "next_cursor": meters[-1].code if more and meters else None}
    )


@operation("Create a meter", {201: "Created", 409: "A meter with this code exists."}, body="Meter", result="Meter")
async def create_meter(request: Request) -> Response:
    meter = _parse(await json_body(request))
    try:
        await _catalog(request).create(meter)
    except MeterConflict as e:
        raise ApiError(409, "meter_exists", str(e)) from None
    return json_response(meter.as_json(), 201)


@operation("Get a meter", {200: "The meter", 404: "There is no such meter."}, result="Meter")
async def get_meter(request: Request) -> Response:
    code = request.path_params["code"]
    meter = await _catalog(request).get(code)
    if meter is None:
        raise ApiError(404, "meter_not_found", f"There is no meter {code!r}.")
    return json_response(meter.as_json())


@operation("Create or replace a meter (not one defined in the config)",
           {200: "Replaced", 201: "Created", 409: "The meter is defined in the config file."}, body="Meter",
           result="Meter")  # fmt: skip
async def put_meter(request: Request) -> Response:
    code = request.path_params["code"]
    meter = _parse(await json_body(request), code)
    try:
        created = await _catalog(request).replace(meter)
    except MeterConflict as e:
        raise ApiError(409, "meter_read_only", str(e)) from None
    return json_response(meter.as_json(), 201 if created else 200)


@operation("Delete a meter", {204: "Deleted", 404: "There is no such meter.",
                              409: "The meter is defined in the config file."})  # fmt: skip
async def delete_meter(request: Request) -> Response:
    code = request.path_params["code"]
    try:
        deleted = await _catalog(request).delete(code)
    except MeterConflict as e:
        raise ApiError(409, "meter_read_only", str(e)) from None
    if not deleted:
        raise ApiError(404, "meter_not_found", f"There is no meter {code!r}.")
    return Response(status_code=204)
