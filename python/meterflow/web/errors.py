"""Every error answer is `{"error": <code>, "message": <one sentence>}`."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import TypeVar

from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from meterflow.kernel.errors import SENTENCE, status_of
from meterflow.storage.base import QueryLimitExceeded, StorageError
from meterflow.web.state import runtime_of

log = logging.getLogger("meterflow.api")
T = TypeVar("T")


class ApiError(Exception):
    """An error answer: its status is the code's (kernel.errors.STATUS); `message` defaults to the code's
    fixed sentence."""

    def __init__(self, code: str, message: str | None = None, headers: dict[str, str] | None = None,
                 status: int | None = None) -> None:  # fmt: skip
        message = SENTENCE[code] if message is None else message
        super().__init__(message)
        self.status = status_of(code) if status is None else status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(code: str, message: str | None = None, headers: dict[str, str] | None = None,
                   status: int | None = None) -> JSONResponse:  # fmt: skip
    """`{"error": code, "message": ...}` with the code's status (`status`: the router's HTTP errors, and a code
    answered otherwise on one route)."""
    body = {"error": code, "message": SENTENCE[code] if message is None else message}
    return JSONResponse(body, status_code=status_of(code) if status is None else status, headers=headers)


def or_not_found(value: T | None, code: str, message: str) -> T:
    """`value`, or the `code` answer (a `*_not_found`) when there is none."""
    if value is None:
        raise ApiError(code, message)
    return value


@contextlib.contextmanager
def answering(codes: Mapping[type[Exception], str]) -> Iterator[None]:
    """Answers a domain error raised inside with its code (the first of `codes` it is an instance of) and
    its own one-sentence message (`.message`, else its text)."""
    try:
        yield
    except tuple(codes) as e:
        code = next(c for kind, c in codes.items() if isinstance(e, kind))
        raise ApiError(code, getattr(e, "message", None) or str(e)) from None


@contextlib.contextmanager
def too_expensive(what: str, limits: str, advice: str) -> Iterator[None]:
    """Answers a query that went over one of `limits` (a time, rows, bytes) with `<what>_query_too_expensive`."""
    try:
        yield
    except QueryLimitExceeded:
        message = f"The {what} query went over a limit ({limits}); {advice}."
        raise ApiError(f"{what}_query_too_expensive", message) from None


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.code, exc.message, exc.headers, exc.status)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = {
        404: f"There is no route {request.url.path}; see /openapi.json.",
        405: f"{request.method} is not allowed on {request.url.path}.",
    }.get(exc.status_code, str(exc.detail))
    return error_response(code, message, dict(exc.headers or {}), status=exc.status_code)


async def storage_error(request: Request, exc: Exception) -> Response:
    """503 with a fixed sentence: the store's own text (SQL, hosts, versions) goes to the log only."""
    assert isinstance(exc, StorageError)
    log.warning("storage unavailable", extra={"path": request.url.path, "error": str(exc)[:500]})
    retry_after = runtime_of(request).settings.retry_after_s
    return error_response("storage_unavailable", f"Storage is unavailable; retry after {retry_after} s.",
                          {"Retry-After": str(retry_after)})  # fmt: skip


async def precondition_failed(request: Request, exc: Exception) -> Response:
    return error_response("precondition_failed")


async def records_unavailable(request: Request, exc: Exception) -> Response:
    retry = str(runtime_of(request).settings.retry_after_s)
    log.warning("records database unavailable", extra={"path": request.url.path, "error": str(exc)[:300]})
    message = f"The records database (customers, keys, meters) is unavailable; retry after {retry} s."
    return error_response("records_unavailable", message, {"Retry-After": retry})


async def record_rejected(request: Request, exc: Exception) -> Response:
    """The last guard behind the routes' own checks: a constraint or a value the records database refuses
    is the client's problem (409 / 400), not a 500; the database's text goes to the log only."""
    assert isinstance(exc, DBAPIError)
    if isinstance(exc, IntegrityError):
        log.warning("record refused by a constraint", extra={"path": request.url.path, "error": str(exc.orig)[:300]})
        return error_response("conflict")
    sqlstate = str(getattr(exc.orig, "sqlstate", None) or "")
    if isinstance(exc, DataError) or sqlstate.startswith("22"):  # SQLSTATE class 22: data exception
        log.warning("record value refused", extra={"path": request.url.path, "error": str(exc.orig)[:300]})
        return error_response("invalid_value")
    return await internal_error(request, exc)


async def internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", extra={"path": request.url.path})
    return error_response("internal_error")
