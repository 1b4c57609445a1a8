"""Storage: the system of record, ClickHouse over HTTP or chdb embedded."""

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
