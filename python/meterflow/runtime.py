"""The one place that opens, checks and closes every backend, and the typed state the routes read."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import RedisError

from meterflow.archive import ArchiveError, Spool, Store, open_store
from meterflow.archive.replay import replay
from meterflow.auth.failures import AuthFailures
from meterflow.auth.keys import KeyError_, KeyStore
from meterflow.auth.ratelimit import RateLimiter, open_rate_limiter
from meterflow.billing.catalog import PlanCatalog
from meterflow.billing.closing import Closer, CloseReport, close_periodically
from meterflow.billing.credit_notes import CreditNotes
from meterflow.billing.destinations import Destinations
from meterflow.billing.invoices import Invoices
from meterflow.billing.outbox import Schedule, Sender
from meterflow.billing.plans import configured_plans
from meterflow.billing.preview import NotInPeriod
from meterflow.billing.snapshot import take_snapshot
from meterflow.billing.subscriptions import Subscriptions
from meterflow.billing.webhooks import Webhooks
from meterflow.config import Settings
from meterflow.customers import Customers
from meterflow.ingest.dedup import Dedup, RedisDedup, open_dedup
from meterflow.ingest.service import IngestService
from meterflow.ingest.stream import dead_letters, retry_dead_letters
from meterflow.ingest.worker import Worker
from meterflow.kernel.clock import SYSTEM, Clock
from meterflow.kernel.errors import CommandFailed
from meterflow.logs import setup_logging
from meterflow.metering.catalog import MeterCatalog
from meterflow.metering.meters import configured_meters
from meterflow.metrics import Metrics
from meterflow.records import Records, RecordsUnavailable, open_records
from meterflow.records.legacy import import_documents
from meterflow.redis import Redis, open_client
from meterflow.storage import Storage, StorageError, open_storage

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

    async def check(self) -> dict[str, str]:
        """`{"status": "ok"}`, or `"down"` when the backend does not answer within 2 s."""
        try:
            await asyncio.wait_for(self.backend.ping(), 2)
        except Exception as e:  # any failure to answer is "down"
            # /ready needs no key: the service's own text (hosts, versions) goes to the log only.
            error = (str(e) or type(e).__name__)[:500]
            logging.getLogger("meterflow.api").warning("readiness check failed",
                                                       extra={"check": self.label, "error": error})  # fmt: skip
            return {"status": "down"}
        return {"status": "ok"}


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
        meters, plans = await open_catalogs(settings, records)
        service = IngestService(settings, storage, dedup, metrics, spool)
        await service.warm()
        if spool is not None:
            spool.start()
        customers = Customers(records)
        destinations = webhook_destinations(settings)
        rt = Runtime(
            settings=settings, metrics=metrics, storage=storage, dedup=dedup, records=records, limiter=limiter,
            archive=archive, spool=spool, ingest=service, customers=customers,
            keys=KeyStore(records, settings.admin_key, settings.key_cache_grace_s),
            auth_failures=auth_failures,
            meters=meters, plans=plans,
            subscriptions=Subscriptions(records, plans, max_backdate_days=settings.subscription_max_backdate_days),
            invoices=open_invoices(settings, records, archive, customers, meters),
            webhooks=Webhooks(records, destinations),
            credit_notes=CreditNotes(records), clock=SYSTEM,
        )  # fmt: skip
        sender = Sender(records, webhook_schedule(settings), destinations=destinations,
                        concurrency=settings.webhook_concurrency)  # fmt: skip
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
            meters, plans = await open_catalogs(settings, records)
            customers = Customers(records)
            yield cls(settings, storage, records, meters, plans,
                      Subscriptions(records, plans, max_backdate_days=settings.subscription_max_backdate_days),
                      open_invoices(settings, records, archive, customers, meters), CreditNotes(records), customers,
                      SYSTEM)  # fmt: skip


def check_settings(settings: Settings) -> None:
    """Raises ConfigError for what `config.load` leaves to the catalogs: the `[[meters]]` and `[[plans]]` tables."""
    configured_plans(settings, configured_meters(settings))


async def open_catalogs(settings: Settings, records: Records) -> tuple[MeterCatalog, PlanCatalog]:
    """The meter and plan catalogs over the records, with the config's meters and plans in them."""
    meters = configured_meters(settings)
    catalog = MeterCatalog(records, meters, late_window_ms=settings.max_age_ms + settings.max_future_ms)
    plans = PlanCatalog(records, catalog, configured_plans(settings, meters))
    await plans.start()
    return catalog, plans


def open_invoices(settings: Settings, records: Records, archive: Store | None, customers: Customers,
                  meters: MeterCatalog, clock: Clock = SYSTEM) -> Invoices:  # fmt: skip
    """The invoice store, freezing seller, buyer, zone, locale and units into each invoice it finalizes."""

    async def snapshot(invoice: dict[str, Any]) -> dict[str, Any]:
        return await take_snapshot(customers, meters, settings, invoice)

    return Invoices(records, archive, settings.invoice_due_days, clock=clock, snapshot=snapshot)


