"""The billing record in-process on one backend pair, on a clock the test moves: the harness of the books tests."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meterflow import samples
from meterflow.billing.catalog import PlanCatalog
from meterflow.billing.closing import Closer, CloseReport
from meterflow.billing.credit_notes import CreditNotes
from meterflow.billing.subscriptions import Subscriptions
from meterflow.config import Settings
from meterflow.customers import Customers, validate
from meterflow.kernel.clock import ManualClock
from meterflow.kernel.rust import Limits, decode_batch
from meterflow.metering.catalog import MeterCatalog
from meterflow.metering.meters import configured_meters
from meterflow.records import open_records
from meterflow.runtime import ClosingRuntime, open_invoices, started
from meterflow.storage import Storage, open_storage
from meterflow.storage.base import SCHEMA
from meterflow.storage.embedded import EmbeddedStorage

DAY = 86_400_000
HOUR = 3_600_000
LIMITS = Limits(max_age_ms=20 * 365 * DAY)
_seq = itertools.count(1)


def utc(*ymd: int) -> int:
    return int(dt.datetime(*ymd, tzinfo=dt.UTC).timestamp() * 1000)


@dataclass(frozen=True)
class Books(ClosingRuntime):
    """What closing reads and writes (the CLI's runtime), on a ManualClock, with the steps of a history."""

    clock: ManualClock

    async def close(self, at: int) -> CloseReport:
        """A closing pass at `at` (the clock moves there first)."""
        self.clock.set(at)
        return await Closer(self).run(at)

    async def ingest(self, events: list[dict[str, Any]]) -> None:
        b = decode_batch(samples.body(events), self.clock.now_ms(), LIMITS)
        assert not b.failed, b.failed[:3]
        await self.storage.insert_events(b.storage_rows())

    async def customer(self, cid: str, **fields: Any) -> None:
        await self.customers.put(cid, validate({"name": cid, **fields}))

    async def plan(self, doc: dict[str, Any]) -> None:
        await self.plans.create(await self.plans.parse(doc))

    async def invoices_of(self, customer_id: str) -> list[dict[str, Any]]:
        """Every invoice of the customer, oldest first."""
        found = await self.invoices.list("", 1000, customer_id=customer_id)
        return sorted(found, key=lambda i: (i["created_at"], i["id"]))

    async def notes_of(self, customer_id: str) -> list[dict[str, Any]]:
        found = await self.credit_notes.list("", 1000, customer_id=customer_id)
        return sorted(found, key=lambda n: n["number"])


def call(tid: str, customer: str, ts: int, nbytes: int = 100, **props: Any) -> dict[str, Any]:
    return {"transaction_id": tid, "customer_id": customer, "event_type": "api_request", "timestamp": ts,
            "properties": {"bytes": nbytes, "endpoint": "/v1/x", "method": "GET", **props}}  # fmt: skip


async def open_books(kind: str, request: pytest.FixtureRequest, chdb: EmbeddedStorage, tmp_path: Path, at: int,
                     **settings: Any) -> AsyncIterator[Books]:  # fmt: skip
    """`embedded`: chdb + SQLite; `full`: ClickHouse 18.16 over HTTP + PostgreSQL (fixtures of `request`)."""
    base = {"invoice_grace_s": 3600, "max_age_ms": 400 * DAY, "dedup_window_s": 401 * 86_400, **settings}
    storage: Storage
    if kind == "embedded":
        await chdb.execute("DROP TABLE IF EXISTS events")
        for ddl in SCHEMA:
            await chdb.execute(ddl)
        storage, cfg = chdb, Settings(data_dir=str(tmp_path / f"records{next(_seq)}"), **base)
    else:
        ch = request.getfixturevalue("clickhouse")
        db = f"mf_books_{next(_seq)}"
        ch.reset_database(db)
        cfg = Settings(storage="clickhouse", clickhouse_url=ch.url, clickhouse_database=db,
                       database_url=request.getfixturevalue("postgres").new_database(), **base)  # fmt: skip
        storage = open_storage(cfg)
        await storage.start()
    records = open_records(cfg)
    clock = ManualClock(at)
    async with started(records):
        meters = MeterCatalog(records, configured_meters(cfg), clock=clock)
        plans = PlanCatalog(records, meters, ())
        customers = Customers(records, clock=clock)
        yield Books(cfg, storage, records, meters, plans, Subscriptions(records, plans, clock=clock),
                    open_invoices(cfg, records, None, customers, meters, clock), CreditNotes(records, clock=clock),
                    customers, clock)  # fmt: skip
    if kind != "embedded":
        await storage.close()
