"""The webhook sender: claims due outbox rows (compare-and-set), posts them signed, logs each attempt, backs off.

Every worker of every host runs one; a delivery is sent by the one whose claim
wins. The claim moves `next_attempt_at` one lease ahead only if it still holds
the value that was read, so two senders never both win, and a sender that dies
mid-attempt leaves a row that becomes due again when the lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass

import aiohttp
import sqlalchemy as sa

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


class Sender:
    """The background task of one worker that drains the outbox."""

    def __init__(self, records: Records, schedule: Schedule, batch: int = 20) -> None:
        self._db = records
        self.schedule = schedule
        self._batch = batch
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.schedule.timeout_ms / 1000))
        self._task = asyncio.create_task(self._run(), name="webhook-sender")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            try:
                sent = await self.send_due()
            except Exception as e:  # the records database may be down: try again at the next poll
                log.warning("webhook sender pass failed", extra={"error": str(e)[:300]})
                sent = 0
            if sent < self._batch:
                await asyncio.sleep(self.schedule.poll_ms / 1000)

    async def send_due(self) -> int:
        """One pass: claims up to `batch` due deliveries and attempts each once; returns how many it attempted."""
        d = webhook_deliveries
        now = now_ms()
        q = (sa.select(d.c.id, d.c.next_attempt_at).where(d.c.status == "pending", d.c.next_attempt_at <= now)
             .order_by(d.c.next_attempt_at).limit(self._batch))  # fmt: skip
        async with self._db.connect() as conn:
            due = (await conn.execute(q)).all()
        attempted = 0
        for row in due:
            claim = await self._claim(row.id, row.next_attempt_at)
            if claim is not None:
                await self._attempt(row.id, claim)
                attempted += 1
        return attempted

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
            async with self._session.post(row.url, data=body, headers=headers, allow_redirects=False) as answer:
                code = answer.status
                await answer.content.read(4096)  # a little of the answer, so the connection can be reused
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            error = f"{type(e).__name__}: {e}"[:500]
        took = int((time.monotonic() - started) * 1000)
        attempts = row.attempts + 1
        if code is not None and 200 <= code < 300:
            await self._finish(delivery_id, claim, attempts, "delivered", None, (code, None, took))
            return
        if error is None:
            error = f"the receiver answered {code}"
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
            log.info("webhook delivery not done", extra={"delivery": delivery_id, "status": status})
