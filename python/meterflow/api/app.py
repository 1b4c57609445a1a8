"""The Starlette application: routes, error mapping and the lifespan of the stages."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route

from meterflow import config
from meterflow.api import errors
from meterflow.api.events import post_events
from meterflow.api.health import health, metrics, ready
from meterflow.api.meters import create_meter, delete_meter, get_meter, list_meters, put_meter
from meterflow.api.openapi import openapi
from meterflow.api.usage import get_usage
from meterflow.ingest.dedup import open_dedup
from meterflow.ingest.service import IngestService
from meterflow.logs import setup_logging
from meterflow.metering.catalog import MeterCatalog
from meterflow.metrics import Metrics
from meterflow.storage import open_storage

log = logging.getLogger("meterflow.app")


def create_app(settings: config.Settings | None = None) -> Starlette:
    settings = settings or config.load()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        storage = open_storage(settings)
        dedup = open_dedup(settings)
        await storage.start()
        await dedup.start()
        service = IngestService(settings, storage, dedup, Metrics())
        await service.warm()
        app.state.ingest = service
        app.state.settings = settings
        app.state.storage = storage
        app.state.meters = MeterCatalog(storage, settings.meters)
        log.info("ready", extra={"storage": storage.name, "dedup": dedup.name})
        try:
            yield
        finally:
            # SIGTERM: Granian has stopped taking requests; flush what is queued.
            await service.flusher.drain()
            await dedup.close()
            await storage.close()
            log.info("stopped")

    routes = [
        Route("/v1/events", post_events, methods=["POST"]),
        Route("/v1/meters", list_meters, methods=["GET"]),
        Route("/v1/meters", create_meter, methods=["POST"]),
        Route("/v1/meters/{code}", get_meter, methods=["GET"]),
        Route("/v1/meters/{code}", put_meter, methods=["PUT"]),
        Route("/v1/meters/{code}", delete_meter, methods=["DELETE"]),
        Route("/v1/usage", get_usage, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            errors.ApiError: errors.api_error,
            HTTPException: errors.http_error,
            Exception: errors.internal_error,
        },
    )


def app_factory() -> Starlette:
    """Granian's entry point in each worker: settings come from the environment."""
    settings = config.load()
    setup_logging(settings)
    return create_app(settings)
