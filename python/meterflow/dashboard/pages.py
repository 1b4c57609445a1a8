"""The dashboard's pages: each reads the same services the JSON API uses, never the API over HTTP."""

from __future__ import annotations

import asyncio
import hmac
import secrets
from dataclasses import replace
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from meterflow.auth.keys import SCOPES, KeyError_, Refused
from meterflow.dashboard.billing_pages import billing_of
from meterflow.dashboard.guard import (
    form_of,
    principal_of,
    redirect,
    secure,
    session_of,
    sessions_of,
    set_session,
    signed_in,
    to_signin,
)
from meterflow.dashboard.render import page
from meterflow.ingest.dedup import DedupUnavailable
from meterflow.kernel.clock import now_ms
from meterflow.kernel.ids import ID_RE
from meterflow.metering.events import Cursor, EventsError, events_query, list_events
from meterflow.metering.meters import Meter
from meterflow.metering.usage import UsageError, UsageOutOfRange, UsageQuery, query_limits, run_usage, usage_request
from meterflow.metrics import PER_MINUTE
from meterflow.storage.base import QueryLimitExceeded
from meterflow.web.errors import ApiError
from meterflow.web.guard import check_rate, client_address
from meterflow.web.pagination import page_of
from meterflow.web.state import runtime_of
from meterflow.web.views import usage_json

SIGNIN_COOKIE = "mf_signin"  # the sign-in form's own CSRF token, before any session exists
PAGE = 25
HOUR_MS = 3_600_000
PERIODS = {"24h": 24 * HOUR_MS, "7d": 7 * 24 * HOUR_MS, "30d": 30 * 24 * HOUR_MS, "90d": 90 * 24 * HOUR_MS,
           "365d": 365 * 24 * HOUR_MS}  # fmt: skip
WINDOW_PERIOD = {"HOUR": "24h", "DAY": "30d", "MONTH": "365d"}
METERS_SHOWN = 50
ZONES = ("UTC", "Europe/London", "Europe/Paris", "Europe/Berlin", "America/New_York", "America/Chicago",
         "America/Los_Angeles", "Asia/Tokyo", "Asia/Kolkata", "Australia/Sydney")  # fmt: skip


# --- signing in and out ----------------------------------------------------------------------------------------


async def signin_form(request: Request, error: str = "", status: int = 200) -> Response:
    token = secrets.token_urlsafe(16)
    why = request.query_params.get("why")
    notice = "Your session ended: its API key was revoked." if why == "revoked" and not error else ""
    response = page(request, "signin.html", {"error": error, "notice": notice, "signin_token": token}, status)
    response.set_cookie(SIGNIN_COOKIE, token, max_age=3600, path="/dashboard", httponly=True, samesite="strict",
                        secure=secure(request))  # fmt: skip
    return response


async def signin(request: Request) -> Response:
    rt = runtime_of(request)
    form = await form_of(request)
    token, raw = form.get("csrf"), form.get("key")
    expected = request.cookies.get(SIGNIN_COOKIE, "")
    if not (isinstance(token, str) and expected and hmac.compare_digest(token.encode(), expected.encode())):
        return await signin_form(request, "The form's `csrf` token is missing or wrong; try again.", 403)
    # The key first: a valid key always signs in, whatever failed before it from this address.
    principal = await rt.keys.verify(raw.strip()) if isinstance(raw, str) else Refused(None)
    if isinstance(principal, Refused):
        address = client_address(request, rt.settings.client_address_header)
        if (wait := await rt.auth_failures.failed(address, principal.key_id)) is not None:
            return await signin_form(request, f"Too many wrong API keys; retry after {wait} s.", 429)
        return await signin_form(request, "The API key is unknown or revoked.", 401)
    if principal.scope not in ("read", "admin"):
        return await signin_form(request, f"This key has scope `{principal.scope}`; sign in with a `read` or "
                                          "`admin` key.", 403)  # fmt: skip
    try:  # a sign-in stores a session: it counts toward the key's request rate
        await check_rate(rt.limiter, rt.settings, principal, "requests", 1)
    except ApiError as e:
        return await signin_form(request, e.message, 429)
    token, _ = await sessions_of(request).start(principal.key_id)
    response = redirect(request, "/dashboard/")
    set_session(response, request, token)
    response.delete_cookie(SIGNIN_COOKIE, path="/dashboard")
    return response


async def signout(request: Request) -> Response:
    """Ends the session on every worker: its cookie no longer works, whoever holds a copy."""
    await sessions_of(request).end(session_of(request))
    return to_signin(request)


