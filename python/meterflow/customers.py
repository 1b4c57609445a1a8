"""Customers: rows of the records database with a version each; deletes are soft (invoices keep them)."""

from __future__ import annotations

import re
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from meterflow.kernel.calendar import time_zone
from meterflow.kernel.clock import SYSTEM, Clock
from meterflow.kernel.errors import FieldError
from meterflow.kernel.money import MINOR_UNITS
from meterflow.records import IfMatch, Records, live_row, locked_row, plain, read_row
from meterflow.records.tables import customer_timezones, customers

EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
FIELDS = ("name", "email", "currency", "timezone", "metadata")
# PostgreSQL's text cannot hold U+0000: refused in every text field on both engines alike.
NUL = "\x00"
NUL_MESSAGE = "`{}` must not contain the NUL character (U+0000)."


class CustomerError(FieldError):
    """A customer document is invalid."""


def validate(doc: Any, partial: bool = False) -> dict[str, Any]:
    """The writable fields of a customer, checked; `partial` for PATCH."""
    if not isinstance(doc, dict):
        raise CustomerError("body", "The body must be a JSON object.")
    unknown = sorted(set(doc) - set(FIELDS) - {"id", "created_at", "updated_at", "version"})
    if unknown:
        raise CustomerError(unknown[0], f"`{unknown[0]}` is not a customer field; the fields are {', '.join(FIELDS)}.")
    out: dict[str, Any] = {}
    for f in FIELDS:
        if f not in doc:
            continue
        v = doc[f]
        if f == "metadata":
            if v is None:
                v = {}
            if not isinstance(v, dict) or not all(
                isinstance(k, str) and isinstance(x, str) and 0 < len(k) <= 100 and len(x) <= 1000 for k, x in v.items()
            ):
                raise CustomerError(
                    "metadata", "`metadata` must map keys of 1 to 100 characters to strings of at most 1000."
                )
            if len(v) > 100:
                raise CustomerError("metadata", "`metadata` holds more than 100 keys, the limit.")
            if any(NUL in k or NUL in x for k, x in v.items()):
                raise CustomerError("metadata", NUL_MESSAGE.format("metadata"))
        elif v is None and f == "timezone" and partial:
            raise CustomerError(f, "`timezone` cannot be null; give an IANA time zone name such as UTC.")
        elif v is not None:
            if not isinstance(v, str):
                raise CustomerError(f, f"`{f}` must be a string.")
            if NUL in v:
                raise CustomerError(f, NUL_MESSAGE.format(f))
            if f == "name" and len(v) > 500:
                raise CustomerError(f, "`name` is longer than 500 characters.")
            if f == "email" and (len(v) > 320 or not EMAIL_RE.fullmatch(v)):
                raise CustomerError(f, f"`email` {v!r} is not an email address.")
            if f == "currency" and v not in MINOR_UNITS:
                raise CustomerError(f, f"`currency` {v!r} must be an ISO 4217 code such as EUR or USD.")
            if f == "timezone" and time_zone(v) is None:
                raise CustomerError(f, f"`timezone` {v[:100]!r} is not an IANA time zone name such as Europe/Paris.")
        out[f] = v
    if not partial:
        for f in FIELDS:
            out.setdefault(f, {} if f == "metadata" else None)
        out["timezone"] = out["timezone"] or "UTC"
    return out


