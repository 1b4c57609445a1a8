"""The archive spool's uploader under concurrent writes: temporary files are never claimed."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from meterflow.archive import DirectoryStore, Spool, object_key
from meterflow.config import Settings
from meterflow.metrics import Metrics

FLUSHES = 300


async def test_uploader_skips_temporary_files_while_flushes_are_written(tmp_path: Path) -> None:
    settings = Settings(data_dir=str(tmp_path / "data"))
    store = DirectoryStore(tmp_path / "archive")
    await store.start()
    spool = Spool(settings, store, Metrics())
    spool.dir.mkdir(parents=True)
    # What a writer killed in the middle of `_atomic_write` leaves behind forever.
    (spool.dir / ".crashed.gz.4242.tmp").write_bytes(b"partial")
    (spool.dir / ".crashed.json.4242.tmp").write_bytes(b"{")
    line = b'{"transaction_id":"x"}\n' * 2000
    done = threading.Event()

    def writer() -> None:
        try:
            for i in range(FLUSHES):
                spool._write(f"f{i:05d}", object_key(f"f{i:05d}", 1_700_000_000_000), line, 2000)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    landed = 0
    deadline = time.monotonic() + 120
    try:
        while not (done.is_set() and spool.depth()[0] == 0):
            assert time.monotonic() < deadline, f"the spool did not drain: {landed} of {FLUSHES} landed"
            landed += await spool.drain_once()  # raised ValueError on int("tmp") before the fix
            await asyncio.sleep(0)
    finally:
        thread.join()
    assert landed == FLUSHES
    archived = [p async for p in store.list("events/")]
    assert len(archived) == FLUSHES
    # The leftovers stay where they are; they are not objects.
    assert sorted(p.name for p in spool.dir.iterdir()) == [".crashed.gz.4242.tmp", ".crashed.json.4242.tmp"]