def webhook_destinations(settings: Settings) -> Destinations:
    """Where webhooks may go: the operator's http hosts and allowed addresses (config checked them)."""
    return Destinations.from_settings(settings)


def webhook_schedule(settings: Settings) -> Schedule:
    return Schedule(first_ms=settings.webhook_backoff_ms, max_ms=settings.webhook_backoff_max_ms,
                    give_up_ms=settings.webhook_retry_for_s * 1000, timeout_ms=settings.webhook_timeout_ms,
                    poll_ms=settings.webhook_poll_ms)  # fmt: skip


# The entries of the processes other than the server, one per `meterflow` command; cli.py parses
# arguments and prints, these open what each needs and close it. A failure a command expects (a
# backend down, a bad archive) is raised as CommandFailed with its reason.


@contextlib.contextmanager
def _failing(what: str, errors: tuple[type[BaseException], ...], after_progress: bool = False) -> Iterator[None]:
    try:
        yield
    except errors as e:
        raise CommandFailed(f"{what}: {e}", after_progress) from e


async def create_key(settings: Settings, scope: str, name: str, customer_id: str | None) -> str:
    """A new API key's secret (shown once)."""
    records = open_records(settings)
    with _failing("cannot create the key", (RecordsUnavailable, KeyError_)):
        async with started(records):
            _, secret = await KeyStore(records).create(scope, name, customer_id)
            return secret


async def upgrade_records(settings: Settings) -> str:
    """Applies the records database's migrations; the revision it is at."""
    records = open_records(settings)
    with _failing("cannot upgrade the records database", (RecordsUnavailable,)):
        try:
            return await records.upgrade()
        finally:
            await records.close()


async def replay_archive(settings: Settings, start: int, end: int, dry_run: bool) -> None:
    """Reads the archived events of [start, end) back into storage (nothing written on a dry run)."""
    store = open_store(settings)
    assert store is not None, "MF_ARCHIVE=none: the command line refuses a replay"
    storage = None if dry_run else open_storage(settings)
    with _failing("replay failed", (ArchiveError, StorageError, OSError, ValueError), after_progress=True):
        async with started(store, *([storage] if storage is not None else [])):
            await replay(store, storage, start, end, dry_run)


async def run_worker(settings: Settings, announce: Callable[[str], None]) -> None:
    """`meterflow worker`: commits the async mode's event stream until SIGTERM or SIGINT; the round
    in progress commits, the spool uploads once more."""
    setup_logging(settings)
    storage, dedup, archive, metrics = open_storage(settings), RedisDedup(settings), open_store(settings), Metrics()
    spool = Spool(settings, archive, metrics) if archive is not None else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with started(storage, dedup, *([archive] if archive is not None else [])):
        if spool is not None:
            spool.start()
        worker = Worker(settings, dedup.redis, storage, spool, metrics)
        announce(f"worker {worker.name} reading the event stream")
        try:
            await worker.run(stop)
        finally:
            if spool is not None:
                await spool.stop()
                try:  # a last upload; what fails stays spooled
                    await asyncio.wait_for(spool.drain_once(), 10)
                except Exception as e:
                    announce(f"archive left spooled at shutdown: {e}")


@contextlib.asynccontextmanager
async def _stream_redis(settings: Settings) -> AsyncIterator[Redis]:
    r = open_client(settings.redis_url)
    try:
        yield r
    finally:
        await r.aclose()


async def list_dead_letters(settings: Settings) -> list[dict[str, Any]]:
    """The entries of the event stream that failed MF_WORKER_MAX_ATTEMPTS times."""
    with _failing("Redis is unavailable", (RedisError, OSError)):
        async with _stream_redis(settings) as r:
            return await dead_letters(r)


async def retry_dead_letters_of(settings: Settings, ids: list[str]) -> int:
    """Puts dead letters (all, or the ids given) back on the event stream; how many moved."""
    with _failing("Redis is unavailable", (RedisError, OSError)):
        async with _stream_redis(settings) as r:
            return await retry_dead_letters(r, ids or None)


async def close_invoices(settings: Settings, at: int, customer: str | None,
                         progress: Callable[[int, int], None]) -> CloseReport:  # fmt: skip
    """`meterflow invoices close`: every period due at `at` closed, the books settled."""
    errors = (RecordsUnavailable, StorageError, NotInPeriod, LookupError, OSError)
    with _failing("closing failed", errors, after_progress=True):
        async with ClosingRuntime.opened(settings, open_store(settings)) as rt:
            return await Closer(rt).run(at, customer, progress)
