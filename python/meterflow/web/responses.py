"""JSON responses; Decimals (usage values) are written as exact JSON numbers."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from meterflow.kernel.money import decimal_text
from meterflow.web.errors import ApiError
from meterflow.web.state import runtime_of

ADMIN_BODY_MAX = 1 << 20  # bytes of a JSON body that is not events


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return orjson.Fragment(decimal_text(obj))
    raise TypeError


def json_response(data: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(data, default=_default), status_code=status, media_type="application/json", headers=headers
    )


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes, and with 408 when
    it has not arrived within `timeout_s` (Granian has no body timeout of its own)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_body(request, limit)
    except TimeoutError:
        raise ApiError("body_timeout", f"The request body did not arrive within {timeout_s:g} s, the limit.",
            {"Connection": "close"},
        ) from None  # fmt: skip


# The rest of a refused body is never read: the connection cannot carry another request.
CLOSE = {"Connection": "close"}


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise ApiError("invalid_content_length", "Content-Length is not a number.")
        if int(declared) > limit:
            raise ApiError("body_too_large", f"The body is {declared} bytes; the limit is {limit} bytes.", CLOSE)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError("body_too_large", f"The body is over the limit of {limit} bytes.", CLOSE)
        chunks.append(chunk)
    return b"".join(chunks)


def check_json(request: Request) -> None:
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        shown = ctype or "none"
        raise ApiError("unsupported_media_type", f"Content-Type must be application/json, not {shown}.")


async def json_body(request: Request, limit: int = ADMIN_BODY_MAX) -> Any:
    """A small JSON request body (not events), read only up to `limit` bytes, or a 400/413/415 ApiError."""
    check_json(request)
    body = await read_body(request, limit, runtime_of(request).settings.http_body_timeout_s)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ApiError("invalid_json", f"The body is not valid JSON: {e}.") from None
