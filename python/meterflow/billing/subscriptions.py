"""Subscriptions: a customer on one version of a plan over [start, end), created, cancelled and moved.

A plan change ends the subscription at `at` and starts one on the new plan
(its current version) at the same instant, in one transaction. A customer
has at most one subscription per plan at any instant: a new one that would
overlap another of the same plan is refused. Checks and writes of one
customer take turns (an advisory lock on PostgreSQL, a lock in the one
embedded process on SQLite), so two concurrent requests cannot both pass.

A subscription ends once: a cancel or change of one that already has an end
(cancelled, changed, or a cancel scheduled) is a conflict, and the write
compares the version it read, so of concurrent cancels and changes exactly
one wins. An end dated in the past marks `settle_from`, from which closing
settles what was already invoiced (README, "The books after the fact").
"""

from __future__ import annotations

import asyncio
import secrets
import zlib
from dataclasses import dataclass
from typing import Any, Literal, get_args

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from meterflow.billing.catalog import PlanCatalog
from meterflow.config import Settings
from meterflow.customers import timezone_history
from meterflow.kernel.clock import DAY_MS, SYSTEM, Clock
from meterflow.kernel.errors import FieldError
from meterflow.records import Records
from meterflow.records.tables import customers, subscriptions

EndReason = Literal["canceled", "changed"]
Status = Literal["scheduled", "active", "ended"]
STATUSES: tuple[Status, ...] = get_args(Status)
ID_PREFIX = "sub_"


class SubscriptionError(FieldError):
    """A subscription request is invalid; `field` names the culprit."""


class SubscriptionConflict(Exception):
    """The change would overlap another subscription to the same plan, or the subscription has ended."""

    code = "subscription_conflict"


class SubscriptionEnded(SubscriptionConflict):
    """The subscription already has an end (cancelled, changed, or a cancel scheduled): it ends once."""

    code = "subscription_ended"


@dataclass(frozen=True)
class Subscription:
    id: str
    customer_id: str
    plan: str
    plan_version: int
    start: int
    end: int | None
    end_reason: EndReason | None
    created_at: int
    updated_at: int
    version: int
    settle_from: int | None = None

    def active_at(self, t: int) -> bool:
        return self.start <= t and (self.end is None or t < self.end)

    def as_json(self, now: int) -> dict[str, Any]:
        status = "active" if self.active_at(now) else ("scheduled" if now < self.start else "ended")
        return {"id": self.id, "customer_id": self.customer_id, "plan": self.plan, "plan_version": self.plan_version,
                "start": self.start, "end": self.end, "end_reason": self.end_reason, "status": status,
                "created_at": self.created_at, "updated_at": self.updated_at, "version": self.version}  # fmt: skip


def _sub(row: Any) -> Subscription:
    return Subscription(
        id=row["id"], customer_id=row["customer_id"], plan=row["plan_code"], plan_version=int(row["plan_version"]),
        start=int(row["start_at"]), end=None if row["end_at"] is None else int(row["end_at"]),
        end_reason=row["end_reason"], created_at=int(row["created_at"]), updated_at=int(row["updated_at"]),
        version=int(row["version"]), settle_from=None if row.get("settle_from") is None else int(row["settle_from"]),
    )  # fmt: skip


