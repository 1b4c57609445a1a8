"""Every error answer is `{"error": <code>, "message": <one sentence>}`."""

from __future__ import annotations

import logging

from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from meterflow.runtime import runtime_of
from meterflow.storage.base import StorageError

log = logging.getLogger("meterflow.api")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = {
        404: f"There is no route {request.url.path}; see /openapi.json.",
        405: f"{request.method} is not allowed on {request.url.path}.",
    }.get(exc.status_code, str(exc.detail))
    return error_response(exc.status_code, code, message, dict(exc.headers or {}))


async def storage_error(request: Request, exc: Exception) -> Response:
    """503 with a fixed sentence: the store's own text (SQL, hosts, versions) goes to the log only."""
    assert isinstance(exc, StorageError)
    log.warning("storage unavailable", extra={"path": request.url.path, "error": str(exc)[:500]})
    retry_after = runtime_of(request).settings.retry_after_s
    return error_response(503, "storage_unavailable", f"Storage is unavailable; retry after {retry_after} s.",
                          {"Retry-After": str(retry_after)})  # fmt: skip


async def precondition_failed(request: Request, exc: Exception) -> Response:
    message = "If-Match names a version that is not the record's current one; read it again and retry."
    return error_response(412, "precondition_failed", message)


async def records_unavailable(request: Request, exc: Exception) -> Response:
    retry = str(runtime_of(request).settings.retry_after_s)
    log.warning("records database unavailable", extra={"path": request.url.path, "error": str(exc)[:300]})
    message = f"The records database (customers, keys, meters) is unavailable; retry after {retry} s."
    return error_response(503, "records_unavailable", message, {"Retry-After": retry})


async def record_rejected(request: Request, exc: Exception) -> Response:
    """The last guard behind the routes' own checks: a constraint or a value the records database refuses
    is the client's problem (409 / 400), not a 500; the database's text goes to the log only."""
    assert isinstance(exc, DBAPIError)
    if isinstance(exc, IntegrityError):
        log.warning("record refused by a constraint", extra={"path": request.url.path, "error": str(exc.orig)[:300]})
        return error_response(409, "conflict", "The change conflicts with another record; read it again and retry.")
    sqlstate = str(getattr(exc.orig, "sqlstate", None) or "")
    if isinstance(exc, DataError) or sqlstate.startswith("22"):  # SQLSTATE class 22: data exception
        log.warning("record value refused", extra={"path": request.url.path, "error": str(exc.orig)[:300]})
        return error_response(400, "invalid_value", "A value in the request cannot be stored; check its text fields.")
    return await internal_error(request, exc)


async def internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", extra={"path": request.url.path})
    return error_response(500, "internal_error", "MeterFlow failed to handle this request; it has been logged.")
