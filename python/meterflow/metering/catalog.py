"""The meters in force: those of the config (read-only) plus those made through the API, each with its versions.

The `meters` row is the current record (its ETag, the list, GET). Every
definition a stored meter has had is also kept in `meter_versions`, in force
from its `effective_at` until the next one (a NULL definition: deleted from
then on), so a period is priced with the version in force at its start.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from meterflow.kernel.clock import SYSTEM, Clock
from meterflow.metering.meters import CODE_RE, Meter, parse_meter
from meterflow.records import IfMatch, Records, live_row, locked_row, read_row
from meterflow.records.tables import meter_versions, meters, plan_versions, subscriptions

# How long after its end a subscription may still receive usage: the ingest age limit plus
# the clock skew allowed ahead (MF_MAX_AGE_MS + MF_MAX_FUTURE_MS, the defaults here).
LATE_WINDOW_MS = 30 * 86_400_000 + 300_000


class MeterConflict(Exception):
    """The change collides with an existing meter or a config-defined one."""


class MeterInUse(Exception):
    """A subscription that is active, or may still receive late usage, bills with a plan version pricing the meter."""

    def __init__(self, code: str, subscription_id: str) -> None:
        self.code = code
        self.subscription_id = subscription_id
        super().__init__(f"Meter {code!r} is priced by subscription {subscription_id}; cancel it or move it to a "
                         "plan without the meter first.")  # fmt: skip


@dataclass(frozen=True)
class MeterVersion:
    """One definition of a meter, in force from `effective_at` (meter None: deleted from then on)."""

    effective_at: int
    created_at: int | None  # None for a config meter, which has no record
    meter: Meter | None

    @property
    def deleted(self) -> bool:
        return self.meter is None


class MeterCatalog:
    def __init__(
        self,
        records: Records,
        config_meters: tuple[Meter, ...],
        clock: Clock = SYSTEM,
        late_window_ms: int = LATE_WINDOW_MS,
    ) -> None:
        self._config = {m.code: m for m in config_meters}
        # Read on every call: every worker sees a change at once.
        self._db = records
        self._clock = clock
        self._late_window_ms = late_window_ms

    async def get(self, code: str) -> Meter | None:
        found = await self.get_versioned(code)
        return found[0] if found else None

    async def get_versioned(self, code: str) -> tuple[Meter, int | None] | None:
        """The meter and its version (None for a config meter, which has none)."""
        if code in self._config:
            return self._config[code], None
        if not CODE_RE.fullmatch(code):  # no such meter can exist: no query
            return None
        row = await self._row(code)
        return (parse_meter(row["definition"], "api"), int(row["version"])) if row else None

    async def at(self, code: str, t: int) -> Meter | None:
        """The version in force at instant `t`: the latest from `t` or before; for a `t` before the
        first version, the first. None if that version is a deletion, or the meter has no versions."""
        if code in self._config:
            return self._config[code]
        if not CODE_RE.fullmatch(code):
            return None
        v = meter_versions.c
        q = sa.select(v.definition).where(v.code == code)
        async with self._db.connect() as conn:
            found = (await conn.execute(q.where(v.effective_at <= t).order_by(v.effective_at.desc()).limit(1))).first()
            if found is None:
                found = (await conn.execute(q.order_by(v.effective_at).limit(1))).first()
        return None if found is None or found[0] is None else parse_meter(found[0], "api")

    async def versions(self, code: str) -> list[MeterVersion] | None:
        """Every version of the meter, oldest first; None if it never existed."""
        if code in self._config:
            return [MeterVersion(0, None, self._config[code])]
        if not CODE_RE.fullmatch(code):
            return None
        v = meter_versions.c
        q = sa.select(v.effective_at, v.created_at, v.definition).where(v.code == code).order_by(v.effective_at)
        async with self._db.connect() as conn:
            rows = (await conn.execute(q)).all()
        if not rows and await self._row(code, include_deleted=True) is None:
            return None
        return [MeterVersion(int(e), int(c), None if d is None else parse_meter(d, "api")) for e, c, d in rows]

    async def list(self, after: str = "", limit: int = 100) -> list[tuple[Meter, int | None]]:
        """Meters in code order after the cursor, each with its version (None: config)."""
        config: list[tuple[Meter, int | None]] = [(m, None) for code, m in sorted(self._config.items()) if code > after]
        q = (
            sa.select(meters.c.definition, meters.c.version)
            .where(meters.c.deleted_at.is_(None), meters.c.code > after)
            .order_by(meters.c.code)
            .limit(limit)
        )
        async with self._db.connect() as conn:
            stored = [(parse_meter(d, "api"), int(v)) for d, v in (await conn.execute(q)).all()]
        merged = sorted({m.code: (m, v) for m, v in stored + config}.values(), key=lambda mv: mv[0].code)
        return merged[:limit]

    async def create(self, meter: Meter, effective_at: int | None = None) -> int:
        """Makes a new meter, in force from `effective_at` (default now); returns its version."""
        conflict = MeterConflict(f"Meter {meter.code!r} already exists; use PUT /v1/meters/{meter.code} to replace it.")
        if meter.code in self._config:
            raise conflict
        try:
            async with self._db.begin() as conn:
                old = await locked_row(conn, meters, meters.c.code == meter.code)
                if old is not None and old["deleted_at"] is None:
                    raise conflict
                return await self._write(conn, meter, old, effective_at)
        except IntegrityError:  # created concurrently
            raise conflict from None

    async def replace(
        self, meter: Meter, if_match: IfMatch | None = None, effective_at: int | None = None
    ) -> tuple[bool, int]:
        """Creates or replaces, in force from `effective_at` (default now); returns (created, version)."""
        self._writable(meter.code)
        for attempt in range(2):  # the second turn only after a concurrent create of the same code
            try:
                async with self._db.begin() as conn:
                    old = await locked_row(conn, meters, meters.c.code == meter.code)
                    live = old is not None and old["deleted_at"] is None
                    if if_match is not None:
                        if_match.check(int(old["version"]) if old is not None and live else None)
                    return not live, await self._write(conn, meter, old, effective_at)
            except IntegrityError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def delete(self, code: str, if_match: IfMatch | None = None) -> bool:
        """Deletes the meter from now on; MeterInUse while a subscription may still be billed for it."""
        self._writable(code)
        if not CODE_RE.fullmatch(code):
            return False
        now = self._clock.now_ms()
        async with self._db.begin() as conn:
            old = await live_row(conn, meters, meters.c.code == code, if_match)
            if old is None:
                return False
            user = await _subscription_pricing(conn, code, now - self._late_window_ms)
            if user is not None:
                raise MeterInUse(code, user)
            await conn.execute(
                sa.update(meters).where(meters.c.code == code).values(deleted_at=now, version=int(old["version"]) + 1)
            )
            # Deleted from now on: a version dated later would bring it back in pricing only.
            await conn.execute(sa.delete(meter_versions).where(meter_versions.c.code == code,
                                                               meter_versions.c.effective_at > now))  # fmt: skip
            await _put_version(conn, code, now, None, now)
        return True

    async def _write(
        self, conn: AsyncConnection, meter: Meter, old: dict[str, Any] | None, effective_at: int | None
    ) -> int:
        """Writes the current record (`old`'s row locked by the caller's transaction) and the version in
        force from `effective_at`; marks the subscriptions a version dated in the past touches."""
        now = self._clock.now_ms()
        at = now if effective_at is None else effective_at
        version = await _write_current(conn, meter, old, now)
        # The meter is live from `at` on: a deletion recorded after that no longer holds.
        v = meter_versions.c
        await conn.execute(sa.delete(meter_versions).where(v.code == meter.code, v.effective_at > at,
                                                           v.definition.is_(None)))  # fmt: skip
        await _put_version(conn, meter.code, at, _body(meter), now)
        if at < now:
            await _mark_settle_from(conn, meter.code, at)
        return version

    async def _row(self, code: str, include_deleted: bool = False) -> dict[str, Any] | None:
        return await read_row(self._db, meters, meters.c.code == code, include_deleted)

    def _writable(self, code: str) -> None:
        if code in self._config:
            raise MeterConflict(f"Meter {code!r} is defined in the configuration file; change it there.")


async def _write_current(conn: AsyncConnection, meter: Meter, old: dict[str, Any] | None, now: int) -> int:
    """Inserts the `meters` row, or updates `old`; returns the new version."""
    if old is None:
        await conn.execute(sa.insert(meters).values(code=meter.code, definition=_body(meter), created_at=now,
                                                    updated_at=now, version=1))  # fmt: skip
        return 1
    live = old["deleted_at"] is None
    version = int(old["version"]) + 1
    await conn.execute(
        sa.update(meters)
        .where(meters.c.code == meter.code)
        .values(
            definition=_body(meter),
            created_at=old["created_at"] if live else now,
            updated_at=now,
            deleted_at=None,
            version=version,
        )
    )
    return version


async def _put_version(
    conn: AsyncConnection, code: str, effective_at: int, definition: dict[str, object] | None, now: int
) -> None:
    """Records the definition in force from `effective_at` (None: deleted), replacing one of the same instant."""
    # sa.null(): SQL NULL, the tombstone (a JSON column stores None as the JSON text 'null').
    value: Any = sa.null() if definition is None else definition
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(meter_versions)
    await conn.execute(
        insert.values(code=code, effective_at=effective_at, definition=value, created_at=now).on_conflict_do_update(
            index_elements=[meter_versions.c.code, meter_versions.c.effective_at],
            set_={"definition": value, "created_at": now},
        )
    )


async def plan_versions_pricing(conn: AsyncConnection, code: str) -> list[tuple[str, int]]:
    """The (plan, plan_version) pairs whose definition has a charge on meter `code`."""
    rows = (await conn.execute(sa.select(plan_versions.c.code, plan_versions.c.plan_version,
                                         plan_versions.c.definition))).all()  # fmt: skip
    return [(str(p), int(pv)) for p, pv, d in rows if code in _priced_meters(d)]


def _priced_meters(definition: Any) -> set[str]:
    charges = definition.get("charges") if isinstance(definition, dict) else None
    return {c["meter"] for c in charges or () if isinstance(c, dict) and isinstance(c.get("meter"), str)}


def _billing_with(pairs: Sequence[tuple[str, int]]) -> sa.ColumnElement[bool]:
    c = subscriptions.c
    return sa.or_(*(sa.and_(c.plan_code == p, c.plan_version == pv) for p, pv in pairs))


async def _subscription_pricing(conn: AsyncConnection, code: str, ended_after: int) -> str | None:
    """A subscription billing with a plan version that prices `code`, open or ended after `ended_after`."""
    pairs = await plan_versions_pricing(conn, code)
    if not pairs:
        return None
    c = subscriptions.c
    q = sa.select(c.id).where(_billing_with(pairs), sa.or_(c.end_at.is_(None), c.end_at > ended_after))
    found = (await conn.execute(q.order_by(c.id).limit(1))).first()
    return None if found is None else str(found[0])


async def _mark_settle_from(conn: AsyncConnection, code: str, effective_at: int) -> None:
    """Closing settles the finalized periods from `effective_at` of every subscription the version touches:
    those billing with a plan version that prices the meter and running past `effective_at`."""
    pairs = await plan_versions_pricing(conn, code)
    if not pairs:
        return
    c = subscriptions.c
    at = sa.literal(effective_at, sa.BigInteger)
    earliest = sa.case((sa.or_(c.settle_from.is_(None), c.settle_from > at), at), else_=c.settle_from)
    await conn.execute(
        sa.update(subscriptions)
        .where(_billing_with(pairs), sa.or_(c.end_at.is_(None), c.end_at > effective_at))
        .values(settle_from=earliest)
    )


def _body(m: Meter) -> dict[str, object]:
    body = m.as_json()
    del body["source"]
    return body
