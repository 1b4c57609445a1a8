"""Liveness, readiness (each backing service) and metrics."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from meterflow.api.openapi import operation
from meterflow.billing.failures import ClosingFailures
from meterflow.metrics import HELP
from meterflow.web.responses import json_response
from meterflow.web.state import runtime_of

log = logging.getLogger("meterflow.api")


@operation("Liveness: the process answers", {200: "Alive, with the answering worker's process id"})
async def health(request: Request) -> Response:
    # The pid tells the workers apart (a keep-alive connection stays on the one that accepted it).
    return json_response({"status": "ok", "pid": os.getpid()})


@operation("Readiness: each backing service checked", {200: "Every backing service answers",
           503: "A backing service is down or the archive spool is full; `checks` says which."})  # fmt: skip
async def ready(request: Request) -> Response:
    rt = runtime_of(request)
    probes = rt.probes()
    results = await asyncio.gather(*(p.check() for p in probes))
    checks = {p.label: r for p, r in zip(probes, results, strict=True) if p.family != "archive"}
    ok = all(r["status"] == "ok" for p, r in zip(probes, results, strict=True) if p.essential)
    body: dict[str, Any] = {"status": "ready" if ok else "unavailable", "checks": checks,
            "flush_queue_rows": rt.ingest.flusher.queued_rows}  # fmt: skip
    if rt.ingest.stream is not None:
        try:
            lag = await asyncio.wait_for(rt.ingest.stream.lag(), 2)
            # Dead letters need an operator (`meterflow worker dead-letters`), not a restart: shown, not unready.
            body["stream"] = {
                "status": "ok", "length": lag.length, "dead_letters": lag.dead_letters,
                "oldest_pending_age_ms": lag.oldest_pending_age_ms, "workers": len(lag.workers),
            }  # fmt: skip
        except Exception as e:
            error = (str(e) or type(e).__name__)[:500]
            log.warning("readiness check failed", extra={"check": "stream", "error": error})
            body["stream"] = {"status": "down"}
    spool = rt.spool
    if spool is not None:
        # The archive never blocks ingestion: its state is reported, not a reason for 503.
        objects, size = spool.depth()
        check = next(r for p, r in zip(probes, results, strict=True) if p.family == "archive")
        # A code, never the store's own text (/ready needs no key); the uploader logs the detail.
        last_error = "upload_failed" if spool.last_error else None
        body["archive"] = {**check, "spool_objects": objects, "spool_bytes": size,
                           "spool_max_bytes": spool.max_bytes, "last_error": last_error}  # fmt: skip
        if size >= spool.max_bytes:
            ok = False
            body["status"] = "unavailable"
    return json_response(body, 200 if ok else 503)


@operation("Prometheus metrics", {200: "Text format 0.0.4"}, media_type="text/plain")
async def metrics(request: Request) -> Response:
    rt = runtime_of(request)
    # Summed over live workers, each as of the last scrape it answered (the flusher does not report it yet);
    # the gauges below are state every worker sees alike, read now.
    rt.metrics.process_gauge("meterflow_flush_queue_rows", rt.ingest.flusher.queued_rows)
    if rt.spool is not None:
        objects, size = rt.spool.depth()
        rt.metrics.gauges["meterflow_archive_spool_objects"] = objects
        rt.metrics.gauges["meterflow_archive_spool_bytes"] = size
    try:
        rt.metrics.gauges["meterflow_closing_failures"] = await ClosingFailures(rt.records).count()
    except Exception as e:  # the records database may be down: the other metrics are still worth serving
        log.warning("closing metrics unavailable", extra={"error": (str(e) or type(e).__name__)[:500]})
    extra = ""
    if rt.ingest.stream is not None:
        try:
            lag = await asyncio.wait_for(rt.ingest.stream.lag(), 2)
        except Exception as e:  # the other metrics are still worth serving
            log.warning("stream metrics unavailable", extra={"error": (str(e) or type(e).__name__)[:500]})
        else:
            rt.metrics.gauges["meterflow_stream_length"] = lag.length
            rt.metrics.gauges["meterflow_stream_oldest_pending_seconds"] = lag.oldest_pending_age_ms / 1000
            rt.metrics.gauges["meterflow_stream_dead_letters"] = lag.dead_letters
            name = "meterflow_worker_rows_per_second"
            extra = f"# HELP {name} {HELP[name]}\n# TYPE {name} gauge\n" + "".join(
                f'{name}{{worker="{w}"}} {s["rows_per_s"]:g}\n' for w, s in sorted(lag.workers.items())
            )
    return PlainTextResponse(rt.metrics.render() + extra, media_type="text/plain; version=0.0.4")
