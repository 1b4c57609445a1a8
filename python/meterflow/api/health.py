"""Liveness, readiness (each backing service) and metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from meterflow.api.openapi import operation
from meterflow.api.responses import json_response
from meterflow.ingest.archive import ArchiveError
from meterflow.ingest.dedup import DedupUnavailable
from meterflow.ingest.service import IngestService
from meterflow.storage import StorageError

log = logging.getLogger("meterflow.api")


@operation("Liveness: the process answers", {200: "Alive"})
async def health(request: Request) -> Response:
    return json_response({"status": "ok"})


async def _check(name: str, probe: Awaitable[None]) -> tuple[str, dict[str, str]]:
    try:
        await asyncio.wait_for(probe, 2)
    except (StorageError, DedupUnavailable, ArchiveError, TimeoutError, OSError) as e:
        # /ready needs no key: the service's own text (hosts, versions) goes to the log only.
        log.warning("readiness check failed", extra={"check": name, "error": (str(e) or type(e).__name__)[:500]})
        return name, {"status": "down"}
    return name, {"status": "ok"}


@operation("Readiness: each backing service checked", {200: "Every backing service answers",
           503: "A backing service is down or the archive spool is full; `checks` says which."})  # fmt: skip
async def ready(request: Request) -> Response:
    service: IngestService = request.app.state.ingest
    checks = dict(
        await asyncio.gather(
            _check(f"storage:{service.storage.name}", service.storage.ping()),
            _check(f"dedup:{service.dedup.name}", service.dedup.ping()),
        )
    )
    ok = all(c["status"] == "ok" for c in checks.values())
    body: dict[str, Any] = {"status": "ready" if ok else "unavailable", "checks": checks,
            "flush_queue_rows": service.flusher.queued_rows}  # fmt: skip
    spool = service.spool
    if spool is not None:
        # The archive never blocks ingestion: its state is reported, not a reason for 503.
        objects, size = spool.depth()
        _, check = await _check(f"archive:{spool.store.name}", spool.store.ping())
        body["archive"] = {**check, "spool_objects": objects, "spool_bytes": size,
                           "spool_max_bytes": spool.max_bytes, "last_error": spool.last_error}  # fmt: skip
        if size >= spool.max_bytes:
            ok = False
            body["status"] = "unavailable"
    return json_response(body, 200 if ok else 503)


@operation("Prometheus metrics", {200: "Text format 0.0.4"}, media_type="text/plain")
async def metrics(request: Request) -> Response:
    service: IngestService = request.app.state.ingest
    service.metrics.gauges["meterflow_flush_queue_rows"] = service.flusher.queued_rows
    if service.spool is not None:
        objects, size = service.spool.depth()
        service.metrics.gauges["meterflow_archive_spool_objects"] = objects
        service.metrics.gauges["meterflow_archive_spool_bytes"] = size
    return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")
