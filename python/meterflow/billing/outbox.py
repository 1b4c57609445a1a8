"""The webhook sender: claims due outbox rows (compare-and-set), posts them signed, logs each attempt, backs off.

Deliveries go out through a queue per endpoint: one endpoint's deliveries one after another, different
endpoints in parallel (at most `concurrency` at once per sender), so a receiver that hangs until the
timeout holds up only its own queue. Before each attempt the URL's rules and every address it resolves
to are checked (`destinations`); a refused one is a failed attempt like any other, logged as a class.

Every worker of every host runs one; a delivery is sent by the one whose claim
wins. The claim moves `next_attempt_at` one lease ahead only if it still holds
the value that was read, so two senders never both win, and a sender that dies
mid-attempt leaves a row that becomes due again when the lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from dataclasses import dataclass

import aiohttp
import sqlalchemy as sa

from meterflow.billing.destinations import CheckedResolver, Destinations, RefusedDestination, UnresolvedHost
from meterflow.billing.webhooks import sign
from meterflow.kernel.clock import now_ms
from meterflow.records import Records
from meterflow.records.tables import webhook_attempts, webhook_deliveries, webhooks

log = logging.getLogger("meterflow.webhooks")


@dataclass(frozen=True)
class Schedule:
    """Exponential backoff: `first_ms`, doubling up to `max_ms`, until `give_up_ms` after the event."""

    first_ms: int = 5_000
    max_ms: int = 3_600_000
    give_up_ms: int = 86_400_000
    timeout_ms: int = 10_000
    poll_ms: int = 1_000

    def delay_ms(self, attempts: int) -> int:
        """The wait after the `attempts`-th failed attempt (1, 2, ...)."""
        return min(self.first_ms * (1 << min(attempts - 1, 40)), self.max_ms)

    @property
    def lease_ms(self) -> int:
        # Longer than one attempt can take, so a live sender's claim never runs out under it.
        return self.timeout_ms * 3


def error_class(e: BaseException) -> str:
    """What the delivery log says about a failed attempt: a class, never the exception's text (which
    names internal hosts and ports)."""
    if isinstance(e, RefusedDestination):
        return "refused_address" if e.rule in ("address", "ip_form") else "refused_url"
    if isinstance(e, TimeoutError):  # aiohttp's ServerTimeoutError and ConnectionTimeoutError are TimeoutErrors
        return "timeout"
    if isinstance(e, (UnresolvedHost, aiohttp.ClientConnectorDNSError)):
        return "dns_error"
    if isinstance(e, (aiohttp.ClientSSLError, aiohttp.ClientConnectorCertificateError)):
        return "tls_error"
    cause = e.os_error if isinstance(e, aiohttp.ClientConnectorError) else e
    if isinstance(cause, ConnectionRefusedError):
        return "refused"
    return "connection_error"


class Sender:
    """The background task of one worker that drains the outbox: a queue per endpoint, at most
    `concurrency` endpoints at once, so a receiver that hangs only delays its own deliveries."""

    def __init__(self, records: Records, schedule: Schedule, batch: int = 20,
                 destinations: Destinations | None = None, concurrency: int = 8) -> None:  # fmt: skip
        self._db = records
        self.schedule = schedule
        self._batch = batch
        self._destinations = destinations if destinations is not None else Destinations()
        self._concurrency = concurrency
        self._task: asyncio.Task[None] | None = None
        self._queues: dict[str, asyncio.Task[None]] = {}  # endpoint id -> the task sending its due deliveries
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        # The resolver checks every address it returns, and the connector connects to those only. No DNS
        # cache and no kept-alive connections: every delivery resolves its host and checks the answer.
        connector = aiohttp.TCPConnector(resolver=CheckedResolver(self._destinations), use_dns_cache=False,
                                         force_close=True, limit=self._concurrency)  # fmt: skip
        timeout = aiohttp.ClientTimeout(total=self.schedule.timeout_ms / 1000)
        self._session = aiohttp.ClientSession(connector=connector, trust_env=False, timeout=timeout)
        self._task = asyncio.create_task(self._run(), name="webhook-sender")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._queues.values()) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:  # an attempt cut short keeps its claim: the delivery is due again when the lease ends
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._task = None
        self._queues.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            try:
                await self.dispatch()
            except Exception as e:  # the records database may be down: try again at the next poll
                log.warning("webhook sender pass failed", extra={"error": str(e)[:300]})
            await asyncio.sleep(self.schedule.poll_ms / 1000)

    async def dispatch(self) -> int:
        """One pass: starts a queue for each endpoint with due deliveries that has none running, up to
        `concurrency` in all; returns how many it started."""
        free = self._concurrency - len(self._queues)
        if free <= 0:
            return 0
        d = webhook_deliveries
        q = (sa.select(d.c.webhook_id).where(d.c.status == "pending", d.c.next_attempt_at <= now_ms(),
                                             d.c.webhook_id.not_in(list(self._queues)))
             .group_by(d.c.webhook_id).order_by(sa.func.min(d.c.next_attempt_at)).limit(free))  # fmt: skip
        async with self._db.connect() as conn:
            endpoints = list((await conn.execute(q)).scalars())
        for wid in endpoints:
            task = asyncio.create_task(self._send_queue(wid), name=f"webhook-queue-{wid}")
            self._queues[wid] = task
            task.add_done_callback(functools.partial(self._ended, wid))
        return len(endpoints)

    def _ended(self, webhook_id: str, _task: asyncio.Task[None]) -> None:
        self._queues.pop(webhook_id, None)

    async def _send_queue(self, webhook_id: str) -> None:
        """Sends one endpoint's due deliveries one after another, oldest first, until none is due."""
        try:
            while await self.send_due(webhook_id) >= self._batch:
                pass
        except Exception as e:
            log.warning("webhook queue failed", extra={"webhook": webhook_id, "error": str(e)[:300]})

    async def send_due(self, webhook_id: str) -> int:
        """Claims up to `batch` due deliveries of one endpoint and attempts each once; returns how many it read."""
        d = webhook_deliveries
        q = (sa.select(d.c.id, d.c.next_attempt_at)
             .where(d.c.webhook_id == webhook_id, d.c.status == "pending", d.c.next_attempt_at <= now_ms())
             .order_by(d.c.next_attempt_at, d.c.id).limit(self._batch))  # fmt: skip
        async with self._db.connect() as conn:
            due = (await conn.execute(q)).all()
        for row in due:
            claim = await self._claim(row.id, row.next_attempt_at)
            if claim is not None:
                await self._attempt(row.id, claim)
        return len(due)

    async def _claim(self, delivery_id: str, seen_next: int) -> str | None:
        d = webhook_deliveries
        token = secrets.token_hex(8)
        async with self._db.begin() as conn:
            done = await conn.execute(
                sa.update(d)
                .where(d.c.id == delivery_id, d.c.status == "pending", d.c.next_attempt_at == seen_next)
                .values(next_attempt_at=now_ms() + self.schedule.lease_ms, claim=token)
            )
        return token if done.rowcount == 1 else None

    async def _attempt(self, delivery_id: str, claim: str) -> None:
        d = webhook_deliveries
        async with self._db.connect() as conn:
            row = (await conn.execute(
                sa.select(d.c.payload, d.c.attempts, d.c.created_at, webhooks.c.url, webhooks.c.secret,
                          webhooks.c.deleted_at).join(webhooks, webhooks.c.id == d.c.webhook_id)
                .where(d.c.id == delivery_id)
            )).one()  # fmt: skip
        if row.deleted_at is not None:
            await self._finish(delivery_id, claim, row.attempts, "failed", None, None)
            return
        body = row.payload.encode()
        stamp = int(time.time())
        headers = {"content-type": "application/json", "webhook-id": delivery_id,
                   "webhook-timestamp": str(stamp), "webhook-signature": sign(row.secret, delivery_id, stamp, body),
                   "user-agent": "MeterFlow-Webhooks/1"}  # fmt: skip
        started = time.monotonic()
        code: int | None = None
        error: str | None = None
        assert self._session is not None
        try:
            # The URL's rules and an IP literal's address here (aiohttp does not resolve literals); a
            # name's addresses in CheckedResolver, on the way to the connection.
            self._destinations.check_url(row.url)
            async with self._session.post(row.url, data=body, headers=headers, allow_redirects=False) as answer:
                code = answer.status
                await answer.content.read(4096)  # a little of the answer, never all of a large one
        except (aiohttp.ClientError, TimeoutError, OSError, RefusedDestination, UnresolvedHost) as e:
            error = error_class(e)
        took = int((time.monotonic() - started) * 1000)
        attempts = row.attempts + 1
        if code is not None and 200 <= code < 300:
            await self._finish(delivery_id, claim, attempts, "delivered", None, (code, None, took))
            return
        if error is None:
            error = f"http {code}"
        retry_at = now_ms() + self.schedule.delay_ms(attempts)
        if retry_at > row.created_at + self.schedule.give_up_ms:
            await self._finish(delivery_id, claim, attempts, "failed", None, (code, error, took))
        else:
            await self._finish(delivery_id, claim, attempts, "pending", retry_at, (code, error, took))

    async def _finish(self, delivery_id: str, claim: str, attempts: int, status: str, retry_at: int | None,
                      attempt: tuple[int | None, str | None, int] | None) -> None:  # fmt: skip
        """Records the attempt (status code, error, milliseconds) and the delivery's new state, if still ours."""
        d = webhook_deliveries
        now = now_ms()
        values: dict[str, object] = {"status": status, "attempts": attempts, "claim": None}
        if retry_at is not None:
            values["next_attempt_at"] = retry_at
        if status == "delivered":
            values["delivered_at"] = now
        async with self._db.begin() as conn:
            if attempt is not None:
                code, error, took = attempt
                await conn.execute(sa.insert(webhook_attempts).values(
                    delivery_id=delivery_id, attempted_at=now, status_code=code, error=error, duration_ms=took))
            await conn.execute(sa.update(d).where(d.c.id == delivery_id, d.c.claim == claim).values(values))
        if status != "delivered":
            log.info("webhook delivery not done", extra={"delivery": delivery_id, "status": status,
                                                          "error": attempt[1] if attempt else None})  # fmt: skip
