"""The generated event set the usage, invoice and closing benches query, loaded into a storage once per size.

`n` api_request events over June 2026, 1000 customers round robin, generated
inside the engine (`numbers()`) with the typed columns the Rust core writes.
The embedded chdb is one per process and the benches share it, so
`load_events` remembers what each storage holds and loads only when another
bench replaced it (bench_closing loads a smaller set).
"""

from __future__ import annotations

import asyncio

from meterflow.storage import Storage
from meterflow.storage.base import SCHEMA

CUSTOMERS = 1000
DAYS = 30
START = 1_780_272_000_000  # 2026-06-01 00:00 UTC
END = START + DAYS * 86_400_000

Events = tuple[asyncio.AbstractEventLoop, Storage, int]  # a storage, the loop it runs on, the set's size
_loaded: dict[int, int] = {}  # id(storage) -> the n of the set it holds


def generate_sql(n: int) -> str:
    """n api_request events spread evenly over the period, customers round robin."""
    span = END - START
    return f"""
INSERT INTO events
SELECT
    concat('bt', toString(number)) AS transaction_id,
    concat('cust_', toString(number % {CUSTOMERS})) AS customer_id,
    'api_request' AS event_type,
    toInt64({START} + intDiv(number * {span}, {n})) AS timestamp_ms,
    toDateTime(intDiv(timestamp_ms, 1000)) AS ts,
    '{{}}' AS properties,
    ['bytes'] AS num_keys,
    [toDecimal128(number % 100000, 9)] AS num_values,
    ['region', 'endpoint'] AS str_keys,
    [arrayElement(['eu', 'us', 'ap'], number % 3 + 1), arrayElement(['/a', '/b', '/c', '/d'], number % 4 + 1)]
        AS str_values
FROM numbers({n})
"""


def load_events(loop: asyncio.AbstractEventLoop, storage: Storage, n: int) -> None:
    """Makes `storage`'s events table hold exactly the generated set of `n` events (a no-op if it does)."""
    if _loaded.get(id(storage)) == n:
        return
    _loaded.pop(id(storage), None)
    loop.run_until_complete(storage.execute("DROP TABLE IF EXISTS events"))
    for ddl in SCHEMA:
        loop.run_until_complete(storage.execute(ddl))
    loop.run_until_complete(storage.execute(generate_sql(n)))
    _loaded[id(storage)] = n
