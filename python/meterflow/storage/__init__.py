"""Storage: the events' system of record, ClickHouse over HTTP or chdb embedded, behind one protocol (`base`).

Owns: the events table, inserts and the queries' execution within their limits. Does not own: what a
query asks (`metering` builds it), the records database (`records`), nor dedup (`ingest`)."""

from __future__ import annotations

from meterflow.config import Settings
from meterflow.storage.base import Storage, StorageError


def open_storage(settings: Settings) -> Storage:
    if settings.storage == "clickhouse":
        from meterflow.storage.clickhouse import ClickHouseStorage

        return ClickHouseStorage(settings)
    from meterflow.storage.embedded import EmbeddedStorage

    return EmbeddedStorage(settings)


__all__ = ["Storage", "StorageError", "open_storage"]
