"""Closing periods: each ended subscription period becomes one finalized invoice, and what touches a
finalized period later is settled exactly once (late lines, credit notes, invoices of late lines only).

A period gets a draft invoice when its billed part ends (a cancelled or
changed subscription's last, cut period at the subscription's end);
`invoice_grace_s` after that the draft is priced again and finalized, so
events that arrive a little late are on it. Any number of closers (the
periodic task of every worker on every host, and `meterflow invoices close`)
may run at once: the unique (subscription, period start) lets one draft in,
and finalizing locks the invoice row and checks it is still a draft, so a
period is invoiced and numbered exactly once.

Settling (the rules are the README's "The books after the fact";
`settlement.settle` is the pure part): every finalized period that can
still change is priced again and compared, per line key, with what its
invoices billed. What is newly owed becomes late lines on the subscription's
next invoice (for an ended subscription, on the customer's next invoice in
the currency, or on an invoice of late lines only when there is none); what
is no longer owed becomes a credit note. A subscription whose periods cannot
be priced is recorded as a closing failure and retried; it never stops the
others.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from typing import Any, Literal, Protocol

import sqlalchemy as sa

from meterflow.billing.catalog import StoredPlanBroken
from meterflow.billing.credit_notes import CreditNotes, Reason, credited_by_slot, slot_key
from meterflow.billing.failures import ClosingFailures
from meterflow.billing.invoices import Invoices, WrongStatus
from meterflow.billing.lines import CreditLine, InvoiceLine, LateFor, billed_lines, encode_line, legacy_key
from meterflow.billing.lines import legacy_keys as legacy_keys  # stated in `lines`, named here as before
from meterflow.billing.periods import SETTLE_IN_MS, Period, cut, zone_at
from meterflow.billing.plans import Plan
from meterflow.billing.preview import BillingContext, PricingDeps, billing_context, price_service_period
from meterflow.billing.render import priced_period_json
from meterflow.billing.settlement import BilledLine, Debit, OwedLine, Settlement, owed_lines, settle
from meterflow.billing.subscriptions import Subscription
from meterflow.kernel.clock import Clock
from meterflow.kernel.money import EXACT, money_text
from meterflow.metering.usage import UsageOutOfRange
from meterflow.records import Records, RecordsUnavailable, plain
from meterflow.records.tables import invoices
from meterflow.storage import StorageError

log = logging.getLogger("meterflow.closing")
_CLOSING_LOCK = 0x4D46_494E  # "MFIN": the advisory-lock class of period closing (the key is the period's hash)
_SETTLING_LOCK = 0x4D46_5354  # "MFST": settling a customer's books
ZERO = Decimal(0)
# What a pass survives per subscription: a backend down, a plan or meter that no longer applies.
_FAILURES = (StorageError, RecordsUnavailable, LookupError, ValueError, StoredPlanBroken, UsageOutOfRange,
             WrongStatus)


class ClosingDeps(PricingDeps, Protocol):
    """What closing reads and writes; the worker's `Runtime` has all of it."""

    @property
    def records(self) -> Records: ...
    @property
    def invoices(self) -> Invoices: ...
    @property
    def credit_notes(self) -> CreditNotes: ...
    @property
    def clock(self) -> Clock: ...


Outcome = Literal["finalized", "drafted", "skipped"]


@dataclass(frozen=True)
class Due:
    """A subscription's ended period that has no finalized invoice yet."""

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
    failed: int = 0  # could not be priced or stored now (recorded); the next pass tries again
    credit_notes: int = 0  # made by settling
    late_invoices: int = 0  # invoices of late lines only
    finalized_ids: set[str] = field(default_factory=set)


def period_label(ctx: BillingContext, period: Period) -> str:
    # Two days in: the first period after a zone change starts on the old zone's boundary.
    inside = min(period.start + SETTLE_IN_MS, period.end - 1)
    start = dt.datetime.fromtimestamp(inside / 1000, zone_at(ctx.zones, inside))
    return f"{start:%Y-%m}" if ctx.plan.interval == "month" else f"{start:%Y}"


def billed_end(sub: Subscription, period: Period) -> int:
    """When the billed part of `period` ends: the period's end, or the subscription's if it ends inside."""
    return period.end if sub.end is None else min(period.end, sub.end)


@dataclass
class _Books:
    """A customer's billing record as settling reads it."""

    contexts: dict[str, BillingContext]
    period_invoices: dict[tuple[str, int], dict[str, Any]]  # (subscription, period start) -> its invoice
    billed: dict[tuple[str, int], list[BilledLine]]  # (subscription, period start) -> lines that billed it
    settled: set[tuple[str, int]]  # periods with a non-draft invoice


