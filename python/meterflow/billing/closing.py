"""Closing periods: each ended subscription period becomes one finalized invoice, with late usage of earlier ones.

A period gets a draft invoice at its end (`POST .../finalize` may finalize it
early); `invoice_grace_s` after its end the draft is priced again and
finalized, so events that arrive a little late are on it. Any number of
closers (the periodic task of every worker on every host, and `meterflow
invoices close`) may run at once: the unique (subscription, period start) lets one draft in,
and finalizing locks the invoice row and checks it is still a draft, so a
period is invoiced and numbered exactly once. A closer that dies after its
draft leaves it for the next pass, which finalizes it.

Late usage: usage stored after a period's invoice was finalized is billed on
the subscription's next invoice. For each earlier finalized or paid period
still inside the ingest age limit (older events are refused, so nothing can
arrive late for older periods), the period is priced again with its usage now;
every usage line whose quantity differs from what was billed (its frozen
quantity plus the late lines already billed for it) adds a line "Late usage
for <period>" with the difference in quantity and in amount.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, Protocol

import sqlalchemy as sa

from meterflow.billing.invoices import Invoices, WrongStatus
from meterflow.billing.money import decimal_text, money_text
from meterflow.billing.periods import Period, periods_between
from meterflow.billing.preview import BillingContext, PricingDeps, billing_context, price_service_period
from meterflow.billing.render import priced_period_json
from meterflow.billing.subscriptions import Subscription
from meterflow.records import Records, RecordsUnavailable, plain
from meterflow.records.tables import invoices
from meterflow.storage import StorageError

log = logging.getLogger("meterflow.closing")
_CLOSING_LOCK = 0x4D46_494E  # "MFIN": the advisory-lock class of period closing (the key is the period's hash)


class ClosingDeps(PricingDeps, Protocol):
    """What closing reads and writes; the worker's `Runtime` has all of it."""

    @property
    def records(self) -> Records: ...
    @property
    def invoices(self) -> Invoices: ...


Outcome = Literal["finalized", "drafted", "skipped"]


@dataclass(frozen=True)
class Due:
    """A subscription's ended calendar period that has no finalized invoice yet."""

    context: BillingContext
    period: Period
    final: bool = True  # its grace has passed: finalize (else: draft only)

    @property
    def subscription(self) -> Subscription:
        return self.context.subscription


@dataclass
class CloseReport:
    due: int = 0
    closed: int = 0  # finalized by this closer
    drafted: int = 0  # drafted by this closer, to be finalized when their grace has passed
    skipped: int = 0  # closed by another closer meanwhile
    failed: int = 0  # could not be priced or stored now (logged); the next pass tries again


def _now_ms() -> int:
    return int(time.time() * 1000)


def period_label(ctx: BillingContext, period: Period) -> str:
    start = dt.datetime.fromtimestamp(period.start / 1000, ctx.tz)
    return f"{start:%Y-%m}" if ctx.plan.interval == "month" else f"{start:%Y}"