class Customers:
    """Customers in the records database; every change raises `version` by one."""

    def __init__(self, records: Records, clock: Clock = SYSTEM) -> None:
        self._db = records
        self._clock = clock

    async def put(
        self, customer_id: str, fields: dict[str, Any], if_match: IfMatch | None = None
    ) -> tuple[dict[str, Any], bool]:
        """Creates or replaces; returns (customer, created)."""
        for attempt in range(2):  # the second turn only after a concurrent create of the same id
            try:
                async with self._db.begin() as conn:
                    old = await locked_row(conn, customers, customers.c.id == customer_id)
                    live = old is not None and old["deleted_at"] is None
                    if if_match is not None:
                        if_match.check(old["version"] if live and old is not None else None)
                    now = self._clock.now_ms()
                    if old is None:
                        row = {"id": customer_id, **fields, "created_at": now, "updated_at": now, "deleted_at": None,
                               "version": 1}  # fmt: skip
                        await conn.execute(sa.insert(customers).values(row))
                        await _record_timezone(conn, customer_id, row["timezone"], now)
                        return _public(row), True
                    if "timezone" in fields:
                        await _record_timezone(conn, customer_id, fields["timezone"], now)
                    values = {**fields, "updated_at": now, "deleted_at": None, "version": old["version"] + 1,
                              **({} if live else {"created_at": now})}  # fmt: skip
                    await conn.execute(sa.update(customers).where(customers.c.id == customer_id).values(values))
                    return _public({**old, **values}), not live
            except IntegrityError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def patch(
        self, customer_id: str, fields: dict[str, Any], if_match: IfMatch | None = None
    ) -> dict[str, Any] | None:
        async with self._db.begin() as conn:
            old = await live_row(conn, customers, customers.c.id == customer_id, if_match)
            if old is None:
                return None
            values = {**fields, "updated_at": self._clock.now_ms(), "version": old["version"] + 1}
            await conn.execute(sa.update(customers).where(customers.c.id == customer_id).values(values))
            if "timezone" in fields:
                await _record_timezone(conn, customer_id, fields["timezone"], values["updated_at"])
        return _public({**old, **values})

    async def timezone_history(self, customer_id: str) -> list[tuple[int, str]]:
        """[(changed_at, zone)] oldest first; the first one is in force since ever. UTC for an unknown customer."""
        return await timezone_history(self._db, customer_id)

    async def get(self, customer_id: str) -> dict[str, Any] | None:
        row = await self._row(customer_id)
        return _public(row) if row is not None else None

    async def delete(self, customer_id: str, if_match: IfMatch | None = None) -> bool:
        """Soft delete: the row stays (invoices keep their customer), reads no longer see it."""
        async with self._db.begin() as conn:
            old = await live_row(conn, customers, customers.c.id == customer_id, if_match)
            if old is None:
                return False
            values = {"deleted_at": self._clock.now_ms(), "version": old["version"] + 1}
            await conn.execute(sa.update(customers).where(customers.c.id == customer_id).values(values))
        return True

    async def list(self, after: str, limit: int, name: str = "", email: str = "") -> list[dict[str, Any]]:
        """In id order after the cursor; `name` and `email` keep those containing the text (any case)."""
        q = sa.select(customers).where(customers.c.deleted_at.is_(None), customers.c.id > after)
        if name:
            q = q.where(customers.c.name.icontains(name, autoescape=True))
        if email:
            q = q.where(customers.c.email.icontains(email, autoescape=True))
        async with self._db.connect() as conn:
            rows = (await conn.execute(q.order_by(customers.c.id).limit(limit))).mappings().all()
        return [_public(plain(r)) for r in rows]

    async def _row(self, customer_id: str, include_deleted: bool = False) -> dict[str, Any] | None:
        return await read_row(self._db, customers, customers.c.id == customer_id, include_deleted)


async def _record_timezone(conn: AsyncConnection, customer_id: str, zone: str, at: int) -> None:
    """Adds `zone` to the customer's history from `at` when it differs from the zone in force; the
    first zone of a customer is in force since ever (changed_at 0), so periods before its creation
    (a subscription started in the past) have one too."""
    h = customer_timezones.c
    latest = (await conn.execute(sa.select(h.timezone).where(h.customer_id == customer_id)
                                 .order_by(h.changed_at.desc()).limit(1))).scalar()  # fmt: skip
    if latest == zone:
        return
    at = 0 if latest is None else at
    await conn.execute(sa.delete(customer_timezones).where(h.customer_id == customer_id, h.changed_at == at))
    await conn.execute(sa.insert(customer_timezones).values(customer_id=customer_id, changed_at=at, timezone=zone))


async def timezone_history(records: Records, customer_id: str) -> list[tuple[int, str]]:
    """A customer's time zones [(changed_at, zone)], oldest first (see `_record_timezone`)."""
    h = customer_timezones.c
    q = sa.select(h.changed_at, h.timezone).where(h.customer_id == customer_id).order_by(h.changed_at)
    async with records.connect() as conn:
        rows = [(int(a), str(z)) for a, z in (await conn.execute(q)).all()]
        if rows:
            return rows
        tz = (await conn.execute(sa.select(customers.c.timezone).where(customers.c.id == customer_id))).scalar()
    return [(0, str(tz or "UTC"))]


def _public(row: dict[str, Any]) -> dict[str, Any]:
    """A customer as the API shows it (the version travels as the ETag)."""
    return {"id": row["id"], **{f: row[f] for f in FIELDS}, "created_at": row["created_at"],
            "updated_at": row["updated_at"], "version": row["version"]}  # fmt: skip
