"""The Starlette application: routes, error mapping and the lifespan of the stages."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from sqlalchemy.exc import DBAPIError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, Router
from starlette.types import Receive, Scope, Send

from meterflow import config
from meterflow.api.closing import list_closing_failures
from meterflow.api.credit_notes import get_credit_note, get_credit_note_html, get_credit_note_pdf, list_credit_notes
from meterflow.api.customers import delete_customer, get_customer, list_customers, patch_customer, put_customer
from meterflow.api.events import events_lag, get_events, post_events
from meterflow.api.health import health, metrics, ready
from meterflow.api.invoices import (
    create_credit_note,
    finalize_invoice,
    get_invoice,
    get_invoice_html,
    get_invoice_pdf,
    list_invoices,
    mark_invoice_paid,
    void_invoice,
)
from meterflow.api.keys import create_key, list_keys, revoke_key
from meterflow.api.meters import create_meter, delete_meter, get_meter, list_meter_versions, list_meters, put_meter
from meterflow.api.openapi import openapi
from meterflow.api.plans import create_plan, delete_plan, get_plan, list_plans, put_plan
from meterflow.api.subscriptions import (
    cancel_subscription,
    change_subscription,
    create_subscription,
    get_subscription,
    list_subscriptions,
    upcoming_invoice,
)
from meterflow.api.usage import get_usage
from meterflow.api.webhooks import create_webhook, delete_webhook, list_deliveries, list_webhooks
from meterflow.auth.keys import KeyStore
from meterflow.dashboard.routes import dashboard_mount
from meterflow.logs import setup_logging
from meterflow.records import RecordsUnavailable, StaleVersion
from meterflow.runtime import running
from meterflow.storage import StorageError
from meterflow.web import errors
from meterflow.web.browser import BrowserHeaders, redirect_slashes
from meterflow.web.guard import requires

log = logging.getLogger("meterflow.app")
INGEST_PATH = "/v1/events"


def create_app(settings: config.Settings | None = None) -> Starlette:
    settings = settings or config.load()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        config.data_dir(settings)
        async with running(settings) as rt:
            app.state.runtime = rt
            await bootstrap_admin_key(settings, rt.keys)
            log.info("ready", extra={"storage": rt.storage.name, "dedup": rt.dedup.name, "records": rt.records.name})
            yield
        log.info("stopped")

    dashboard = dashboard_mount()
    # Every route but /health and /ready needs a key with the named scope (or admin).
    routes = [
        Route(INGEST_PATH, requires("ingest", post_events), methods=["POST"]),
        Route("/v1/events", requires("read", get_events), methods=["GET"]),
        Route("/v1/events/lag", requires("read", events_lag), methods=["GET"]),
        Route("/v1/meters", requires("read", list_meters), methods=["GET"]),
        Route("/v1/meters", requires("admin", create_meter), methods=["POST"]),
        Route("/v1/meters/{code}", requires("read", get_meter), methods=["GET"]),
        Route("/v1/meters/{code}", requires("admin", put_meter), methods=["PUT"]),
        Route("/v1/meters/{code}", requires("admin", delete_meter), methods=["DELETE"]),
        Route("/v1/meters/{code}/versions", requires("read", list_meter_versions), methods=["GET"]),
        Route("/v1/usage", requires("read", get_usage), methods=["GET"]),
        Route("/v1/customers", requires("read", list_customers), methods=["GET"]),
        Route("/v1/customers/{customer_id}", requires("read", get_customer), methods=["GET"]),
        Route("/v1/customers/{customer_id}", requires("admin", put_customer), methods=["PUT"]),
        Route("/v1/customers/{customer_id}", requires("admin", patch_customer), methods=["PATCH"]),
        Route("/v1/customers/{customer_id}", requires("admin", delete_customer), methods=["DELETE"]),
        Route("/v1/customers/{customer_id}/upcoming_invoice", requires("read", upcoming_invoice), methods=["GET"]),
        Route("/v1/plans", requires("read", list_plans), methods=["GET"]),
        Route("/v1/plans", requires("admin", create_plan), methods=["POST"]),
        Route("/v1/plans/{code}", requires("read", get_plan), methods=["GET"]),
        Route("/v1/plans/{code}", requires("admin", put_plan), methods=["PUT"]),
        Route("/v1/plans/{code}", requires("admin", delete_plan), methods=["DELETE"]),
        Route("/v1/subscriptions", requires("read", list_subscriptions), methods=["GET"]),
        Route("/v1/subscriptions", requires("admin", create_subscription), methods=["POST"]),
        Route("/v1/subscriptions/{subscription_id}", requires("read", get_subscription), methods=["GET"]),
        Route("/v1/subscriptions/{subscription_id}/cancel", requires("admin", cancel_subscription), methods=["POST"]),
        Route("/v1/subscriptions/{subscription_id}/change", requires("admin", change_subscription), methods=["POST"]),
        Route("/v1/keys", requires("admin", list_keys), methods=["GET"]),
        Route("/v1/keys", requires("admin", create_key), methods=["POST"]),
        Route("/v1/keys/{key_id}", requires("admin", revoke_key), methods=["DELETE"]),
        Route("/v1/invoices", requires("read", list_invoices), methods=["GET"]),
        # The documents first: `{invoice_id}` alone would also match "inv_....pdf".
        Route("/v1/invoices/{invoice_id}.html", requires("read", get_invoice_html), methods=["GET"]),
        Route("/v1/invoices/{invoice_id}.pdf", requires("read", get_invoice_pdf), methods=["GET"]),
        Route("/v1/invoices/{invoice_id}", requires("read", get_invoice), methods=["GET"]),
        Route("/v1/invoices/{invoice_id}/finalize", requires("admin", finalize_invoice), methods=["POST"]),
        Route("/v1/invoices/{invoice_id}/void", requires("admin", void_invoice), methods=["POST"]),
        Route("/v1/invoices/{invoice_id}/mark_paid", requires("admin", mark_invoice_paid), methods=["POST"]),
        Route("/v1/invoices/{invoice_id}/credit_notes", requires("admin", create_credit_note), methods=["POST"]),
        Route("/v1/closing/failures", requires("read", list_closing_failures), methods=["GET"]),
        Route("/v1/credit_notes", requires("read", list_credit_notes), methods=["GET"]),
        Route("/v1/credit_notes/{credit_note_id}.html", requires("read", get_credit_note_html), methods=["GET"]),
        Route("/v1/credit_notes/{credit_note_id}.pdf", requires("read", get_credit_note_pdf), methods=["GET"]),
        Route("/v1/credit_notes/{credit_note_id}", requires("read", get_credit_note), methods=["GET"]),
        Route("/v1/webhooks", requires("admin", list_webhooks), methods=["GET"]),
        Route("/v1/webhooks", requires("admin", create_webhook), methods=["POST"]),
        Route("/v1/webhooks/{webhook_id}", requires("admin", delete_webhook), methods=["DELETE"]),
        Route("/v1/webhooks/{webhook_id}/deliveries", requires("admin", list_deliveries), methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", requires("read", metrics), methods=["GET"]),
        Route("/openapi.json", requires("read", openapi), methods=["GET"]),
        dashboard,
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        # HSTS (MF_COOKIE_SECURE) and a CSP on every HTML answer; the ingest fast path (JSON) goes past it.
        middleware=[Middleware(BrowserHeaders, settings=settings)],
        exception_handlers={
            errors.ApiError: errors.api_error,
            StaleVersion: errors.precondition_failed,
            RecordsUnavailable: errors.records_unavailable,
            DBAPIError: errors.record_rejected,
            HTTPException: errors.http_error,
            StorageError: errors.storage_error,
            Exception: errors.internal_error,
        },
    )
    # A trailing-slash redirect's Location from MF_PUBLIC_URL or relative, never from Host; the dashboard's
    # own router redirects its paths (/dashboard/customers/ → /dashboard/customers).
    for router in (app.router, dashboard.app):
        if isinstance(router, Router):
            redirect_slashes(router, settings)
    return app


async def bootstrap_admin_key(settings: config.Settings, keys: KeyStore) -> None:
    """Embedded first start: make an admin key, show it once, keep it in data_dir/admin.key."""
    if not settings.embedded or settings.admin_key or await keys.any_exist():
        return
    _, secret = await keys.create("admin", "bootstrap")
    path = config.data_dir(settings) / "admin.key"
    path.unlink(missing_ok=True)  # a key file from a wiped store names no key
    # Created 0600 in one call: the secret is never readable by others, not even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    # Shown once on the console (never through the logs), as a new key is.
    print(f"meterflow: first start: admin API key {secret} (also saved to {path})", file=sys.stderr, flush=True)


class IngestFastPath:
    """ASGI: `POST /v1/events`, the hot path (one request per event at batch 1), goes
    straight to the endpoint its route holds (key, scope and rate checks included)
    and to the app's own error handlers, past Starlette's routing and middleware
    layers; every other request goes to the Starlette app. Same answers, less
    work per request."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.endpoint = next(
            r.endpoint for r in app.routes
            if isinstance(r, Route) and r.path == INGEST_PATH and "POST" in (r.methods or ())
        )  # fmt: skip
        self.handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = app.exception_handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != INGEST_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scope["app"] = self.app  # where the routes find the runtime, as Starlette sets it
        request = Request(scope, receive, send)
        try:
            response = await self.endpoint(request)
        except Exception as exc:
            response = await self._error_response(request, exc)
        await response(scope, receive, send)

    async def _error_response(self, request: Request, exc: Exception) -> Response:
        # The handler of the nearest class, as Starlette's middleware picks it (Exception: 500).
        handler = next(self.handlers[c] for c in type(exc).__mro__ if c in self.handlers)
        last = self.handlers.get(Exception, errors.internal_error)
        try:
            return await handler(request, exc)
        except Exception as failed:
            if handler is last:
                raise
            # A handler that fails itself: the last resort answers (internal_error JSON), as
            # Starlette's ServerErrorMiddleware does, never Granian's bare 500.
            return await last(request, failed)


def app_factory() -> IngestFastPath:
    """Granian's entry point in each worker: settings come from the environment."""
    settings = config.load()
    setup_logging(settings)
    return IngestFastPath(create_app(settings))