class Closer:
    def __init__(self, deps: ClosingDeps) -> None:
        self._deps = deps
        self._grace_ms = deps.settings.invoice_grace_s * 1000
        # Events older than this are refused at ingest, so periods ending before it no longer change.
        self._window_ms = deps.settings.max_age_ms + deps.settings.max_future_ms
        self.failures = ClosingFailures(deps.records)
        self._finalized: set[str] = set()  # invoices this closer finalized in the pass under way
        self._settle_every_ms = deps.settings.invoice_settle_interval_s * 1000
        self._settled_all_at: int | None = None  # when this closer last settled every customer
        self._plans: dict[tuple[str, int], Plan] = {}
        self._local = asyncio.Lock()  # settling takes turns within a process (PostgreSQL: an advisory lock too)

    # --- which periods are due --------------------------------------------------------------------------

    async def due(self, at: int, customer_id: str | None = None,
                  failed: dict[str, str] | None = None) -> list[Due]:  # fmt: skip
        """Every period whose billed part ended by `at` without a finalized invoice, by subscription id:
        those that ended `grace` before `at` to finalize, the younger ones to draft if they have no
        draft yet. A subscription that cannot be read goes to `failed` (id -> error)."""
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
                try:
                    ctx = await billing_context(self._deps, sub)
                except _FAILURES as e:
                    if failed is not None:
                        failed[sub.id] = str(e)
                    continue
                for period in ctx.periods(end):
                    ends = billed_end(sub, period)
                    if ends > at:
                        continue
                    status = known.get((sub.id, period.start))
                    final = ends <= boundary
                    if status is None or (final and status == "draft"):
                        out.append(Due(ctx, period, final))

    async def _invoiced(self, sub_ids: list[str]) -> dict[tuple[str, int], str]:
        """(subscription, period start) -> status of its period invoice."""
        q = sa.select(invoices.c.subscription_id, invoices.c.period_start, invoices.c.status).where(
            invoices.c.subscription_id.in_(sub_ids), invoices.c.kind == "period")
        async with self._deps.records.connect() as conn:
            rows = (await conn.execute(q)).all()
        return {(r.subscription_id, int(r.period_start)): str(r.status) for r in rows}

    # --- closing one period ---------------------------------------------------------------------------------

    async def close(self, due: Due) -> Outcome:
        """Drafts the period's invoice and, once its grace has passed, finalizes it. One closer at a time
        prices a subscription's periods (the late lines it takes must land on one invoice), and it reads the
        subscription again under that lock: a change made since `due` was listed wins."""
        async with self._period_lock(due.subscription.id, _CLOSING_LOCK) as mine:
            if not mine:
                return "skipped"
            now = await self._deps.subscriptions.get(due.subscription.id)
            if now is None or (now.start, now.end) != (due.subscription.start, due.subscription.end):
                return "skipped"  # cancelled or changed meanwhile: the next pass lists its periods again
            return await self._close(due)

    @contextlib.asynccontextmanager
    async def _period_lock(self, key: str, cls: int) -> AsyncIterator[bool]:
        """PostgreSQL: a session advisory lock, tried without waiting, so of several closers one does the
        work and the others move on (the unique constraint and the finalize row lock stay the guarantee).
        It goes with the connection if the closer dies. SQLite: one process."""
        if self._deps.records.name != "postgresql":
            yield True
            return
        async with self._deps.records.connect() as conn:
            got = bool((await conn.execute(sa.text("SELECT pg_try_advisory_lock(:cls, hashtext(:key))"),
                                           {"cls": cls, "key": key})).scalar())  # fmt: skip
            await conn.commit()
            try:
                yield got
            finally:
                if got:
                    await conn.execute(sa.text("SELECT pg_advisory_unlock(:cls, hashtext(:key))"),
                                       {"cls": cls, "key": key})  # fmt: skip
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
            await store.transition(existing["id"], "finalize", existing)
        except WrongStatus:
            return "skipped"
        self._finalized.add(existing["id"])
        return "finalized"

    async def transition(self, invoice_id: str, action: str) -> dict[str, Any] | None:
        """An invoice's lifecycle step as the API and the dashboard ask for it: `finalize` through `finalize`,
        the others (void, mark_paid) as the store applies them."""
        if action == "finalize":
            return await self.finalize(invoice_id)
        return await self._deps.invoices.transition(invoice_id, action)

    async def finalize(self, invoice_id: str) -> dict[str, Any] | None:
        """Finalizes a draft now, priced again first as closing prices it at the end of the grace, so the late
        lines it carries are those owed now. None: no such invoice; WrongStatus when it is no longer a draft
        (or another closer is closing it right now)."""
        inv = await self._deps.invoices.get(invoice_id)
        if inv is None:
            return None
        sub = await self._deps.subscriptions.get(inv["subscription_id"]) if inv["kind"] == "period" else None
        if inv["status"] == "draft" and sub is not None:
            bp = inv["billing_period"]
            await self.close(Due(await billing_context(self._deps, sub), Period(bp["start"], bp["end"]), True))
            inv = await self._deps.invoices.get(invoice_id)
            if inv is None or inv["status"] != "finalized":
                raise WrongStatus("draft being closed" if inv is not None else "deleted", "finalize")
            return inv
        return await self._deps.invoices.transition(invoice_id, "finalize")

    async def document(self, due: Due) -> tuple[str, dict[str, Any]]:
        """(currency, the invoice document): the period priced, with the late lines it receives."""
        priced = await price_service_period(self._deps, due.context, due.period)
        # The plan version is frozen with the lines: a later version of the plan does not change this invoice.
        document = {**priced_period_json(priced), "plan_version": due.subscription.plan_version}
        late = await self.pending_late(due.subscription, priced.currency, self._deps.clock.now_ms())
        return priced.currency, with_late_lines(document, priced.total, late, priced.currency)

    async def late_lines(self, receiver: Subscription, currency: str, at: int,
                         skip: frozenset[str] = frozenset()) -> list[dict[str, Any]]:  # fmt: skip
        """`pending_late` as the API shows it (the stored shape of the lines)."""
        return [encode_line(ln, currency) for ln in await self.pending_late(receiver, currency, at, skip)]

    async def pending_late(self, receiver: Subscription, currency: str, at: int,
                           skip: frozenset[str] = frozenset()) -> list[InvoiceLine]:  # fmt: skip
        """The late lines an invoice of `receiver` carries: what its own finalized periods newly owe, and
        what ended subscriptions of the customer in the same currency newly owe when `receiver` is the
        one that takes them (see `_receiver`)."""
        if not await self._has_finalized(receiver.customer_id):
            return []  # nothing billed yet: nothing can be owed late (one cheap query for a new customer)
        books = await self._books(receiver.customer_id, at)
        out: list[InvoiceLine] = []
        for ctx in books.contexts.values():
            sub = ctx.subscription
            if ctx.plan.currency != currency:
                continue
            if sub.id != receiver.id and self._receiver(books, sub, at) != receiver.id:
                continue
            for period, s in (await self._settlements(books, ctx, at, skip))[0]:
                out += [_late_line(ctx, period, d) for d in s.debits]
        return out

    async def _has_finalized(self, customer_id: str) -> bool:
        q = sa.select(invoices.c.id).where(invoices.c.customer_id == customer_id, invoices.c.status != "draft")
        async with self._deps.records.connect() as conn:
            return (await conn.execute(q.limit(1))).first() is not None

    def _receiver(self, books: _Books, sub: Subscription, at: int) -> str | None:
        """Who takes the late lines of `sub`: itself while it has a period left to invoice; once ended and
        all invoiced, the customer's subscription in the same currency whose next period ends first
        (ties by id); None when there is none (settling then makes an invoice of late lines only)."""
        if sub.id not in books.contexts or self._next_end(books, books.contexts[sub.id], at) is not None:
            return sub.id
        currency = books.contexts[sub.id].plan.currency
        best: tuple[int, str] | None = None
        for ctx in books.contexts.values():
            if ctx.plan.currency != currency or ctx.subscription.id == sub.id or ctx.subscription.start > at:
                continue  # a scheduled subscription takes nothing before it starts
            nxt = self._next_end(books, ctx, at)
            if nxt is not None and (best is None or (nxt, ctx.subscription.id) < best):
                best = (nxt, ctx.subscription.id)
        return None if best is None else best[1]

    def _next_end(self, books: _Books, ctx: BillingContext, at: int) -> int | None:
        """When the subscription's next period without a finalized invoice ends; None if it has none left."""
        sub = ctx.subscription
        if sub.end is None:
            for p in ctx.periods(max(at, sub.start) + 1):
                if (sub.id, p.start) not in books.settled:
                    return billed_end(sub, p)
            return ctx.period_at(max(at, sub.start)).end  # pragma: no cover - the loop always finds the current one
        for p in ctx.periods(sub.end):
            if (sub.id, p.start) not in books.settled:
                return billed_end(sub, p)
        return None

    # --- settling ---------------------------------------------------------------------------------------------

    async def settle_customer(self, customer_id: str, at: int, skip: frozenset[str] = frozenset(),
                              report: CloseReport | None = None) -> None:  # fmt: skip
        """Credit notes for what the customer's finalized periods no longer owe, and an invoice of late lines
        only for what ended subscriptions newly owe when no other subscription takes it. `skip`: invoices
        finalized in this pass (priced just now; the next pass settles them)."""
        report = report if report is not None else CloseReport()
        async with self._local, self._period_lock(customer_id, _SETTLING_LOCK) as mine:
            if not mine:
                return
            await self._discard_stale_drafts(customer_id)
            if not await self._has_finalized(customer_id):
                return
            books = await self._books(customer_id, at)
            orphans: dict[str, list[InvoiceLine]] = defaultdict(list)  # currency -> late lines of nobody's
            for ctx in sorted(books.contexts.values(), key=lambda c: c.subscription.id):
                sub = ctx.subscription
                credits: dict[str, list[CreditLine]] = defaultdict(list)
                retro: dict[str, bool] = {}
                takes = self._receiver(books, sub, at)
                settled, complete = await self._settlements(books, ctx, at, skip)
                for period, s in settled:
                    late_for = LateFor(sub.id, period.start, period.end)
                    own_invoice = books.period_invoices.get((sub.id, period.start), {}).get("id")
                    for c in s.credits:
                        own = c.billed.invoice_id == own_invoice  # else a late line on a later invoice
                        credits[c.billed.invoice_id].append(CreditLine(
                            c.billed.slot, c.billed.key, f"Correction for {period_label(ctx, period)}",
                            c.quantity, c.amount, None if own else late_for))  # fmt: skip
                        retro[c.billed.invoice_id] = retro.get(c.billed.invoice_id, False) or (
                            sub.settle_from is not None and period.end > sub.settle_from)
                    if takes is None and s.debits:
                        orphans[ctx.plan.currency] += [_late_line(ctx, period, d) for d in s.debits]
                for invoice_id, lines in credits.items():
                    reason: Reason = "retroactive_change" if retro[invoice_id] else "late_correction"
                    if await self._deps.credit_notes.create(invoice_id, reason, lines) is not None:
                        report.credit_notes += 1
                if sub.settle_from is not None and complete:  # else a later pass settles what was left out
                    await self._deps.subscriptions.mark_settled(sub.id, sub.settle_from)
            for currency, late in sorted(orphans.items()):
                first = late[0].late_for
                assert first is not None  # every line `_late_line` makes has its period
                await self._late_invoice(customer_id, first.subscription_id, currency, late, at)
                report.late_invoices += 1

    async def _late_invoice(self, customer_id: str, sub_id: str, currency: str, lines: list[InvoiceLine],
                            at: int) -> None:  # fmt: skip
        """An invoice of late lines only, made and finalized now (its period is the instant it is made)."""
        zero = money_text(ZERO, currency)
        doc: dict[str, Any] = {"plan": None, "currency": currency, "period": {"start": at, "end": at},
               "billing_period": {"start": at, "end": at}, "lines": [], "subtotal": zero, "minimum": zero,
               "minimum_adjustment": zero, "total": zero, "plan_version": None}  # fmt: skip
        doc = with_late_lines(doc, ZERO, lines, currency)
        await self._deps.invoices.discard_drafts(customer_id, kind="late")  # one a failed pass left behind
        inv, created = await self._deps.invoices.create_draft_document(customer_id, sub_id, Period(at, at), currency,
                                                                       doc, kind="late")  # fmt: skip
        if created:
            await self._deps.invoices.transition(inv["id"], "finalize")

    async def _settlements(self, books: _Books, ctx: BillingContext, at: int,
                           skip: frozenset[str]) -> tuple[list[tuple[Period, Settlement]], bool]:  # fmt: skip
        """Each finalized period of the subscription that can still change, priced now and settled; and whether
        every period from its `settle_from` on was (none was a draft or finalized in this pass)."""
        sub = ctx.subscription
        oldest = at - self._window_ms
        out: list[tuple[Period, Settlement]] = []
        complete = True
        for (sid, start), inv in sorted(books.period_invoices.items()):
            if sid != sub.id:
                continue
            # A period keeps the bounds it was invoiced with; one the subscription no longer covers at all
            # (a cancel dated before it) owes nothing now.
            period = Period(start, int(inv["period_end"]))
            changed = sub.settle_from is not None and period.end > sub.settle_from
            if inv["id"] in skip or inv["status"] == "draft":
                complete = complete and not changed
                continue
            if period.end <= oldest and not changed:
                continue
            owed: list[OwedLine] = []
            if cut(period, sub.start, sub.end) is not None:
                owed = owed_lines(await price_service_period(self._deps, ctx, period))
            s = settle(owed, books.billed.get((sub.id, start), []))
            if not s.empty:
                out.append((period, s))
        return out, complete

    async def _discard_stale_drafts(self, customer_id: str) -> None:
        """Drafts of periods their subscription no longer covers at all (a cancel dated before them)."""
        subs = {s.id: s for s in await self._deps.subscriptions.of_customer(customer_id)}
        q = sa.select(invoices.c.id, invoices.c.subscription_id, invoices.c.period_start, invoices.c.period_end).where(
            invoices.c.customer_id == customer_id, invoices.c.status == "draft", invoices.c.kind == "period")
        async with self._deps.records.connect() as conn:
            rows = (await conn.execute(q)).all()
        stale = [r.id for r in rows if (s := subs.get(r.subscription_id)) is not None
                 and cut(Period(int(r.period_start), int(r.period_end)), s.start, s.end) is None]  # fmt: skip
        if stale:
            await self._deps.invoices.discard_drafts(customer_id, stale)

    async def _books(self, customer_id: str, at: int) -> _Books:
        contexts: dict[str, BillingContext] = {}
        for sub in await self._deps.subscriptions.of_customer(customer_id):
            try:
                contexts[sub.id] = await billing_context(self._deps, sub)
            except _FAILURES:
                continue  # its own closing records the failure; the customer's other subscriptions go on
        q = sa.select(invoices).where(invoices.c.customer_id == customer_id).order_by(invoices.c.created_at,
                                                                                       invoices.c.id)  # fmt: skip
        async with self._deps.records.connect() as conn:
            rows = [plain(r) for r in (await conn.execute(q)).mappings().all()]
        notes = await self._deps.credit_notes.of_customer(customer_id)
        notes_of: dict[str, list[dict[str, Any]]] = defaultdict(list)  # invoice id -> its credit notes
        for n in notes:
            notes_of[n["invoice_id"]].append(n)
        books = _Books(contexts, {}, defaultdict(list), set())
        for order, inv in enumerate(rows):
            if inv["kind"] == "period":
                books.period_invoices[(inv["subscription_id"], int(inv["period_start"]))] = inv
            if inv["status"] == "draft":
                continue
            if inv["kind"] == "period":
                books.settled.add((inv["subscription_id"], int(inv["period_start"])))
            all_off = credited_by_slot(notes_of[inv["id"]])
            void = inv["status"] == "void"  # billed, but nothing can be credited on it: no room
            settled_off = credited_by_slot(n for n in notes_of[inv["id"]] if n["reason"] != "manual")
            keys = await self._line_keys(inv)
            for slot, ln in billed_lines(inv["document"]):
                late = ln.late_for
                owner = ((late.subscription_id, late.start) if late is not None
                         else (inv["subscription_id"], int(inv["period_start"])))  # fmt: skip
                k = slot_key(slot)
                key = k if slot is None else keys[slot]
                books.billed[owner].append(BilledLine(
                    inv["id"], slot, key, ln.quantity, ln.amount, settled_off[k],
                    ln.amount if void else all_off[k], order))  # fmt: skip
        return books

    async def _line_keys(self, inv: dict[str, Any]) -> list[str]:
        """Each line's key; invoices made before line keys existed get theirs from their plan version."""
        lines = inv["document"]["lines"]
        if all("line_key" in ln for ln in lines):
            return [str(ln["line_key"]) for ln in lines]
        plan = await self._plan(inv)
        return legacy_keys(plan, lines) if plan is not None else [legacy_key(ln) for ln in lines]

    async def _plan(self, inv: dict[str, Any]) -> Plan | None:
        sub = await self._deps.subscriptions.get(inv["subscription_id"])
        pv = inv["document"].get("plan_version") or (sub.plan_version if sub else None)
        if sub is None or pv is None:
            return None
        if (sub.plan, pv) not in self._plans:
            self._plans[(sub.plan, pv)] = await self._deps.plans.get_version(sub.plan, pv)
        return self._plans[(sub.plan, pv)]

    # --- a pass -------------------------------------------------------------------------------------------------

    async def run(self, at: int, customer_id: str | None = None,
                  progress: Callable[[int, int], None] | None = None, settle: bool = True) -> CloseReport:  # fmt: skip
        """Closes every due period, then settles the books of every customer with a subscription;
        `progress(done, total)` after each period. Failures are recorded per subscription."""
        failed: dict[str, str] = {}
        due = await self.due(at, customer_id, failed)
        report = CloseReport(due=len(due))
        self._finalized = report.finalized_ids
        for i, d in enumerate(due, 1):
            try:
                outcome = await self.close(d)
            except Exception as e:
                # One period that cannot be priced (a meter gone, a backend down) does not hold up the others.
                log.warning("period not closed", extra={"subscription": d.subscription.id,
                                                        "period_start": d.period.start, "error": str(e)[:300]})
                failed.setdefault(d.subscription.id, str(e))
            else:
                if outcome == "finalized":
                    report.closed += 1
                elif outcome == "drafted":
                    report.drafted += 1
                else:
                    report.skipped += 1
            if progress is not None:
                progress(i, len(due))
        if settle:
            # Every customer once per settle interval (late usage may have arrived for any); in between,
            # those with a change dated in the past, whose credit notes should not wait.
            if self._settled_all_at is None or at - self._settled_all_at >= self._settle_every_ms:
                customers = await self._customers(customer_id)
                self._settled_all_at = at
            else:
                customers = await self._deps.subscriptions.marked_customers(customer_id)
            for cid in sorted(customers):
                try:
                    await self.settle_customer(cid, at, frozenset(report.finalized_ids), report)
                except Exception as e:
                    log.warning("books not settled", extra={"customer": cid, "error": str(e)[:300]})
                    for s in await self._deps.subscriptions.of_customer(cid):
                        failed.setdefault(s.id, f"settling: {e}")
        report.failed = len(failed)
        now = self._deps.clock.now_ms()
        for sub_id, error in sorted(failed.items()):
            await self.failures.record(sub_id, None, error, now)
        # What did not fail this pass closed: its failure, if one was on record, is over.
        scope = None if customer_id is None else [s.id for s in await self._deps.subscriptions.of_customer(customer_id)]
        await self.failures.clear_all_but(set(failed), scope)
        return report

    async def _customers(self, customer_id: str | None) -> set[str]:
        out: set[str] = set()
        after = ""
        while True:
            subs = await self._deps.subscriptions.page(customer_id, after, 500)
            if not subs:
                return out
            out |= {s.customer_id for s in subs}
            after = subs[-1].id



