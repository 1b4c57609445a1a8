"""Replay: read archived objects of a time range back into storage.

Objects are chosen by their partition hour (when MeterFlow accepted the
events). Rows go straight to storage, not through dedup: a disaster restore
must refill an empty database even while Redis still remembers the ids.
Replay is idempotent all the same: the events table collapses a re-inserted
transaction and every count is per (customer_id, transaction_id), the key of
idempotency, as is the in-batch check of the core (the same id of two
customers is two events).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO

from meterflow.archive.format import PREFIX, decompress, is_object_key, key_hour_ms
from meterflow.archive.stores import Store
from meterflow.kernel.clock import now_ms
from meterflow.kernel.rust import STORED_LIMITS, decode_batch
from meterflow.storage import Storage

HOUR_MS = 3_600_000


@dataclass
class ReplayReport:
    objects: int = 0
    events: int = 0
    inserted: int = 0


async def replay(
    store: Store, storage: Storage | None, start_ms: int, end_ms: int, dry_run: bool = False,
    out: TextIO = sys.stderr,
) -> ReplayReport:  # fmt: skip
    keys = []
    async for key in store.list(PREFIX):
        hour = key_hour_ms(key)
        if hour is not None and is_object_key(key) and start_ms - HOUR_MS < hour < end_ms and hour + HOUR_MS > start_ms:
            keys.append(key)
    keys.sort()
    report = ReplayReport()
    t0 = time.monotonic()
    for i, key in enumerate(keys, 1):
        lines = decompress(await store.get(key))
        report.objects += 1
        report.events += len(lines)
        for j in range(0, len(lines), 1000):
            chunk = lines[j : j + 1000]
            body = b'{"events":[' + b",".join(chunk) + b"]}"
            batch = decode_batch(body, now_ms(), STORED_LIMITS)
            if batch.failed:
                raise ValueError(f"{key}: archived events fail validation: {batch.failed[:3]}")
            if not dry_run and storage is not None and len(batch):
                await storage.insert_events(batch.storage_rows())
                report.inserted += len(batch)
        rate = report.events / max(time.monotonic() - t0, 1e-9)
        bar = "#" * int(30 * i / len(keys))
        out.write(f"\rreplay [{bar:<30}] {i}/{len(keys)} objects, {report.events} events, {rate:,.0f} events/s")
        out.flush()
    verb = "would insert" if dry_run else "inserted"
    count = report.events if dry_run else report.inserted
    out.write(f"\nreplay: {report.objects} objects, {report.events} events; {verb} {count}.\n")
    return report
