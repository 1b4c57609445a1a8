"""The meters in force: those of the config (read-only) plus those made through the API."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from meterflow.metering.meters import CODE_RE, Meter, parse_meter
from meterflow.records import IfMatch, Records, StaleVersion, locked_row, plain
from meterflow.records.tables import meters


class MeterConflict(Exception):
    """The change collides with an existing meter or a config-defined one."""


class MeterCatalog:
    def __init__(self, records: Records, config_meters: tuple[Meter, ...]) -> None:
        self._config = {m.code: m for m in config_meters}
        # Read on every call: every worker sees a change at once.
        self._db = records

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

    async def create(self, meter: Meter) -> int:
        """Makes a new meter; returns its version."""
        conflict = MeterConflict(f"Meter {meter.code!r} already exists; use PUT /v1/meters/{meter.code} to replace it.")
        if meter.code in self._config:
            raise conflict
        try:
            async with self._db.begin() as conn:
                old = await locked_row(conn, meters, meters.c.code == meter.code)
                if old is not None and old["deleted_at"] is None:
                    raise conflict
                return await _write(conn, meter, old)
        except IntegrityError:  # created concurrently
            raise conflict from None

    async def replace(self, meter: Meter, if_match: IfMatch | None = None) -> tuple[bool, int]:
        """Creates or replaces; returns (created, version)."""
        self._writable(meter.code)
        for attempt in range(2):  # the second turn only after a concurrent create of the same code
            try:
                async with self._db.begin() as conn:
                    old = await locked_row(conn, meters, meters.c.code == meter.code)
                    live = old is not None and old["deleted_at"] is None
                    if if_match is not None:
                        if_match.check(int(old["version"]) if old is not None and live else None)
                    return not live, await _write(conn, meter, old)
            except IntegrityError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def delete(self, code: str, if_match: IfMatch | None = None) -> bool:
        self._writable(code)
        if not CODE_RE.fullmatch(code):
            return False
        q = sa.update(meters).where(meters.c.code == code, meters.c.deleted_at.is_(None))
        if if_match is not None and not if_match.any:
            q = q.where(meters.c.version.in_(sorted(if_match.versions)))
        async with self._db.begin() as conn:
            done = await conn.execute(q.values(deleted_at=_now_ms(), version=meters.c.version + 1))
        if not done.rowcount and if_match is not None and await self._row(code) is not None:
            raise StaleVersion
        return bool(done.rowcount)

    async def _row(self, code: str, include_deleted: bool = False) -> dict[str, Any] | None:
        q = sa.select(meters).where(meters.c.code == code)
        if not include_deleted:
            q = q.where(meters.c.deleted_at.is_(None))
        async with self._db.connect() as conn:
            row = (await conn.execute(q)).mappings().first()
        return plain(row) if row is not None else None

    def _writable(self, code: str) -> None:
        if code in self._config:
            raise MeterConflict(f"Meter {code!r} is defined in the configuration file; change it there.")


def _now_ms() -> int:
    return int(time.time() * 1000)


async def _write(conn: AsyncConnection, meter: Meter, old: dict[str, Any] | None) -> int:
    """Inserts, or updates `old` (its row locked by the caller's transaction); returns the new version."""
    now = _now_ms()
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


def _body(m: Meter) -> dict[str, object]:
    body = m.as_json()
    del body["source"]
    return body
