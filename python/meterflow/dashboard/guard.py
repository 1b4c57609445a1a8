"""Who may see a dashboard page: a live session of an active key with the scope the API asks for the same data;
changes are POSTs of an admin key with the session's CSRF token."""

from __future__ import annotations

import functools
import urllib.parse
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from meterflow.auth.keys import Principal, Scope
from meterflow.dashboard.render import page as render
from meterflow.dashboard.sessions import COOKIE, Session, Sessions
from meterflow.web.browser import is_secure, location
from meterflow.web.errors import ApiError
from meterflow.web.guard import check_rate
from meterflow.web.responses import read_body
from meterflow.web.state import runtime_of

Page = Callable[[Request], Awaitable[Response]]
SIGNIN = "/dashboard/signin"


def sessions_of(request: Request) -> Sessions:
    rt = runtime_of(request)
    return Sessions(rt.records, rt.settings.dashboard_session_s)


def secure(request: Request) -> bool:
    """The cookie is Secure: MF_COOKIE_SECURE, or the request came over HTTPS (its scheme or X-Forwarded-Proto)."""
    return is_secure(request, runtime_of(request).settings)


def redirect(request: Request, path: str) -> Response:
    """A 303 to a dashboard path, its Location from MF_PUBLIC_URL or relative (never the Host header)."""
    return RedirectResponse(location(runtime_of(request).settings, path), status_code=303)


def set_session(response: Response, request: Request, token: str) -> None:
    response.set_cookie(COOKIE, token, max_age=runtime_of(request).settings.dashboard_session_s, path="/dashboard",
                        httponly=True, samesite="strict", secure=secure(request))  # fmt: skip


def to_signin(request: Request, why: str = "") -> Response:
    """A redirect to the sign-in page that also drops the session cookie; htmx follows HX-Redirect."""
    url = location(runtime_of(request).settings, SIGNIN + (f"?why={why}" if why else ""))
    response: Response
    if request.headers.get("hx-request"):
        response = Response(status_code=200, headers={"HX-Redirect": url})
    else:
        response = RedirectResponse(url, status_code=303)
    response.delete_cookie(COOKIE, path="/dashboard", httponly=True, samesite="strict", secure=secure(request))
    return response


class Refused(Exception):
    """A change the signed-in key may not make, or a form without its CSRF token."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def signed_in(page: Page, scope: Scope = "read") -> Page:
    """The page behind a session of a key that `allows(scope)`, as `requires(scope, ...)` guards the API route of
    the same data; a POST must carry the session's CSRF token. The scope is kept on the page (`page.scope`)."""

    @functools.wraps(page)
    async def guarded(request: Request) -> Response:
        rt = runtime_of(request)
        # Signed out, expired, revoked key: no session (one query; every worker sees the same rows).
        session = await sessions_of(request).read(request.cookies.get(COOKIE, ""))
        if session is None:
            return to_signin(request)
        # The key's row decides revocation (read with the session); its scope comes from the key cache.
        # The row stays until it expires, so every later request says why as well.
        principal = None if session.key_revoked else await rt.keys.principal_of(session.key_id)
        if principal is None or principal.scope not in ("read", "admin"):
            return to_signin(request, "revoked")
        request.state.principal = principal
        request.state.session = session
        request.state.csrf = session.csrf
        try:
            # The key's request rate applies to its pages as to its API calls.
            await check_rate(rt.limiter, rt.settings, principal, "requests", 1)
            if request.method == "POST":
                await check_csrf(request, session)
            if not principal.allows(scope):
                what = "changes need" if request.method == "POST" else "this page needs"
                raise Refused(403, f"This key has scope `{principal.scope}`; {what} an `{scope}` key.")
            return await page(request)
        except Refused as e:
            return render(request, "refused.html", {"message": e.message}, e.status)
        except ApiError as e:  # 429 from the rate limit, 413 or 408 from a form's body
            return render(request, "refused.html", {"message": e.message}, e.status, e.headers)

    guarded.scope = scope  # type: ignore[attr-defined]  # compared with the API's scopes by the tests
    return guarded


FORM_MAX = 16_384  # bytes of a dashboard form (a key, a name, a token)


async def form_of(request: Request) -> dict[str, str]:
    """The url-encoded form of a POST, read once, at most FORM_MAX bytes (413 past it); a repeated name: the last."""
    cached = getattr(request.state, "form", None)
    if cached is None:
        body = await read_body(request, FORM_MAX, runtime_of(request).settings.http_body_timeout_s)
        cached = dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        request.state.form = cached
    return cached


async def check_csrf(request: Request, session: Session) -> None:
    form = await form_of(request)
    token = form.get("csrf")
    if not isinstance(token, str) or not session.csrf_ok(token):
        raise Refused(403, "The form's `csrf` token is missing or wrong; reload the page and try again.")


def principal_of(request: Request) -> Principal:
    p = request.state.principal
    assert isinstance(p, Principal)
    return p


def session_of(request: Request) -> Session:
    s = request.state.session
    assert isinstance(s, Session)
    return s
