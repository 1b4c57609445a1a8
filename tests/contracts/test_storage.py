"""The storage suite every backend passes: chdb embedded and ClickHouse 18.16 over HTTP."""

from __future__ import annotations

import orjson
import pytest

from meterflow import samples
from meterflow.config import Settings
from meterflow.kernel.rust import decode_batch
from meterflow.storage import Storage, StorageError, open_storage
from meterflow.storage.base import SCHEMA
from tests.harness.processes import free_port

NOW = samples.now_ms()


def rows(n: int, seed: int = 1) -> tuple[bytes, list[dict[str, object]]]:
    events = samples.batch(n, seed=seed, ts=NOW)
    return decode_batch(samples.body(events), NOW).storage_rows(), events


async def test_schema_creation_is_idempotent(storage: Storage) -> None:
    for ddl in SCHEMA:
        await storage.execute(ddl)
    assert await storage.query("SELECT count() AS n FROM events") == [{"n": 0}]


async def test_rows_round_trip_exactly(storage: Storage) -> None:
    data, events = rows(3)
    await storage.insert_events(data)
    got = await storage.query(
        "SELECT transaction_id, customer_id, event_type, timestamp_ms, toUInt32(ts) AS s, properties "
        "FROM events ORDER BY transaction_id"
    )
    assert len(got) == 3
    for g, e in zip(got, sorted(events, key=lambda e: str(e["transaction_id"])), strict=True):
        assert g["transaction_id"] == e["transaction_id"]
        assert g["customer_id"] == e["customer_id"]
        assert g["timestamp_ms"] == e["timestamp"]
        assert g["s"] == int(e["timestamp"]) // 1000  # type: ignore[call-overload]
        assert orjson.loads(str(g["properties"])) == e["properties"]


async def test_reinserted_transaction_counts_once(storage: Storage) -> None:
    data, _ = rows(500, seed=2)
    await storage.insert_events(data)
    await storage.insert_events(data)
    counted = await storage.query(
        "SELECT (SELECT count() FROM events FINAL) AS final, (SELECT uniqExact(transaction_id) FROM events) AS u"
    )
    assert counted == [{"final": 500, "u": 500}]
    await storage.execute("OPTIMIZE TABLE events FINAL")
    assert await storage.query("SELECT count() AS n FROM events") == [{"n": 500}]


async def test_same_id_of_two_customers_stays_two_rows(storage: Storage) -> None:
    """The sorting key starts with customer_id: merges never collapse two customers' events."""
    events = [{**samples.seed_event(NOW), "customer_id": c} for c in ("cust_a", "cust_b")]
    data = decode_batch(samples.body(events), NOW).storage_rows()
    await storage.insert_events(data)
    await storage.insert_events(data)
    await storage.execute("OPTIMIZE TABLE events FINAL")
    got = await storage.query("SELECT customer_id AS c, count() AS n FROM events GROUP BY c ORDER BY c")
    assert got == [{"c": "cust_a", "n": 1}, {"c": "cust_b", "n": 1}]


async def test_bad_statement_is_a_storage_error(storage: Storage) -> None:
    with pytest.raises(StorageError):
        await storage.query("SELECT nope FROM missing_table")


async def test_unreachable_clickhouse_is_a_storage_error() -> None:
    s = open_storage(Settings(storage="clickhouse", clickhouse_url=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(StorageError):
        await s.start()
    await s.close()
