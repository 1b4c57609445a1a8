"""The spool: archive objects on local disk (fsynced) until a background task uploads them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path

import orjson

from meterflow.archive.format import compress, decompress, object_key, suffix_of
from meterflow.archive.stores import Store, atomic_write
from meterflow.config import Settings
from meterflow.kernel.flush_ids import flush_created_ms
from meterflow.metrics import Metrics

log = logging.getLogger("meterflow.archive")


class SpoolFull(Exception):
    """The spool holds MF_SPOOL_MAX_BYTES: new batches are refused with 503."""


# A spooled object is `<flush_id>.zst` (`.gz` if an older version spooled it),
# `<flush_id>.zst.<pid>` while worker <pid> uploads it, with a `<flush_id>.json` sidecar.
_EXTS = (".zst", ".gz")


def _parse(name: str) -> tuple[str, str, int | None] | None:
    """(flush id, extension, claiming pid or None) of a spooled object's file name."""
    if name.startswith("."):
        return None  # a write in progress (or left by a crash): `atomic_write`'s temporary
    for ext in _EXTS:
        flush_id, sep, tail = name.partition(ext)
        if not sep or not flush_id:
            continue
        if tail == "":
            return flush_id, ext, None
        if tail[0] == "." and tail[1:].isdigit():
            return flush_id, ext, int(tail[1:])
    return None


class Spool:
    """Objects waiting for the store, as files `<flush_id>.zst` with a `.json` sidecar."""

    def __init__(self, settings: Settings, store: Store, metrics: Metrics) -> None:
        self.dir = Path(settings.data_dir) / "spool"
        self.max_bytes = settings.spool_max_bytes
        self.store = store
        self.metrics = metrics
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._depth = (0, 0)
        self._depth_at = 0.0
        self.last_error = ""

    def depth(self) -> tuple[int, int]:
        """(objects, bytes) waiting, across every worker sharing the spool."""
        files = [p for p in self.dir.iterdir() if _parse(p.name)] if self.dir.exists() else []
        sizes = []
        for p in files:
            with contextlib.suppress(FileNotFoundError):  # uploaded meanwhile
                sizes.append(p.stat().st_size)
        self._depth = (len(sizes), sum(sizes))
        self._depth_at = time.monotonic()
        return self._depth

    def check_room(self) -> None:
        """Refuses before any I/O when the spool is full (depth re-read once a second)."""
        size = self._depth[1] if time.monotonic() - self._depth_at < 1 else self.depth()[1]
        if size >= self.max_bytes:
            self.metrics.inc("meterflow_archive_spool_full_total")
            raise SpoolFull(f"The archive spool holds {size} bytes; the limit is {self.max_bytes} bytes.")

    def _write(self, flush_id: str, key: str, lines: bytes, rows: int) -> None:
        """One fsync per flush, the object's: the sidecar is renamed in unsynced, and
        after a power loss that left it missing or torn the object itself tells its
        key (the flush id carries its time) and rows (`_meta`)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        data = compress(lines)
        atomic_write(self.dir / f"{flush_id}.json", orjson.dumps({"key": key, "rows": rows}), sync=False)
        atomic_write(self.dir / f"{flush_id}.zst", data)

    def _meta(self, flush_id: str, data: bytes) -> tuple[str, int]:
        """(object key, rows) of a spooled object: from its sidecar, or from the object."""
        try:
            meta = orjson.loads((self.dir / f"{flush_id}.json").read_bytes())
            return str(meta["key"]), int(meta["rows"])
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("archive sidecar missing or torn; read from the object", extra={"flush_id": flush_id})
            return object_key(flush_id, flush_created_ms(flush_id), suffix_of(data)), len(decompress(data))

    async def put(self, flush_id: str, created_ms: int, lines: bytes, rows: int) -> None:
        """Writes a flush's object to disk (fsynced) for the uploader."""
        await asyncio.to_thread(self._write, flush_id, object_key(flush_id, created_ms), lines, rows)
        self.metrics.inc("meterflow_archive_spooled_total")
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _claim(self) -> list[Path]:
        """Claims waiting objects by renaming them (atomic: one worker wins each)."""
        claimed: list[Path] = []
        if not self.dir.exists():
            return claimed
        me = os.getpid()
        for p in sorted(self.dir.iterdir()):
            parsed = _parse(p.name)
            if parsed is None:
                continue
            flush_id, ext, pid = parsed
            if pid is None or pid == me or not _alive(pid):  # waiting, ours, or its worker died
                target = p.with_name(f"{flush_id}{ext}.{me}")
            else:
                continue
            try:
                os.rename(p, target)
            except FileNotFoundError:
                continue
            claimed.append(target)
        return claimed

    async def drain_once(self) -> int:
        """Uploads what is waiting; returns how many objects landed. Raises on failure,
        after handing every object it had claimed but not uploaded back to the spool."""
        landed = 0
        claimed = await asyncio.to_thread(self._claim)
        try:
            while claimed:
                path = claimed[0]
                flush_id = path.name.split(".", 1)[0]
                meta_path = self.dir / f"{flush_id}.json"
                data = path.read_bytes()
                key, rows = self._meta(flush_id, data)
                t0 = time.perf_counter()
                await self.store.put(key, data, rows)
                self.metrics.stage("upload", time.perf_counter() - t0)
                path.unlink()
                meta_path.unlink(missing_ok=True)
                claimed.pop(0)
                landed += 1
                self.metrics.inc("meterflow_archive_uploaded_total")
                self.metrics.inc("meterflow_archive_uploaded_rows_total", rows)
        finally:
            for path in claimed:  # back in line, for this or another worker
                with contextlib.suppress(FileNotFoundError):
                    os.rename(path, self.dir / path.name.rsplit(".", 1)[0])
        return landed

    async def _run(self) -> None:
        delay = 0.5
        while True:
            try:
                await self.drain_once()
                delay = 0.5
                self.last_error = ""
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 5)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.last_error = str(e)[:300]
                self.metrics.inc("meterflow_archive_upload_failures_total")
                log.warning("archive upload failed; retrying", extra={"error": self.last_error, "retry_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
