"""Who may see a dashboard page: a live session of an active read or admin key; changes need admin and a CSRF token."""

from __future__ import annotations

import functools
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from meterflow.auth.keys import Principal
from meterflow.config import data_dir
from meterflow.dashboard.render import page as render
from meterflow.dashboard.sessions import COOKIE, LIFETIME_S, Session, Signer, load_secret
from meterflow.web.errors import ApiError
from meterflow.web.guard import check_rate
from meterflow.web.responses import read_body
from meterflow.web.state import runtime_of

Page = Callable[[Request], Awaitable[Response]]
SIGNIN = "/dashboard/signin"
_signers: dict[Path, Signer] = {}


def signer_of(request: Request) -> Signer:
    """The worker's signer, its secret read (or made) once from the data dir."""
    path = data_dir(runtime_of(request).settings)
    if path not in _signers:
        _signers[path] = Signer(load_secret(path))
    return _signers[path]


def secure(request: Request) -> bool:
    """Behind HTTPS (the request's scheme, or the proxy's X-Forwarded-Proto): the cookie is Secure."""
    proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.url.scheme == "https" or proto == "https"


def set_session(response: Response, request: Request, cookie: str) -> None:
    response.set_cookie(COOKIE, cookie, max_age=LIFETIME_S, path="/dashboard", httponly=True, samesite="strict",
                        secure=secure(request))  # fmt: skip


def to_signin(request: Request, why: str = "") -> Response:
    """A redirect to the sign-in page that also ends the session cookie; htmx follows HX-Redirect."""
    url = SIGNIN + (f"?why={why}" if why else "")
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


def signed_in(page: Page, *, change: bool = False) -> Page:
    """The page behind a session; with `change`, the request must be a POST of an admin key with the CSRF token."""

    @functools.wraps(page)
    async def guarded(request: Request) -> Response:
        signer = signer_of(request)
        session = signer.read(request.cookies.get(COOKIE, ""))
        if session is None:
            return to_signin(request)
        # Looked up on every request: a revoked key ends its sessions (within the key cache's 2 s).
        principal = await runtime_of(request).keys.principal_of(session.key_id)
        if principal is None or principal.scope not in ("read", "admin"):
            return to_signin(request, "revoked")
        request.state.principal = principal
        request.state.csrf = signer.csrf(session)
        try:
            # The key's request rate applies to its pages as to its API calls.
            await check_rate(runtime_of(request).limiter, runtime_of(request).settings, principal, "requests", 1)
            if request.method == "POST":
                await check_csrf(request, signer, session)
            if change and principal.scope != "admin":
                raise Refused(403, f"This key has scope `{principal.scope}`; changes need an `admin` key.")
            return await page(request)
        except Refused as e:
            return render(request, "refused.html", {"message": e.message}, e.status)
        except ApiError as e:  # 429 from the rate limit, 413 or 408 from a form's body
            return render(request, "refused.html", {"message": e.message}, e.status, e.headers)

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


async def check_csrf(request: Request, signer: Signer, session: Session) -> None:
    form = await form_of(request)
    token = form.get("csrf")
    if not isinstance(token, str) or not signer.csrf_ok(session, token):
        raise Refused(403, "The form's `csrf` token is missing or wrong; reload the page and try again.")


def principal_of(request: Request) -> Principal:
    p = request.state.principal
    assert isinstance(p, Principal)
    return p
