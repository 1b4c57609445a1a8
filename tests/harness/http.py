"""HTTP for the tests: the one JSON content-type header, and one way to post a body to or get a path from a
MeterFlow server (with its admin key) or an `httpx.Client` (with its own base URL and headers), and the
dashboard's sign-in."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

import httpx
import orjson

from meterflow import samples
from tests.harness.meterflow import MeterFlowServer

JSON: Final[Mapping[str, str]] = {"Content-Type": "application/json"}

To = MeterFlowServer | httpx.Client


def _auth(to: To, auth: Mapping[str, str] | None) -> Mapping[str, str]:
    """A server's admin key unless `auth` says otherwise (`{}`: no key); a client's own headers plus `auth`."""
    if auth is None:
        return to.auth if isinstance(to, MeterFlowServer) else {}
    return auth


def _timeout(timeout: float | None) -> dict[str, float]:
    return {} if timeout is None else {"timeout": timeout}


def post(to: To, path: str, body: bytes | Any, *, auth: Mapping[str, str] | None = None,
         headers: Mapping[str, str] | None = None, timeout: float | None = None) -> httpx.Response:  # fmt: skip
    """POST `body` (bytes as they are, anything else as JSON) to `path` as JSON; `headers` go last.
    `timeout`: 30 s to a server, the client's own to a client, unless given."""
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    sent = {**JSON, **_auth(to, auth), **(headers or {})}
    if isinstance(to, httpx.Client):
        return to.post(path, content=content, headers=sent, **_timeout(timeout))
    return httpx.post(f"{to.url}{path}", content=content, headers=sent, timeout=timeout or 30)


def post_events(to: To, events: list[dict[str, Any]], **kw: Any) -> httpx.Response:
    """POST /v1/events with `events` as the batch (`post`'s keywords)."""
    return post(to, "/v1/events", samples.body(events), **kw)


def get(to: To, path: str, *, params: Mapping[str, Any] | None = None, auth: Mapping[str, str] | None = None,
        timeout: float | None = None) -> httpx.Response:  # fmt: skip
    """GET `path` with the server's admin key (or `auth`, as `post`)."""
    if isinstance(to, httpx.Client):
        return to.get(path, params=params, headers=_auth(to, auth), **_timeout(timeout))
    return httpx.get(f"{to.url}{path}", params=params, headers=_auth(to, auth), timeout=timeout or 30)


def sign_in(c: httpx.Client, key: str) -> None:
    """Signs `c` (a client with a server's base URL) in to the dashboard with `key`: the sign-in form's CSRF
    token, then the session cookie, which `c` keeps."""
    form = c.get("/dashboard/signin").text
    token = re.search(r'name="csrf" value="([^"]+)"', form)
    assert token, form
    r = c.post("/dashboard/signin", data={"csrf": token.group(1), "key": key}, follow_redirects=False)
    assert r.status_code == 303, r.text
