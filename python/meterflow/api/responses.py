"""JSON responses; Decimals (usage values) are written as exact JSON numbers."""

from __future__ import annotations

import asyncio
import re
from decimal import Decimal
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.errors import ApiError
from meterflow.errors import FieldError
from meterflow.params import integer
from meterflow.runtime import runtime_of

ADMIN_BODY_MAX = 1 << 20  # bytes of a JSON body that is not events
PAGE_MAX = 500  # items of one list page
# Every listed id (customer, meter code, key id) is of this alphabet and length.
CURSOR_RE = re.compile(r"[A-Za-z0-9_-]{0,255}")


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


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes, and with 408 when
    it has not arrived within `timeout_s` (Granian has no body timeout of its own)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_body(request, limit)
    except TimeoutError:
        raise ApiError(
            408, "body_timeout", f"The request body did not arrive within {timeout_s:g} s, the limit.",
            {"Connection": "close"},
        ) from None  # fmt: skip


# The rest of a refused body is never read: the connection cannot carry another request.
CLOSE = {"Connection": "close"}


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise ApiError(400, "invalid_content_length", "Content-Length is not a number.")
        if int(declared) > limit:
            raise ApiError(413, "body_too_large", f"The body is {declared} bytes; the limit is {limit} bytes.", CLOSE)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"The body is over the limit of {limit} bytes.", CLOSE)
        chunks.append(chunk)
    return b"".join(chunks)


def check_json(request: Request) -> None:
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        shown = ctype or "none"
        raise ApiError(415, "unsupported_media_type", f"Content-Type must be application/json, not {shown}.")


async def json_body(request: Request, limit: int = ADMIN_BODY_MAX) -> Any:
    """A small JSON request body (not events), read only up to `limit` bytes, or a 400/413/415 ApiError."""
    check_json(request)
    body = await read_body(request, limit, runtime_of(request).settings.http_body_timeout_s)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ApiError(400, "invalid_json", f"The body is not valid JSON: {e}.") from None


def page_params(request: Request, max_limit: int = PAGE_MAX) -> tuple[int, str]:
    """`limit` (1 to max_limit, default 100) and `cursor` of a list route, or a 400 naming the parameter."""
    try:
        limit = integer(request.query_params, "limit", 1, max_limit, default=100)
    except FieldError as e:
        raise ApiError(400, "invalid_parameter", e.message) from None
    cursor = request.query_params.get("cursor", "")
    if not CURSOR_RE.fullmatch(cursor):
        raise ApiError(400, "invalid_parameter", "`cursor` must be the `next_cursor` of a previous page (an id).")
    return limit, cursor