# --- overview --------------------------------------------------------------------------------------------------


async def _overview_context(request: Request) -> dict[str, Any]:
    rt = runtime_of(request)
    m = rt.metrics
    minutes = m.per_minute(180)
    series = {"x": [t // 1000 for t, _ in minutes],
              "series": [{"label": name.removeprefix("meterflow_events_").removesuffix("_total"),
                          "values": [row[i] for _, row in minutes]} for i, name in enumerate(PER_MINUTE)]}  # fmt: skip
    reasons = sorted(((dict(labels).get("reason", "?"), int(v)) for labels, v in
                      m.counter("meterflow_events_failed_total").items()), key=lambda x: -x[1])  # fmt: skip
    totals = {name.removeprefix("meterflow_events_").removesuffix("_total"): int(sum(m.counter(name).values()))
              for name in ("meterflow_events_received_total", *PER_MINUTE)}  # fmt: skip
    probes = rt.probes()
    checks = await asyncio.gather(*(p.check() for p in probes))
    spool = None
    if rt.spool is not None:
        objects, size = rt.spool.depth()
        spool = {"objects": objects, "bytes": size, "max_bytes": rt.spool.max_bytes, "last_error": rt.spool.last_error}
    lag = None
    if rt.ingest.stream is not None:  # async mode: the queue the workers drain
        try:
            lag = (await rt.ingest.stream.lag()).as_json()
        except DedupUnavailable:
            lag = {"unavailable": True}
    return {
        "chart": series, "reasons": reasons, "totals": totals, "lag": lag,
        "p50": m.quantile("meterflow_flush_seconds", 0.5), "p99": m.quantile("meterflow_flush_seconds", 0.99),
        "queued_rows": rt.ingest.flusher.queued_rows, "spool": spool,
        "health": [(p.label, c["status"], p.essential) for p, c in zip(probes, checks, strict=True)],
    }  # fmt: skip


@signed_in
async def overview(request: Request) -> Response:
    return page(request, "overview.html", await _overview_context(request))


@signed_in
async def overview_live(request: Request) -> Response:
    return page(request, "overview_live.html", await _overview_context(request))


# --- customers -------------------------------------------------------------------------------------------------


@signed_in
async def customers(request: Request) -> Response:
    q = request.query_params.get("q", "")[:500]
    cursor = request.query_params.get("cursor", "")
    if not ID_RE.fullmatch(cursor or "x"):
        cursor = ""
    rows = await runtime_of(request).customers.list(cursor, PAGE + 1, q, "")
    shown = page_of(rows, PAGE)
    ctx = {"rows": shown.rows, "q": q, "cursor": cursor, "next_cursor": shown.next_cursor}
    template = "customers_table.html" if request.headers.get("hx-request") else "customers.html"
    return page(request, template, ctx)


def _usage_params(request: Request) -> tuple[dict[str, str], UsageQuery]:
    """The chart's choices as the form shows them, and the usage question they ask (of no meter yet)."""
    q = request.query_params
    window = q.get("window", "DAY").upper()
    window = window if window in WINDOW_PERIOD else "DAY"
    period = q.get("period") or WINDOW_PERIOD[window]
    period = period if period in PERIODS else WINDOW_PERIOD[window]
    tz = q.get("tz", "UTC")[:64] or "UTC"
    end = (now_ms() // HOUR_MS + 1) * HOUR_MS  # the end of the current hour
    group_by = q.get("group_by", "")[:255]
    params = {"window": window, "period": period, "tz": tz, "group_by": group_by}
    return params, UsageQuery("", "", end - PERIODS[period], end, (group_by,) if group_by else (), window, tz)


async def _usage_of(request: Request, customer_id: str, meter: Meter, asked: UsageQuery) -> dict[str, Any]:
    """One meter's usage for the chart: the answer GET /v1/usage gives for the same question, or an error."""
    rt = runtime_of(request)
    group_by = tuple(g for g in asked.group_by if g in meter.group_by)
    try:
        req = await usage_request(replace(asked, customer_id=customer_id, meter=meter.code, group_by=group_by),
                                  rt.meters, rt.settings)  # fmt: skip
        usage = usage_json(await run_usage(rt.storage, req, query_limits(rt.settings)))
        return {"meter": meter, "usage": usage, "error": ""}
    except (UsageError, UsageOutOfRange) as e:
        return {"meter": meter, "usage": None, "error": e.message}
    except QueryLimitExceeded:
        return {"meter": meter, "usage": None, "error": "This query goes over the usage query limits; pick a "
                                                        "shorter period or a larger window."}  # fmt: skip


async def _usage_context(request: Request, customer_id: str) -> dict[str, Any]:
    rt = runtime_of(request)
    params, asked = _usage_params(request)
    meters = [m for m, _ in await rt.meters.list("", METERS_SHOWN)]
    charts = await asyncio.gather(*(_usage_of(request, customer_id, m, asked) for m in meters))
    group_props = sorted({g for m in meters for g in m.group_by})
    return {"params": params, "charts": charts, "group_props": group_props, "periods": list(PERIODS),
            "zones": ZONES, "customer_id": customer_id}  # fmt: skip


@signed_in
async def customer(request: Request) -> Response:
    cid = str(request.path_params["customer_id"])
    found = await runtime_of(request).customers.get(cid) if ID_RE.fullmatch(cid) else None
    if found is None:
        return page(request, "refused.html", {"message": f"There is no customer {cid!r}."}, 404)
    billing = await billing_of(request, cid)
    return page(request, "customer.html", {"customer": found, **billing, **await _usage_context(request, cid)})


@signed_in
async def customer_usage(request: Request) -> Response:
    cid = str(request.path_params["customer_id"])
    if not ID_RE.fullmatch(cid):
        return page(request, "refused.html", {"message": f"There is no customer {cid!r}."}, 404)
    return page(request, "usage.html", await _usage_context(request, cid))


# --- meters ----------------------------------------------------------------------------------------------------


@signed_in
async def meters(request: Request) -> Response:
    rows = await runtime_of(request).meters.list("", 500)
    return page(request, "meters.html", {"meters": [(m, v) for m, v in rows]})


# --- API keys --------------------------------------------------------------------------------------------------


async def _keys_page(request: Request, created: dict[str, Any] | None = None, error: str = "",
                     status: int = 200) -> Response:  # fmt: skip
    rows = await runtime_of(request).keys.list("", 500)
    return page(request, "keys.html", {"keys": rows, "created": created, "error": error, "scopes": SCOPES}, status)


async def _keys(request: Request) -> Response:
    return await _keys_page(request)


async def _create_key(request: Request) -> Response:
    form = await form_of(request)
    scope, name = str(form.get("scope", "")), str(form.get("name", ""))[:200]
    customer = str(form.get("customer_id", "")).strip() or None
    try:
        key, secret = await runtime_of(request).keys.create(scope, name, customer)
    except KeyError_ as e:
        return await _keys_page(request, error=str(e), status=400)
    # The secret is in this answer only: it is never stored, so it can never be shown again.
    return await _keys_page(request, created={**key, "key": secret}, status=201)


async def _revoke_key(request: Request) -> Response:
    key_id = str(request.path_params["key_id"])
    if key_id == principal_of(request).key_id:
        return await _keys_page(request, error="This is the key you signed in with; sign in with another admin "
                                               "key to revoke it.", status=400)  # fmt: skip
    if not await runtime_of(request).keys.revoke(key_id):
        return await _keys_page(request, error=f"There is no active key {key_id!r}.", status=404)
    return redirect(request, "/dashboard/keys")


# As GET and POST /v1/keys and DELETE /v1/keys/{id}: admin only, reading the keys included.
keys = signed_in(_keys, "admin")
create_key = signed_in(_create_key, "admin")
revoke_key = signed_in(_revoke_key, "admin")
signout_ = signed_in(signout)


# --- events explorer -------------------------------------------------------------------------------------------


@signed_in
async def events(request: Request) -> Response:
    rt = runtime_of(request)
    q = request.query_params
    ctx: dict[str, Any] = {"customer_id": q.get("customer_id", ""), "event_type": q.get("event_type", ""),
                           "page": None, "error": ""}  # fmt: skip
    try:
        query = events_query(q.get("customer_id") or None, q.get("event_type") or None, limit=PAGE,
                             bound_customer=principal_of(request).customer_id)  # fmt: skip
        if cursor := q.get("cursor"):
            query = replace(query, cursor=Cursor.decode(cursor))
        ctx["page"] = await list_events(rt.storage, query, query_limits(rt.settings))
    except EventsError as e:
        ctx["error"] = e.message
    except QueryLimitExceeded:
        ctx["error"] = "This search goes over the query limits; name a customer or an event type."
    template = "events_table.html" if request.headers.get("hx-request") else "events.html"
    return page(request, template, ctx)
