"""The storage protocol and the schema both backends share (DESIGN §5 dialect)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol


class StorageError(Exception):
    """The store is unreachable or refused a statement; retryable by the client."""


class QueryLimitExceeded(StorageError):
    """A read went over its `QueryLimits`: the caller asked too much, a retry will not help."""


# ClickHouse's codes for a query stopped by a limit: TIMEOUT_EXCEEDED,
# TOO_MANY_ROWS (old name), TOO_MANY_ROWS_OR_BYTES, TOO_SLOW.
_LIMIT_CODES = re.compile(r"Code: (159|158|396|160)\b")


@dataclass(frozen=True)
class QueryLimits:
    """What one read may cost; every usage query runs under these (ClickHouse settings)."""

    max_execution_s: int
    max_query_bytes: int
    max_result_rows: int

    def settings(self) -> dict[str, str]:
        """As ClickHouse settings (valid on 18.16 and current versions alike). `priority`
        2 pauses a read while an insert (priority 1) runs on the same server."""
        return {
            "max_execution_time": str(self.max_execution_s),
            "max_query_size": str(self.max_query_bytes),
            "max_result_rows": str(self.max_result_rows),
            "result_overflow_mode": "throw",
            "priority": "2",
        }

    def check_size(self, sql: str) -> None:
        if len(sql.encode()) > self.max_query_bytes:
            raise QueryLimitExceeded(
                f"the query is {len(sql.encode())} bytes; the limit is {self.max_query_bytes} bytes"
            )


def limit_error(text: str) -> QueryLimitExceeded | None:
    """The limit a ClickHouse error names, if the error is a limit's."""
    if _LIMIT_CODES.search(text) is None:
        return None
    return QueryLimitExceeded(text.strip().splitlines()[0][:300])


# Events keep epoch milliseconds in an Int64 and a DateTime derived from it
# (no DateTime64 on 18.16). `properties` is the canonical JSON; the same
# properties are also typed columns written by the Rust core, so queries never
# parse JSON: every value as text (`str_*`, for filters and group-by), numbers
# also as exact Decimal128(9) (`num_*`, for aggregation). ReplacingMergeTree
# collapses a re-inserted transaction: its sorting key is the event's identity.
EVENTS_DDL = """
CREATE TABLE IF NOT EXISTS events (
    transaction_id String,
    customer_id String,
    event_type String,
    timestamp_ms Int64,
    ts DateTime,
    properties String,
    num_keys Array(String),
    num_values Array(Decimal128(9)),
    str_keys Array(String),
    str_values Array(String)
) ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(ts)
ORDER BY (customer_id, event_type, timestamp_ms, transaction_id)
"""

SCHEMA = (EVENTS_DDL,)

ROW_COLUMNS = (
    "transaction_id, customer_id, event_type, timestamp_ms, ts, properties, num_keys, num_values, str_keys, str_values"
)


def quote(value: str) -> str:
    """A ClickHouse string literal (no server-side parameters on 18.16)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Storage(Protocol):
    """What the ingest path and the queries need from the system of record."""

    name: str

    async def start(self) -> None:
        """Connects and creates the schema idempotently."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raises StorageError when the store does not answer."""

    async def insert_events(self, rows: bytes) -> None:
        """Inserts RowBinary rows (see `ROW_COLUMNS`) in one statement."""

    async def query(self, sql: str, limits: QueryLimits | None = None) -> list[dict[str, Any]]:
        """Runs a SELECT; one dict per row (64-bit integers as numbers). With `limits`
        the read is bounded, runs apart from inserts, and raises QueryLimitExceeded."""

    async def execute(self, sql: str) -> None:
        """Runs a statement that returns nothing (DDL, OPTIMIZE)."""
