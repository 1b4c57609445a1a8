"""Authentication, scopes and request rate limits, wrapped around each route."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from meterflow.auth.keys import Principal, Refused, Scope
from meterflow.auth.ratelimit import RateLimiter, RateLimitUnavailable, Verdict
from meterflow.config import Settings
from meterflow.web.errors import ApiError
from meterflow.web.state import runtime_of

Endpoint = Callable[[Request], Awaitable[Response]]
log = logging.getLogger("meterflow.auth")


def presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def client_address(request: Request, header: str) -> str:
    """The caller's address: the socket peer, or the header a trusted proxy sets (MF_CLIENT_ADDRESS_HEADER)."""
    if header and (value := request.headers.get(header)):
        return value.split(",")[-1].strip()[:64]  # the proxy appends the address it saw last
    return request.client.host if request.client else "unknown"


def too_many_failures(retry_after: int, limit: int, key_id: str | None) -> ApiError:
    what = (f"API key `{key_id}` was sent with a wrong secret more than {limit} times this minute"
            if key_id is not None else
            f"This address sent more than {limit} unknown or revoked API keys this minute")  # fmt: skip
    headers = {"Retry-After": str(retry_after)}
    return ApiError("too_many_auth_failures", f"{what}; retry after {retry_after} s.", headers)


def rate_limited(verdict: Verdict, what: str) -> ApiError:
    headers = verdict.headers()
    wait = headers["Retry-After"]
    return ApiError("rate_limited", f"This API key is over its limit of {what}; retry after {wait} s.", headers)


async def check_rate(limiter: RateLimiter, settings: Settings, p: Principal, kind: str, cost: int) -> Verdict:
    rate = p.rate_limits.get(f"{kind}_per_s") or getattr(settings, f"rate_{kind}_per_s")
    burst = p.rate_limits.get(f"{kind}_burst") or getattr(settings, f"rate_{kind}_burst")
    try:
        verdict = await limiter.check(f"{kind}:{p.key_id}", int(rate), int(burst), cost)
    except RateLimitUnavailable as e:
        # Fail open: limits protect, they do not make answers right. Reads go on
        # while Redis is down; ingestion stops anyway, at dedup, with a 503.
        log.warning("rate limiter unavailable; request let through", extra={"error": str(e)[:200]})
        return Verdict(True, int(burst), int(burst), 0.0, 0.0)
    if not verdict.allowed:
        raise rate_limited(verdict, f"{burst} {kind} at once and {rate} {kind}/s")
    return verdict


def requires(scope: Scope, endpoint: Endpoint) -> Endpoint:
    """The endpoint, behind a key with `scope` (or admin) and the key's request rate."""

    @functools.wraps(endpoint)  # keeps its name and its @operation documentation
    async def guarded(request: Request) -> Response:
        rt = runtime_of(request)
        raw = presented_key(request)
        if not raw:
            raise ApiError("missing_api_key")
        # The key first: a valid key always authenticates, whatever failed before it from this address.
        # An unreachable records database raises RecordsUnavailable: 503 records_unavailable.
        principal = await rt.keys.verify(raw)
        if isinstance(principal, Refused):
            failures = rt.auth_failures
            address = client_address(request, rt.settings.client_address_header)
            if (wait := await failures.failed(address, principal.key_id)) is not None:
                raise too_many_failures(wait, failures.per_minute, principal.key_id)
            raise ApiError("invalid_api_key")
        if not principal.allows(scope):
            raise ApiError("insufficient_scope", f"This key has scope `{principal.scope}`; this route needs `{scope}`.")
        verdict = await check_rate(rt.limiter, rt.settings, principal, "requests", 1)
        request.state.principal = principal
        response = await endpoint(request)
        response.headers.update(verdict.headers())
        return response

    guarded.scope = scope  # type: ignore[attr-defined]  # read by the OpenAPI document
    return guarded