class Closer:
    def __init__(self, deps: ClosingDeps) -> None:
        self._deps = deps
        self._grace_ms = deps.settings.invoice_grace_s * 1000

    async def due(self, at: int, customer_id: str | None = None) -> list[Due]:
        """Every period that ended by `at` without a finalized invoice, by subscription id: those that
        ended `grace` before `at` to finalize, the younger ones to draft if they have no draft yet."""
        boundary = at - self._grace_ms
        out: list[Due] = []
        after = ""
        while True:
            subs = await self._deps.subscriptions.page(customer_id, after, 500)
            if not subs:
                return out
            after = subs[-1].id
            known = await self._invoiced([s.id for s in subs])
            for sub in subs:
                end = at if sub.end is None else min(sub.end, at)
                if end <= sub.start:
                    continue
                ctx = await billing_context(self._deps, sub)
                for period in periods_between(ctx.plan.interval, ctx.tz, sub.start, end):
                    if period.end > at:
                        continue
                    status = known.get((sub.id, period.start))
                    final = period.end <= boundary
                    if status is None or (final and status == "draft"):
                        out.append(Due(ctx, period, final))

    async def _invoiced(self, sub_ids: list[str]) -> dict[tuple[str, int], str]:
        """(subscription, period start) -> status of its invoice."""
        q = sa.select(invoices.c.subscription_id, invoices.c.period_start, invoices.c.status).where(
            invoices.c.subscription_id.in_(sub_ids))
        async with self._deps.records.connect() as conn:
            rows = (await conn.execute(q)).all()
        return {(r.subscription_id, int(r.period_start)): str(r.status) for r in rows}

    async def close(self, due: Due) -> Outcome:
        """Drafts the period's invoice and, once its grace has passed, finalizes it."""
        async with self._period_lock(due) as mine:
            return await self._close(due) if mine else "skipped"

    @contextlib.asynccontextmanager
    async def _period_lock(self, due: Due) -> AsyncIterator[bool]:
        """PostgreSQL: a session advisory lock per period, tried without waiting, so of several closers
        one prices the period and the others move on (the unique constraint and the finalize row lock
        stay the guarantee). It goes with the connection if the closer dies. SQLite: one process."""
        if self._deps.records.name != "postgresql":
            yield True
            return
        key = f"{due.subscription.id}:{due.period.start}"
        async with self._deps.records.connect() as conn:
            got = bool((await conn.execute(sa.text("SELECT pg_try_advisory_lock(:cls, hashtext(:key))"),
                                           {"cls": _CLOSING_LOCK, "key": key})).scalar())  # fmt: skip
            await conn.commit()
            try:
                yield got
            finally:
                if got:
                    await conn.execute(sa.text("SELECT pg_advisory_unlock(:cls, hashtext(:key))"),
                                       {"cls": _CLOSING_LOCK, "key": key})  # fmt: skip
                    await conn.commit()

    async def _close(self, due: Due) -> Outcome:
        store = self._deps.invoices
        sub = due.subscription
        existing = await store.of_period(sub.id, due.period.start)
        if existing is not None and (existing["status"] != "draft" or not due.final):
            return "skipped"  # closed meanwhile, or drafted and still in its grace
        # Priced now: a draft made at the period's end is priced again when it is finalized, so
        # events that arrive within the grace are on it.
        currency, document = await self.document(due)
        if existing is None:
            existing, created = await store.create_draft_document(sub.customer_id, sub.id, due.period, currency,
                                                                  document)  # fmt: skip
            if not created:
                return "skipped"  # another closer drafted it
        elif (existing := await store.refresh_draft(existing["id"], document)) is None:
            return "skipped"  # finalized meanwhile
        if not due.final:
            return "drafted"
        try:
            await store.transition(existing["id"], "finalize")
        except WrongStatus:
            return "skipped"
        return "finalized"

    async def document(self, due: Due) -> tuple[str, dict[str, Any]]:
        """(currency, the invoice document): the period priced, with late usage of earlier periods."""
        priced = await price_service_period(self._deps, due.context, due.period)
        # The plan version is frozen with the lines: a later version of the plan does not change this invoice.
        document = {**priced_period_json(priced), "plan_version": due.subscription.plan_version}
        late = await self.late_lines(due.context, due.period.start)
        if late:
            extra = sum((Decimal(ln["amount"]) for ln in late), Decimal(0))
            document["lines"] += late
            document["late_usage"] = money_text(extra, priced.currency)
            document["total"] = money_text(priced.total + extra, priced.currency)
        return priced.currency, document

    async def late_lines(self, ctx: BillingContext, before: int) -> list[dict[str, Any]]:
        """Lines for usage of earlier finalized periods that their invoices (and late lines since) did not bill."""
        sub = ctx.subscription
        oldest = _now_ms() - self._deps.settings.max_age_ms - self._deps.settings.max_future_ms
        q = (sa.select(invoices).where(invoices.c.subscription_id == sub.id, invoices.c.period_start < before)
             .order_by(invoices.c.period_start))  # fmt: skip
        async with self._deps.records.connect() as conn:
            rows = [plain(r) for r in (await conn.execute(q)).mappings().all()]
        billed: dict[tuple[int, str], tuple[Decimal, Decimal]] = {}  # (period start, line key) -> (quantity, amount)
        for r in rows:
            if r["status"] not in ("finalized", "paid"):
                continue
            for ln in r["document"]["lines"]:
                if ln.get("meter") is None:
                    continue
                start = ln["late_for"]["start"] if "late_for" in ln else r["period_start"]
                key = (start, _line_key(ln))
                q0, a0 = billed.get(key, (Decimal(0), Decimal(0)))
                billed[key] = (q0 + Decimal(ln["quantity"]), a0 + Decimal(ln["amount"]))
        out: list[dict[str, Any]] = []
        for r in rows:
            if r["status"] not in ("finalized", "paid") or r["period_end"] <= oldest:
                continue
            period = Period(r["period_start"], r["period_end"])
            now = priced_period_json(await price_service_period(self._deps, ctx, period))
            label = period_label(ctx, period)
            for ln in now["lines"]:
                if ln.get("meter") is None:
                    continue
                q_then, a_then = billed.get((period.start, _line_key(ln)), (Decimal(0), Decimal(0)))
                dq, da = Decimal(ln["quantity"]) - q_then, Decimal(ln["amount"]) - a_then
                if dq == 0 and da == 0:
                    continue
                out.append({"charge": ln["charge"], "meter": ln["meter"], **_dimension(ln),
                            "description": f"Late usage for {label}" + (f": {ln['description']}"
                                                                        if ln.get("description") else ""),
                            "quantity": decimal_text(dq), "amount": money_text(da, now["currency"]), "tiers": [],
                            "late_for": {"start": period.start, "end": period.end}})  # fmt: skip
        return out

    async def run(self, at: int, customer_id: str | None = None,
                  progress: Callable[[int, int], None] | None = None) -> CloseReport:  # fmt: skip
        """Closes every due period; `progress(done, total)` after each."""
        due = await self.due(at, customer_id)
        report = CloseReport(due=len(due))
        for i, d in enumerate(due, 1):
            try:
                outcome = await self.close(d)
            except (StorageError, RecordsUnavailable, LookupError, ValueError) as e:
                # One period that cannot be priced (a meter gone, a backend down) does not hold up the others.
                log.warning("period not closed", extra={"subscription": d.subscription.id,
                                                        "period_start": d.period.start, "error": str(e)[:300]})
                report.failed += 1
            else:
                if outcome == "finalized":
                    report.closed += 1
                elif outcome == "drafted":
                    report.drafted += 1
                else:
                    report.skipped += 1
            if progress is not None:
                progress(i, len(due))
        return report


def _line_key(ln: dict[str, Any]) -> str:
    """A usage line's identity across invoices: its meter, charge type and dimension."""
    dim = ln.get("dimension") or {}
    return f"{ln['meter']}|{ln['charge']}|{sorted(dim.items())}"


def _dimension(ln: dict[str, Any]) -> dict[str, Any]:
    return {"dimension": ln["dimension"]} if "dimension" in ln else {}


async def close_periodically(deps: ClosingDeps, interval_s: int) -> None:
    """The server's closing task: a pass over every subscription each `interval_s`, until cancelled."""
    closer = Closer(deps)
    while True:
        try:
            report = await closer.run(_now_ms())
            if report.closed or report.drafted or report.failed:
                log.info("periods closed", extra={"closed": report.closed, "drafted": report.drafted,
                                                  "skipped": report.skipped, "failed": report.failed})
        except Exception as e:  # a backend may be down: the next pass tries again
            log.warning("closing pass failed", extra={"error": str(e)[:300]})
        await asyncio.sleep(interval_s)
