"""What browsers are told: HSTS when the site is declared HTTPS, a CSP on every HTML answer, and redirects
whose Location comes from the configured public URL (or is relative), never from the request's Host."""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import RedirectResponse
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meterflow.config import Settings

# An invoice's or credit note's HTML document: its own inline styles, nothing else, framed only by this site
# (the dashboard's invoice page). A header, not a <meta>: a frozen document's bytes never change.
DOCUMENT_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'self'; base-uri 'none'; form-action 'none'"
)
# Any other HTML answer that did not set its own policy (the dashboard's pages do): nothing at all.
FALLBACK_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"


def is_secure(request: Request, settings: Settings) -> bool:
    """The answer goes to a browser over HTTPS: declared so (MF_COOKIE_SECURE), the request's scheme, or the
    proxy's X-Forwarded-Proto."""
    proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return settings.cookie_secure or request.url.scheme == "https" or proto == "https"


def location(settings: Settings, path: str) -> str:
    """A redirect's Location for a path of this server: MF_PUBLIC_URL's origin and the path, or the path alone."""
    path = "/" + path.lstrip("/")  # never "//host": a relative reference must stay on this site
    return settings.public_url.rstrip("/") + path


class BrowserHeaders:
    """ASGI middleware: `Strict-Transport-Security` on every answer when MF_COOKIE_SECURE is on, and a
    Content-Security-Policy on every `text/html` answer that has none of its own."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.hsts = f"max-age={settings.hsts_max_age_s}" if settings.cookie_secure else ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if self.hsts:
                    headers.setdefault("strict-transport-security", self.hsts)
                if headers.get("content-type", "").startswith("text/html"):
                    headers.setdefault("content-security-policy", FALLBACK_CSP)
            await send(message)

        await self.app(scope, receive, send_with_headers)


class SlashRedirect:
    """A router's answer to a path no route matches: 307 to the same path with its trailing slash added or
    removed when that one matches (Starlette's `redirect_slashes`, which builds the Location from Host),
    else the router's own 404."""

    def __init__(self, router: Router, settings: Settings) -> None:
        self.router, self.settings, self.not_found = router, settings, router.default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        other = path.rstrip("/") if path.endswith("/") else path + "/"
        if scope["type"] == "http" and other.startswith("/") and not other.startswith("//"):
            toggled = {**scope, "path": other}
            if any(route.matches(toggled)[0] is not Match.NONE for route in self.router.routes):
                query = scope.get("query_string", b"").decode("latin-1")
                url = location(self.settings, other + (f"?{query}" if query else ""))
                await RedirectResponse(url, status_code=307)(scope, receive, send)
                return
        await self.not_found(scope, receive, send)


def redirect_slashes(router: Router, settings: Settings) -> None:
    """Replaces the router's own trailing-slash redirect with SlashRedirect."""
    router.redirect_slashes = False
    router.default = SlashRedirect(router, settings)
