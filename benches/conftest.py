"""Fixtures of the benches: the 10M-event storages that bench_usage and bench_invoice both query."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from events import Events, load_events

from meterflow.config import Settings
from meterflow.storage import open_storage
from meterflow.storage.embedded import EmbeddedStorage
from tests.harness.processes import ClickHouse


@pytest.fixture(scope="session", params=["chdb", "clickhouse"])
def events_storage(request: pytest.FixtureRequest, chdb_storage: EmbeddedStorage) -> Iterator[Events]:
    """A storage of each backend with its own loop; 10 million events when benchmarking (100,000 under
    `make test`), loaded by the first bench that asks (`events_10m`)."""
    n = 10_000_000 if request.config.getoption("benchmark_enable") else 100_000
    loop = asyncio.new_event_loop()
    if request.param == "chdb":
        yield loop, chdb_storage, n
    else:
        ch: ClickHouse = request.getfixturevalue("clickhouse")
        ch.reset_database("mf_bench_events")
        storage = open_storage(
            Settings(storage="clickhouse", clickhouse_url=ch.url, clickhouse_database="mf_bench_events")
        )
        loop.run_until_complete(storage.start())
        yield loop, storage, n
        loop.run_until_complete(storage.close())
    loop.close()


@pytest.fixture
def events_10m(events_storage: Events) -> Events:
    """The storage holding the generated set: loaded once, again only if another bench replaced it."""
    loop, storage, n = events_storage
    load_events(loop, storage, n)
    return events_storage
