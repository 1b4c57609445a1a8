"""POST /v1/events past Starlette's routing: the same answers as the routed app, for every outcome."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp

from meterflow import config, samples
from meterflow.app import IngestFastPath, create_app
from meterflow.config import Settings
from meterflow.web import errors
from tests.harness.backends import Backend
from tests.harness.http import JSON
from tests.harness.meterflow import TEST_ADMIN_KEY

KEY = {"Authorization": f"Bearer {TEST_ADMIN_KEY}", **JSON}


def ingest_requests() -> list[tuple[str, dict[str, str], bytes]]:
    """(label, headers, body): a new batch, the same again, and each refusal the route makes."""
    batch = samples.body(samples.batch(3, seed=91))
    return [
        ("new", KEY, batch),
        ("duplicate", KEY, batch),
        ("no key", JSON, batch),
        ("unknown key", {**KEY, "Authorization": "Bearer mf_" + "y" * 44}, batch),
        ("not json", {**KEY, "Content-Type": "text/plain"}, batch),
        ("bad body", KEY, b"{not json"),
        ("too many events", KEY, samples.body(samples.batch(11, seed=92))),
    ]


# (label, status, (body, the RateLimit headers present, content type))
Answer = tuple[str, int, tuple[Any, list[str], str]]


async def answers(app: ASGIApp, requests: list[tuple[str, dict[str, str], bytes]]) -> list[Answer]:
    transport = httpx.ASGITransport(app=app)
    out: list[Answer] = []
    async with httpx.AsyncClient(transport=transport, base_url="http://mf") as client:
        for label, headers, body in requests:
            r = await client.post("/v1/events", headers=headers, content=body)
            limits = sorted(k for k in r.headers if k.startswith("ratelimit-"))
            out.append((label, r.status_code, (orjson.loads(r.content), limits, r.headers["content-type"])))
    return out


def settings_of(backend: Backend, **overrides: Any) -> Settings:
    return config.load(env={**backend.env, "MF_ADMIN_KEY": TEST_ADMIN_KEY}, overrides=overrides)


async def test_the_fast_path_answers_as_the_routed_app(make_backend: Callable[[str], Backend]) -> None:
    results = []
    for wrap in (False, True):
        app = create_app(settings_of(make_backend("full"), max_events=10, flush_max_wait_ms=5))
        async with app.router.lifespan_context(app):
            results.append(await answers(IngestFastPath(app) if wrap else app, ingest_requests()))
    routed, fast = results
    assert fast == routed
    statuses = {label: status for label, status, _ in fast}
    assert statuses == {"new": 200, "duplicate": 200, "no key": 401, "unknown key": 401, "not json": 415,
                        "bad body": 400, "too many events": 413}  # fmt: skip
    assert fast[0][2][0] == {"accepted": 3, "duplicates": 0, "failed": []}
    assert fast[1][2][0] == {"accepted": 0, "duplicates": 3, "failed": []}
    assert fast[0][2][1] == ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"]


async def test_other_routes_go_to_the_starlette_app(make_backend: Callable[[str], Backend]) -> None:
    app = create_app(settings_of(make_backend("full"), flush_max_wait_ms=5))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=IngestFastPath(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://mf") as client:
            assert (await client.get("/health")).status_code == 200
            batch = samples.body(samples.batch(2, seed=93))
            assert (await client.post("/v1/events", headers=KEY, content=batch)).json()["accepted"] == 2
            page = (await client.get("/v1/events", headers=KEY)).json()  # GET: the routed handler
            assert len(page["data"]) == 2
            assert (await client.get("/v1/events/nowhere", headers=KEY)).status_code == 404


async def test_an_error_handler_that_fails_answers_internal_error_json(make_backend: Callable[[str], Backend]) -> None:
    """As Starlette's ServerErrorMiddleware: the app's `Exception` handler answers, never a bare 500."""
    app = create_app(settings_of(make_backend("full"), flush_max_wait_ms=5))

    async def failing_handler(request: Request, exc: Exception) -> Response:
        raise RuntimeError("the error handler failed")

    app.exception_handlers[errors.ApiError] = failing_handler
    async with app.router.lifespan_context(app):
        ((label, status, (body, _, content_type)),) = await answers(IngestFastPath(app), ingest_requests()[2:3])
    assert (label, status, content_type) == ("no key", 500, "application/json")
    assert body["error"] == "internal_error"
