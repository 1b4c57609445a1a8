"""/v1/meters: the meter catalog (config meters read-only, API meters stored)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.errors import ApiError
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


async def list_meters(request: Request) -> Response:
    limit, cursor = page_params(request)
    meters = await _catalog(request).list(cursor, limit + 1)
    more = len(meters) > limit
    meters = meters[:limit]
    return json_response(
        {"data": [m.as_json() for m in meters], "next_cursor": meters[-1].code if more and meters else None}
    )


async def create_meter(request: Request) -> Response:
    meter = _parse(await json_body(request))
    try:
        await _catalog(request).create(meter)
    except MeterConflict as e:
        raise ApiError(409, "meter_exists", str(e)) from None
    return json_response(meter.as_json(), 201)


async def get_meter(request: Request) -> Response:
    code = request.path_params["code"]
    meter = await _catalog(request).get(code)
    if meter is None:
        raise ApiError(404, "meter_not_found", f"There is no meter {code!r}.")
    return json_response(meter.as_json())


async def put_meter(request: Request) -> Response:
    code = request.path_params["code"]
    meter = _parse(await json_body(request), code)
    try:
        created = await _catalog(request).replace(meter)
    except MeterConflict as e:
        raise ApiError(409, "meter_read_only", str(e)) from None
    return json_response(meter.as_json(), 201 if created else 200)


async def delete_meter(request: Request) -> Response:
    code = request.path_params["code"]
    try:
        deleted = await _catalog(request).delete(code)
    except MeterConflict as e:
        raise ApiError(409, "meter_read_only", str(e)) from None
    if not deleted:
        raise ApiError(404, "meter_not_found", f"There is no meter {code!r}.")
    return Response(status_code=204)