class Subscriptions:
    def __init__(self, records: Records, plans: PlanCatalog, *, clock: Clock = SYSTEM,
                 max_backdate_days: int = Settings.subscription_max_backdate_days) -> None:
        self._db = records
        self._plans = plans
        self._clock = clock
        self._max_backdate_days = max_backdate_days
        self._local = asyncio.Lock()  # SQLite: the one embedded worker's writes take turns

    async def get(self, sub_id: str) -> Subscription | None:
        async with self._db.connect() as conn:
            row = (await conn.execute(sa.select(subscriptions).where(subscriptions.c.id == sub_id))).mappings().first()
        return None if row is None else _sub(row)

    async def page(self, customer_id: str | None, after: str, limit: int) -> list[Subscription]:
        q = sa.select(subscriptions).where(subscriptions.c.id > after)
        if customer_id is not None:
            q = q.where(subscriptions.c.customer_id == customer_id)
        async with self._db.connect() as conn:
            rows = (await conn.execute(q.order_by(subscriptions.c.id).limit(limit))).mappings().all()
        return [_sub(r) for r in rows]

    async def of_customer(self, customer_id: str) -> list[Subscription]:
        """Every subscription of a customer, oldest start first."""
        q = sa.select(subscriptions).where(subscriptions.c.customer_id == customer_id)
        async with self._db.connect() as conn:
            rows = (await conn.execute(q.order_by(subscriptions.c.start_at, subscriptions.c.id))).mappings().all()
        return [_sub(r) for r in rows]

    async def timezone_history(self, customer_id: str) -> list[tuple[int, str]]:
        """The customer's time zones [(changed_at, zone)] for billing periods (kept for a deleted customer)."""
        return await timezone_history(self._db, customer_id)

    async def marked_customers(self, customer_id: str | None = None) -> set[str]:
        """The customers with a subscription whose `settle_from` is set (a change dated in the past)."""
        q = sa.select(subscriptions.c.customer_id).where(subscriptions.c.settle_from.is_not(None)).distinct()
        if customer_id is not None:
            q = q.where(subscriptions.c.customer_id == customer_id)
        async with self._db.connect() as conn:
            return {str(c) for c in (await conn.execute(q)).scalars()}

    async def mark_settled(self, sub_id: str, settle_from: int) -> None:
        """Clears `settle_from` once closing has settled from it (unless a later change moved it meanwhile)."""
        async with self._db.begin() as conn:
            await conn.execute(sa.update(subscriptions).where(subscriptions.c.id == sub_id,
                                                              subscriptions.c.settle_from == settle_from)
                               .values(settle_from=None))  # fmt: skip

    async def create(self, customer_id: str, plan_code: str, start: int) -> Subscription:
        days = self._max_backdate_days
        if start < self._clock.now_ms() - days * DAY_MS:
            # Every period since `start` is invoiced at once: a start at epoch 0 would be ~680 invoices.
            raise SubscriptionError("start", f"`start` ({start}) is more than {days} days ago; a subscription may "
                                    f"start at most MF_SUBSCRIPTION_MAX_BACKDATE_DAYS ({days}) days in the past.")
        pv = await self._plan_version(plan_code, "plan")
        async with self._turn(customer_id) as conn:
            live = await conn.execute(
                sa.select(customers.c.id).where(customers.c.id == customer_id, customers.c.deleted_at.is_(None))
            )
            if live.first() is None:
                raise SubscriptionError("customer_id", f"`customer_id`: there is no customer {customer_id!r}.")
            await _refuse_overlap(conn, customer_id, plan_code, start, None)
            return await _insert(conn, customer_id, plan_code, pv, start, self._clock.now_ms())

    async def cancel(self, sub_id: str, at: int) -> Subscription | None:
        sub = await self.get(sub_id)
        if sub is None:
            return None
        async with self._turn(sub.customer_id) as conn:
            sub = await self._current(conn, sub_id)
            self._check_end(sub, at)
            return await _end(conn, sub, at, "canceled", self._clock.now_ms())

    async def change(self, sub_id: str, plan_code: str, at: int) -> tuple[Subscription, Subscription] | None:
        """Ends the subscription at `at` and starts one on `plan_code` from `at`; returns (ended, new)."""
        sub = await self.get(sub_id)
        if sub is None:
            return None
        pv = await self._plan_version(plan_code, "plan")
        async with self._turn(sub.customer_id) as conn:
            sub = await self._current(conn, sub_id)
            self._check_end(sub, at)
            if at == sub.start:
                raise SubscriptionError("at", f"`at` ({at}) is the subscription's start; a change must come after it.")
            now = self._clock.now_ms()
            ended = await _end(conn, sub, at, "changed", now)
            await _refuse_overlap(conn, sub.customer_id, plan_code, at, None, exclude=sub.id)
            new = await _insert(conn, sub.customer_id, plan_code, pv, at, now)
            return ended, new

    async def _plan_version(self, code: str, field: str) -> int:
        if not isinstance(code, str) or not code:
            raise SubscriptionError(field, f"`{field}` is required: the code of a plan.")
        found = await self._plans.get(code)
        if found is None:
            raise SubscriptionError(field, f"`{field}`: there is no plan {code!r}.")
        if found.archived:
            raise SubscriptionError(field, f"`{field}`: plan {code!r} is archived and takes no new subscriptions.")
        return found.plan_version

    @staticmethod
    def _check_end(sub: Subscription, at: int) -> None:
        if at < sub.start:
            raise SubscriptionError("at", f"`at` ({at}) is before the subscription's start ({sub.start}).")
        if sub.end is not None:
            raise SubscriptionEnded(f"Subscription {sub.id} already ends at {sub.end} ({sub.end_reason}); "
                                    "a subscription ends once.")  # fmt: skip

    @staticmethod
    async def _current(conn: AsyncConnection, sub_id: str) -> Subscription:
        row = (await conn.execute(sa.select(subscriptions).where(subscriptions.c.id == sub_id))).mappings().one()
        return _sub(row)

    def _turn(self, customer_id: str) -> _Turn:
        return _Turn(self, customer_id)


