"""The one-time import of an older release's customers, keys and meters from ClickHouse's documents table."""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from meterflow.kernel.clock import now_ms
from meterflow.records.database import Records
from meterflow.records.tables import api_keys, customer_timezones, customers, legacy_imports, meter_versions, meters
from meterflow.storage import Storage
from meterflow.storage import documents as docs

log = logging.getLogger("meterflow.records")
SOURCE = "clickhouse-documents"


class LegacyImportFailed(Exception):
    """The previous release's records cannot be imported: the start stops rather than run without them."""


async def import_documents(storage: Storage, records: Records) -> dict[str, int] | None:
    """Copies the documents table's records once (a marker row says it is done); the table stays.
    Returns the counts, or None when there was nothing to do."""
    if await _imported(records):
        return None
    if not await docs.exists(storage):
        return None
    rows = {
        "customers": [_customer(d, deleted) for d, deleted in await docs.latest(storage, "customer")],
        "api_keys": await _keys(storage),
        "meters": [_meter(d, deleted) for d, deleted in await docs.latest(storage, "meter") if d.get("code")],
    }
    counts = {name: len(r) for name, r in rows.items()}
    try:
        async with records.begin() as conn:
            # The marker first: a second worker starting at once waits on it, then finds it taken.
            await conn.execute(sa.insert(legacy_imports).values(source=SOURCE, imported_at=now_ms(),
                                                                **counts))  # fmt: skip
            for table, key in ((customers, "id"), (api_keys, "id"), (meters, "code")):
                existing = set((await conn.execute(sa.select(table.c[key]))).scalars())
                fresh = [r for r in rows[table.name] if r[key] not in existing]
                if fresh:
                    await conn.execute(sa.insert(table), fresh)
                # What the imported rows have meant since ever: a meter's version and a customer's time zone.
                if fresh and table is meters and (live := [r for r in fresh if r["deleted_at"] is None]):
                    await conn.execute(sa.insert(meter_versions), [
                        {"code": r["code"], "effective_at": 0, "definition": r["definition"],
                         "created_at": r["created_at"]} for r in live])  # fmt: skip
                if fresh and table is customers:
                    await conn.execute(sa.insert(customer_timezones), [
                        {"customer_id": r["id"], "changed_at": 0, "timezone": r["timezone"]} for r in fresh])
    except IntegrityError as e:
        if await _imported(records):
            return None  # another worker imported them meanwhile
        # Not a race: a row of the old table collides with one already here (a key's hash, say).
        detail = str(e.orig).splitlines()[0][:300] if e.orig is not None else type(e).__name__
        log.error("import of the previous release's records failed", extra={"source": SOURCE, "error": detail})
        raise LegacyImportFailed(
            f"importing the previous release's records (ClickHouse's documents table) failed: {detail}"
        ) from e
    if any(counts.values()):
        log.info("imported records of the previous release", extra={"source": SOURCE, **counts})
    return counts


async def _imported(records: Records) -> bool:
    async with records.connect() as conn:
        done = await conn.execute(sa.select(legacy_imports.c.source).where(legacy_imports.c.source == SOURCE))
        return done.first() is not None


def _customer(d: dict[str, Any], deleted: bool) -> dict[str, Any]:
    now = now_ms()
    return {
        "id": d["id"], "name": d.get("name"), "email": d.get("email"), "currency": d.get("currency"),
        "timezone": d.get("timezone") or "UTC", "metadata": d.get("metadata") or {},
        "created_at": d.get("created_at") or now, "updated_at": d.get("updated_at") or now,
        "deleted_at": (d.get("deleted_at") or now) if deleted else None, "version": 1,
    }  # fmt: skip


async def _keys(storage: Storage) -> list[dict[str, Any]]:
    used = {str(d.get("id")): d.get("last_used_at") for d, _ in await docs.latest(storage, "api_key_used")}
    out = []
    for d, deleted in await docs.latest(storage, "api_key"):
        revoked = d.get("revoked_at") or (now_ms() if deleted else None)
        out.append({
            "id": d["id"], "name": d.get("name") or "", "scope": d["scope"], "customer_id": d.get("customer_id"),
            "rate_limits": d.get("rate_limits") or {}, "hash": d["hash"], "created_at": d.get("created_at") or 0,
            "last_used_at": used.get(str(d["id"])) or d.get("last_used_at"), "revoked_at": revoked, "version": 1,
        })  # fmt: skip
    return out


def _meter(d: dict[str, Any], deleted: bool) -> dict[str, Any]:
    now = now_ms()
    definition = {k: v for k, v in d.items() if k not in ("source", "deleted")}
    return {"code": d["code"], "definition": definition, "created_at": now, "updated_at": now,
            "deleted_at": now if deleted else None, "version": 1}  # fmt: skip
