"""The records database (customers, API keys, meters, plans, subscriptions, invoices): SQLite embedded,
PostgreSQL full stack.

Owns: the tables, their migrations, versioned soft-deleted rows and If-Match. Does not own: what any
record means (each domain's store does), nor the events (`storage`)."""

from __future__ import annotations

from meterflow.records.database import (
    Records,
    RecordsUnavailable,
    live_row,
    locked_row,
    open_records,
    plain,
    read_row,
)
from meterflow.records.versions import IfMatch, StaleVersion

__all__ = ["IfMatch", "Records", "RecordsUnavailable", "StaleVersion", "live_row", "locked_row", "open_records",
           "plain", "read_row"]  # fmt: skip
