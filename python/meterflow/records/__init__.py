"""The records database (customers, API keys, meters): SQLite embedded, PostgreSQL full stack."""

from __future__ import annotations

from meterflow.records.database import Records, RecordsUnavailable, locked_row, open_records, plain
from meterflow.records.versions import IfMatch, StaleVersion

__all__ = ["IfMatch", "Records", "RecordsUnavailable", "StaleVersion", "locked_row", "open_records", "plain"]
