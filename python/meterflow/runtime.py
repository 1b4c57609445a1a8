"""The one place that opens, checks and closes every backend, and the typed state the routes read."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.requests import Request

from meterflow.archive import Spool, Store, open_store
from meterflow.auth.failures import AuthFailures
from meterflow.auth.keys import KeyStore
from meterflow.auth.ratelimit import RateLimiter, open_rate_limiter
from meterflow.billing.catalog import PlanCatalog
from meterflow.billing.closing import close_periodically
from meterflow.billing.credit_notes import CreditNotes
from meterflow.billing.invoices import Invoices
from meterflow.billing.outbox import Schedule, Sender
from meterflow.billing.snapshot import take_snapshot
from meterflow.billing.subscriptions import Subscriptions
from meterflow.billing.webhooks import Webhooks
from meterflow.clock import SYSTEM, Clock
from meterflow.config import Settings
from meterflow.customers import Customers
from meterflow.ingest.dedup import Dedup, open_dedup
from meterflow.ingest.service import IngestService
from meterflow.metering.catalog import MeterCatalog
from meterflow.metrics import Metrics
from meterflow.records import Records, open_records
from meterflow.records.legacy import import_documents
from meterflow.storage import Storage, open_storage

log = logging.getLogger("meterflow.runtime")

# A request allocates a few hundred short-lived objects; at the default gen-0
# threshold (700) the collector ran every couple of requests and took a third of a
# loaded worker's CPU at batch 1 (py-spy, `make loadtest --profile`).
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """A started worker's objects move out of the collector's sight (gc.freeze) and
    young collections run less often: they found little garbage per run."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class Backend(Protocol):
    """What every backend family (storage, dedup, archive store, records, rate limiter) offers."""

    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raises when the backend does not answer."""


@dataclass(frozen=True)
class Probe:
    """A backend as /ready reports it; a non-essential one down does not make the server unready."""

    family: str
    backend: Backend
    essential: bool = True

    @property
    def label(self) -> str:
        return f"{self.family}:{self.backend.name}"


@contextlib.asynccontextmanager
async def started(*backends: Backend) -> AsyncIterator[None]:
    """Starts the backends in order and closes the started ones in reverse, whatever happens."""
    async with contextlib.AsyncExitStack() as stack:
        for backend in backends:
            await backend.start()
            stack.push_async_callback(backend.close)
        yield


@dataclass(frozen=True)
class Runtime:
    """Everything a request may use, opened once per worker."""

    settings: Settings
    metrics: Metrics
    storage: Storage
    dedup: Dedup
    records: Records
    limiter: RateLimiter
    archive: Store | None
    spool: Spool | None
    ingest: IngestService
    customers: Customers
    keys: KeyStore
    auth_failures: AuthFailures
    meters: MeterCatalog
    invoices: Invoices
    webhooks: Webhooks
    plans: PlanCatalog
    subscriptions: Subscriptions
    credit_notes: CreditNotes
    clock: Clock

    def probes(self) -> list[Probe]:
        probes = [Probe("storage", self.storage), Probe("dedup", self.dedup), Probe("records", self.records),
                  # Limits fail open, failed-auth counts fall back to the worker's own and the archive
                  # spools: none of them makes the server unready.
                  Probe("ratelimit", self.limiter, essential=False),
                  Probe("authfailures", self.auth_failures, essential=False)]  # fmt: skip
        if self.archive is not None:
            probes.append(Probe("archive", self.archive, essential=False))
        return probes


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Runtime]:
    """A worker's runtime: backends started, records migrated and imported, ingest warmed;
    at exit the flush queue drained, the spool uploaded once more, every backend closed."""
    storage, dedup, records = open_storage(settings), open_dedup(settings), open_records(settings)
    limiter, archive = open_rate_limiter(settings), open_store(settings)
    metrics = Metrics()
    spool = Spool(settings, archive, metrics) if archive is not None else None
    auth_failures = AuthFailures(settings.auth_failures_per_minute,
                                 settings.redis_url if settings.dedup == "redis" else None)  # fmt: skip
    async with started(storage, dedup, records, limiter, auth_failures, *([archive] if archive is not None else [])):
        await import_documents(storage, records)
        meters = MeterCatalog(records, settings.meters, late_window_ms=settings.max_age_ms + settings.max_future_ms)
        plans = PlanCatalog(records, meters, settings.plans)
        await plans.start()
        service = IngestService(settings, storage, dedup, metrics, spool)
        await service.warm()
        if spool is not None:
            spool.start()
        customers = Customers(records)
        rt = Runtime(
            settings=settings, metrics=metrics, storage=storage, dedup=dedup, records=records, limiter=limiter,
            archive=archive, spool=spool, ingest=service, customers=customers,
            keys=KeyStore(records, settings.admin_key, settings.key_cache_grace_s),
            auth_failures=auth_failures,
            meters=meters, plans=plans, subscriptions=Subscriptions(records, plans),
            invoices=open_invoices(settings, records, archive, customers, meters), webhooks=Webhooks(records),
            credit_notes=CreditNotes(records), clock=SYSTEM,
        )  # fmt: skip
        sender = Sender(records, webhook_schedule(settings))
        sender.start()
        closing = asyncio.create_task(close_periodically(rt, settings.invoice_close_interval_s), name="closing")
        tune_gc()
        try:
            yield rt
        finally:
            closing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await closing
            await sender.stop()
            # SIGTERM: Granian has stopped taking requests; flush what is queued.
            await service.flusher.drain()
            if spool is not None:
                await spool.stop()
                try:  # a last upload; what fails stays spooled for the next start
                    await asyncio.wait_for(spool.drain_once(), 10)
                except Exception as e:
                    log.warning("archive left spooled at shutdown", extra={"error": str(e)[:300]})
            metrics.close()  # this worker's flush queue no longer counts in /metrics


@dataclass(frozen=True)
class ClosingRuntime:
    """What `meterflow invoices close` needs, without the ingest path: records, storage, catalogs, invoices."""

    settings: Settings
    storage: Storage
    records: Records
    meters: MeterCatalog
    plans: PlanCatalog
    subscriptions: Subscriptions
    invoices: Invoices
    credit_notes: CreditNotes
    customers: Customers
    clock: Clock

    @classmethod
    @contextlib.asynccontextmanager
    async def opened(cls, settings: Settings, archive: Store | None) -> AsyncIterator[ClosingRuntime]:
        storage, records = open_storage(settings), open_records(settings)
        async with started(storage, records, *([archive] if archive is not None else [])):
            meters = MeterCatalog(records, settings.meters, late_window_ms=settings.max_age_ms + settings.max_future_ms)
            plans = PlanCatalog(records, meters, settings.plans)
            await plans.start()
            customers = Customers(records)
            yield cls(settings, storage, records, meters, plans, Subscriptions(records, plans),
                      open_invoices(settings, records, archive, customers, meters), CreditNotes(records), customers,
                      SYSTEM)  # fmt: skip


def open_invoices(settings: Settings, records: Records, archive: Store | None, customers: Customers,
                  meters: MeterCatalog, clock: Clock = SYSTEM) -> Invoices:  # fmt: skip
    """The invoice store, freezing seller, buyer, zone, locale and units into each invoice it finalizes."""

    async def snapshot(invoice: dict[str, Any]) -> dict[str, Any]:
        return await take_snapshot(customers, meters, settings, invoice)

    return Invoices(records, archive, settings.invoice_due_days, clock=clock, snapshot=snapshot)


def webhook_schedule(settings: Settings) -> Schedule:
    return Schedule(first_ms=settings.webhook_backoff_ms, max_ms=settings.webhook_backoff_max_ms,
                    give_up_ms=settings.webhook_retry_for_s * 1000, timeout_ms=settings.webhook_timeout_ms,
                    poll_ms=settings.webhook_poll_ms)  # fmt: skip


def runtime_of(request: Request) -> Runtime:
    """The worker's runtime, as the lifespan stored it."""
    rt = request.app.state.runtime
    assert isinstance(rt, Runtime)
    return rt
