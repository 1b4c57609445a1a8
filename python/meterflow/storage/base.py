"""The storage protocol and the schema both backends share (DESIGN §5 dialect)."""

from __future__ import annotations

from typing import Any, Protocol


class StorageError(Exception):
    """The store is unreachable or refused a statement; retryable by the client."""


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

    async def query(self, sql: str) -> list[dict[str, Any]]:
        """Runs a SELECT; one dict per row (64-bit integers as numbers)."""

    async def execute(self, sql: str) -> None:
        """Runs a statement that returns nothing (DDL, OPTIMIZE)."""
