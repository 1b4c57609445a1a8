"""The dashboard's Jinja2 templates (autoescaped), their filters, and the headers every page carries."""

from __future__ import annotations

from typing import Any

import jinja2
from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import HTMLResponse

from meterflow.dashboard.format import FILTERS, json_script

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("meterflow.dashboard", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters.update(FILTERS)
_env.filters["json_script"] = lambda data: Markup(json_script(data))

# Everything comes from this server: no inline script, no other origin, no framing.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "frame-ancestors 'none'; frame-src 'self'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def page(
    request: Request, template: str, context: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> HTMLResponse:
    """A rendered template; the signed-in key and the CSRF token are in every context."""
    state = request.state
    ctx = {
        "request": request,
        "principal": getattr(state, "principal", None),
        "csrf": getattr(state, "csrf", ""),
        "path": request.url.path,
        **context,
    }
    return HTMLResponse(
        _env.get_template(template).render(ctx), status_code=status, headers={**HEADERS, **(headers or {})}
    )