class _Turn:
    """A transaction in which one customer's subscriptions are checked and written by one request at a time."""

    def __init__(self, owner: Subscriptions, customer_id: str) -> None:
        self._owner = owner
        self._customer = customer_id
        self._tx: Any = None
        self._locked = False

    async def __aenter__(self) -> AsyncConnection:
        db = self._owner._db
        if db.name == "sqlite":
            await self._owner._local.acquire()
            self._locked = True
        self._tx = db.begin()
        try:
            conn: AsyncConnection = await self._tx.__aenter__()
            if db.name == "postgresql":
                key = zlib.crc32(self._customer.encode()) - 2**31
                await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:ns, :k)"), {"ns": _LOCK_NS, "k": key})
        except BaseException:
            self._release()
            raise
        return conn

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self._tx.__aexit__(*exc)
        finally:
            self._release()

    def _release(self) -> None:
        if self._locked:
            self._owner._local.release()
            self._locked = False


_LOCK_NS = 0x4D46_5342  # "MFSB": subscriptions' advisory locks


async def _refuse_overlap(
    conn: AsyncConnection, customer_id: str, plan_code: str, start: int, end: int | None, exclude: str = ""
) -> None:
    """Raises SubscriptionConflict if [start, end) meets another subscription of the customer to the plan."""
    c = subscriptions.c
    q = sa.select(c.id, c.start_at, c.end_at).where(
        c.customer_id == customer_id, c.plan_code == plan_code, c.id != exclude,
        sa.or_(c.end_at.is_(None), c.end_at > start),
    )  # fmt: skip
    if end is not None:
        q = q.where(c.start_at < end)
    row = (await conn.execute(q.limit(1))).first()
    if row is not None:
        until = "open-ended" if row[2] is None else f"until {row[2]}"
        raise SubscriptionConflict(
            f"Customer {customer_id!r} already has subscription {row[0]} to plan {plan_code!r} from {row[1]} "
            f"({until}), which overlaps; cancel or change it first."
        )


async def _insert(conn: AsyncConnection, customer_id: str, plan_code: str, pv: int, start: int,
                  now: int) -> Subscription:  # fmt: skip
    end = None
    row = {"id": ID_PREFIX + secrets.token_hex(12), "customer_id": customer_id, "plan_code": plan_code,
           "plan_version": pv, "start_at": start, "end_at": end, "end_reason": None, "created_at": now,
           "updated_at": now, "version": 1}  # fmt: skip
    await conn.execute(sa.insert(subscriptions).values(row))
    return _sub(row)


async def _end(conn: AsyncConnection, sub: Subscription, at: int, reason: EndReason, now: int) -> Subscription:
    """Ends `sub` at `at` if it is still the version read and has no end; an end in the past marks
    `settle_from` (the earliest one wins) so that closing settles what was invoiced after it."""
    settle = sub.settle_from
    if at < now:
        settle = at if settle is None else min(settle, at)
    done = await conn.execute(
        sa.update(subscriptions)
        .where(subscriptions.c.id == sub.id, subscriptions.c.version == sub.version, subscriptions.c.end_at.is_(None))
        .values(end_at=at, end_reason=reason, updated_at=now, version=sub.version + 1, settle_from=settle)
    )  # fmt: skip
    if done.rowcount != 1:
        raise SubscriptionEnded(f"Subscription {sub.id} changed meanwhile; read it again.")
    return Subscription(sub.id, sub.customer_id, sub.plan, sub.plan_version, sub.start, at, reason,
                        sub.created_at, now, sub.version + 1, settle)  # fmt: skip
