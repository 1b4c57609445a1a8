"""The plans in force: those of the config (read-only) plus those made through the API, each with its versions.

A plan's definition is versioned, not edited in place, once a subscription
bills with it: `replace` then adds a version and new subscriptions take it,
while existing ones keep theirs until moved. Config plans are recorded as
versions too (a new one whenever the config's definition changes), so a
subscription names any plan the same way: (code, plan_version).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from meterflow.billing.plans import Plan, PlanError, parse_plan
from meterflow.kernel.clock import now_ms
from meterflow.metering.catalog import MeterCatalog
from meterflow.metering.meters import CODE_RE, Meter
from meterflow.records import IfMatch, Records, StaleVersion
from meterflow.records.tables import plan_versions, plans, subscriptions

log = logging.getLogger("meterflow.billing")


class PlanConflict(Exception):
    """The change collides with an existing plan or a config-defined one."""


class StoredPlanBroken(Exception):
    """A stored plan version no longer parses (a meter it prices was deleted)."""


@dataclass(frozen=True)
class StoredPlan:
    plan: Plan
    plan_version: int  # the definition new subscriptions take
    version: int | None  # the record's (the ETag); None for a config plan
    archived: bool = False
    source: Literal["config", "api"] = "api"

    def as_json(self) -> dict[str, Any]:
        return {**self.plan.as_json(), "plan_version": self.plan_version, "archived": self.archived,
                "source": self.source, "version": self.version}  # fmt: skip


async def meters_of(doc: Any, catalog: MeterCatalog) -> dict[str, Meter]:
    """The meters a plan document names (those that exist), for `parse_plan`."""
    codes = {c.get("meter") for c in (doc.get("charges") or []) if isinstance(c, dict)} if isinstance(doc, dict) else ()
    out: dict[str, Meter] = {}
    for code in codes:
        if isinstance(code, str) and code and (m := await catalog.get(code)) is not None:
            out[code] = m
    return out


class PlanCatalog:
    def __init__(self, records: Records, meters: MeterCatalog, config_plans: tuple[Plan, ...]) -> None:
        self._db = records
        self._meters = meters
        self._config = {p.code: p for p in config_plans}
        self._config_versions: dict[str, int] = {}

    async def start(self) -> None:
        """Records each config plan's definition as a version (a new one if it changed since the last start)."""
        for code, plan in sorted(self._config.items()):
            for _ in range(_RETRIES):
                try:
                    async with self._db.begin() as conn:
                        latest = await _latest_version(conn, code)
                        if latest is not None and latest[1] == plan.as_json():
                            self._config_versions[code] = latest[0]
                            break
                        n = 1 if latest is None else latest[0] + 1
                        await conn.execute(sa.insert(plan_versions).values(
                            code=code, plan_version=n, definition=plan.as_json(), created_at=now_ms()))  # fmt: skip
                        self._config_versions[code] = n
                        break
                except IntegrityError:
                    continue  # another worker recorded it: read it on the next turn

    def is_config(self, code: str) -> bool:
        return code in self._config

    async def get(self, code: str) -> StoredPlan | None:
        """The plan as new subscriptions take it (archived ones included, flagged)."""
        if code in self._config:
            return StoredPlan(self._config[code], self._config_versions.get(code, 1), None, False, "config")
        if not CODE_RE.fullmatch(code):
            return None
        async with self._db.connect() as conn:
            row = (await conn.execute(sa.select(plans).where(plans.c.code == code))).mappings().first()
            if row is None:
                return None
            plan = await self._version(conn, code, int(row["plan_version"]))
        return StoredPlan(plan, int(row["plan_version"]), int(row["version"]), row["archived_at"] is not None)

    async def get_version(self, code: str, plan_version: int) -> Plan:
        """One version of a plan, as a subscription bills with it."""
        async with self._db.connect() as conn:
            return await self._version(conn, code, plan_version)

    async def list(self, after: str = "", limit: int = 100) -> list[StoredPlan]:
        """Plans in code order after the cursor (archived ones included, flagged)."""
        config = [await self.get(c) for c in sorted(self._config) if c > after]
        q = sa.select(plans.c.code).where(plans.c.code > after).order_by(plans.c.code).limit(limit)
        async with self._db.connect() as conn:
            codes = list((await conn.execute(q)).scalars())
        stored = [await self.get(c) for c in codes]
        merged = sorted((p for p in config + stored if p is not None), key=lambda p: p.plan.code)
        return merged[:limit]

    async def parse(self, doc: Any, code: str | None = None) -> Plan:
        """Validates a plan document against the meters in force; PlanError names the field."""
        if code is not None and isinstance(doc, dict):
            if doc.get("code", code) != code:
                raise PlanError("code", f"`code` is {doc.get('code')!r} but the URL names {code!r}.")
            doc = {**doc, "code": code}
        return parse_plan(doc, await meters_of(doc, self._meters))

    async def create(self, plan: Plan) -> StoredPlan:
        if plan.code in self._config:
            raise PlanConflict(f"Plan {plan.code!r} is defined in the configuration file.")
        now = now_ms()
        try:
            async with self._db.begin() as conn:
                await conn.execute(sa.insert(plans).values(code=plan.code, plan_version=1, created_at=now,
                                                           updated_at=now, version=1))  # fmt: skip
                await conn.execute(
                    sa.insert(plan_versions).values(
                        code=plan.code, plan_version=1, definition=plan.as_json(), created_at=now
                    )
                )
        except IntegrityError:
            raise PlanConflict(f"Plan {plan.code!r} already exists; PUT /v1/plans/{plan.code} changes it.") from None
        return StoredPlan(plan, 1, 1)

    async def replace(self, plan: Plan, if_match: IfMatch | None = None) -> tuple[bool, StoredPlan]:
        """Creates or changes a plan; returns (created, plan). A version some subscription bills
        with is kept and a new version made; otherwise the version is rewritten in place."""
        self._writable(plan.code)
        for _ in range(_RETRIES):
            async with self._db.connect() as conn:
                row = (await conn.execute(sa.select(plans).where(plans.c.code == plan.code))).mappings().first()
            if if_match is not None:
                if_match.check(None if row is None else int(row["version"]))
            if row is None:
                try:
                    return True, await self.create(plan)
                except PlanConflict:
                    continue
            now, pv, version = now_ms(), int(row["plan_version"]), int(row["version"])
            async with self._db.begin() as conn:
                used = await conn.execute(sa.select(subscriptions.c.id).where(
                    subscriptions.c.plan_code == plan.code, subscriptions.c.plan_version == pv).limit(1))  # fmt: skip
                new_pv = pv + 1 if used.first() is not None else pv
                done = await conn.execute(
                    sa.update(plans).where(plans.c.code == plan.code, plans.c.version == version)
                    .values(plan_version=new_pv, updated_at=now, version=version + 1, archived_at=None)
                )  # fmt: skip
                if done.rowcount:
                    if new_pv == pv:
                        await conn.execute(sa.update(plan_versions).where(
                            plan_versions.c.code == plan.code, plan_versions.c.plan_version == pv
                        ).values(definition=plan.as_json()))  # fmt: skip
                    else:
                        fresh = {"code": plan.code, "plan_version": new_pv, "definition": plan.as_json(),
                               "created_at": now}  # fmt: skip
                        await conn.execute(sa.insert(plan_versions).values(fresh))
                    return False, StoredPlan(plan, new_pv, version + 1)
            if if_match is not None:
                raise StaleVersion
        raise StaleVersion

    async def archive(self, code: str, if_match: IfMatch | None = None) -> bool:
        """No new subscriptions on the plan; existing ones go on. False if there is no such live plan."""
        self._writable(code)
        if not CODE_RE.fullmatch(code):
            return False
        q = sa.update(plans).where(plans.c.code == code, plans.c.archived_at.is_(None))
        if if_match is not None and not if_match.any:
            q = q.where(plans.c.version.in_(sorted(if_match.versions)))
        async with self._db.begin() as conn:
            done = await conn.execute(
                q.values(archived_at=now_ms(), updated_at=now_ms(), version=plans.c.version + 1)
            )
        if not done.rowcount and if_match is not None:
            found = await self.get(code)
            if found is not None and not found.archived:
                raise StaleVersion
        return bool(done.rowcount)

    async def _version(self, conn: AsyncConnection, code: str, plan_version: int) -> Plan:
        q = sa.select(plan_versions.c.definition).where(
            plan_versions.c.code == code, plan_versions.c.plan_version == plan_version
        )
        definition = (await conn.execute(q)).scalar_one_or_none()
        if definition is None:
            raise LookupError(f"plan {code!r} has no version {plan_version}")
        try:
            return parse_plan(definition, await meters_of(definition, self._meters))
        except PlanError as e:
            raise StoredPlanBroken(f"Version {plan_version} of plan {code!r} no longer applies: {e.message}") from None

    def _writable(self, code: str) -> None:
        if code in self._config:
            raise PlanConflict(f"Plan {code!r} is defined in the configuration file; change it there.")


async def _latest_version(conn: AsyncConnection, code: str) -> tuple[int, Mapping[str, Any]] | None:
    q = (
        sa.select(plan_versions.c.plan_version, plan_versions.c.definition)
        .where(plan_versions.c.code == code)
        .order_by(plan_versions.c.plan_version.desc())
        .limit(1)
    )
    row = (await conn.execute(q)).first()
    return None if row is None else (int(row[0]), row[1])


_RETRIES = 10