def with_late_lines(document: dict[str, Any], total: Decimal, late: list[InvoiceLine],
                    currency: str) -> dict[str, Any]:  # fmt: skip
    """The document (whose total is `total`) with `late` appended and its total raised by their amounts."""
    if not late:
        return document
    with localcontext(EXACT):
        extra = sum((ln.amount for ln in late), ZERO)
        total += extra
    return {**document, "lines": document["lines"] + [encode_line(ln, currency) for ln in late],
            "late_usage": money_text(extra, currency), "total": money_text(total, currency)}


def _late_line(ctx: BillingContext, period: Period, d: Debit) -> InvoiceLine:
    o: OwedLine = d.line
    what = o.description or (o.meter or o.charge)
    return InvoiceLine(o.key, o.charge, o.meter, f"Late usage for {period_label(ctx, period)}: {what}", d.quantity,
                       d.amount, dimension=o.dimension,
                       late_for=LateFor(ctx.subscription.id, period.start, period.end))  # fmt: skip


async def close_periodically(deps: ClosingDeps, interval_s: int) -> None:
    """The server's closing task: a pass over every subscription each `interval_s`, until cancelled."""
    closer = Closer(deps)
    while True:
        try:
            report = await closer.run(deps.clock.now_ms())
            if report.closed or report.drafted or report.failed or report.credit_notes or report.late_invoices:
                log.info("periods closed", extra={"closed": report.closed, "drafted": report.drafted,
                                                  "skipped": report.skipped, "failed": report.failed,
                                                  "credit_notes": report.credit_notes,
                                                  "late_invoices": report.late_invoices})
        except Exception as e:  # a backend may be down: the next pass tries again
            log.warning("closing pass failed", extra={"error": str(e)[:300]})
        await asyncio.sleep(interval_s)
