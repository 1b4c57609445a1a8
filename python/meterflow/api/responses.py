"""JSON responses; Decimals (usage values) are written as exact JSON numbers."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.errors import ApiError


def decimal_text(d: Decimal) -> str:
    """A finite Decimal as a JSON number with every digit: `format(d, "f")`
    never rounds (unlike `normalize`, which rounds to the context's 28 digits)."""
    text = format(d, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return orjson.Fragment(decimal_text(obj))
    raise TypeError


def json_response(data: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(data, default=_default), status_code=status, media_type="application/json", headers=headers
    )


async def json_body(request: Request, limit: int = 1 << 20) -> Any:
    """A small JSON request body (not events), or a 400/413/415 ApiError."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "unsupported_media_type", f"Content-Type must be application/json, not {ctype or 'none'}.")
    body = await request.body()
    if len(body) > limit:
        raise ApiError(413, "body_too_large", f"The body is over the limit of {limit} bytes.")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ApiError(400, "invalid_json", f"The body is not valid JSON: {e}.") from None


def page_params(request: Request, max_limit: int = 500) -> tuple[int, str]:
    raw = request.query_params.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= max_limit:
        raise ApiError(400, "invalid_parameter", f"`limit` must be an integer from 1 to {max_limit}.")
    return int(raw), request.query_params.get("cursor", "")
