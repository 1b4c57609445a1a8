"""The raw-event archive (DESIGN §6): one gzip NDJSON object per flush, spooled to
disk first, then uploaded to S3 or a directory by a background task with backoff.

A flush's object reaches the spool before the flush commits, so every
acknowledged event is on disk or in the archive; the spool survives restarts
and is bounded (a full spool refuses ingestion with 503, it never drops).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import orjson

from meterflow.config import Settings
from meterflow.ingest.dedup import flush_created_ms
from meterflow.metrics import Metrics

log = logging.getLogger("meterflow.archive")

PREFIX = "events/"


class ArchiveError(Exception):
    pass


class SpoolFull(Exception):
    pass


def object_key(flush_id: str, created_ms: int) -> str:
    t = datetime.fromtimestamp(created_ms / 1000, UTC)
    return f"{PREFIX}dt={t:%Y-%m-%d}/hour={t:%H}/{flush_id}.ndjson.gz"


def key_hour_ms(key: str) -> int | None:
    """The UTC hour an object key's partition names, as epoch ms."""
    try:
        dt = key.split("dt=", 1)[1][:10]
        hour = key.split("hour=", 1)[1][:2]
        return int(datetime.strptime(f"{dt} {hour}", "%Y-%m-%d %H").replace(tzinfo=UTC).timestamp() * 1000)
    except (IndexError, ValueError):
        return None


class Store(Protocol):
    """Where archived objects end up: S3 or a directory."""

    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def put(self, key: str, data: bytes, rows: int) -> None: ...

    async def get(self, key: str) -> bytes: ...

    def list(self, prefix: str) -> AsyncIterator[str]: ...

    async def ping(self) -> None: ...


class DirectoryStore:
    """The embedded mode's archive: files under `data_dir/archive`, rows in a sidecar."""

    name = "directory"

    def __init__(self, root: Path) -> None:
        self.root = root

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        if not self.root.is_dir():
            raise ArchiveError(f"{self.root} is not a directory")

    def _write(self, key: str, data: bytes, rows: int) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, data)
        _atomic_write(path.with_name(path.name + ".meta.json"), orjson.dumps({"rows": rows}))

    async def put(self, key: str, data: bytes, rows: int) -> None:
        await asyncio.to_thread(self._write, key, data, rows)

    async def get(self, key: str) -> bytes:
        return await asyncio.to_thread((self.root / key).read_bytes)

    async def list(self, prefix: str) -> AsyncIterator[str]:
        base = self.root / prefix
        paths = sorted(base.rglob("*.ndjson.gz")) if base.exists() else []
        for p in paths:
            yield str(p.relative_to(self.root))


class S3Store:
    """An S3-compatible store (Garage, MinIO, AWS S3) through aiobotocore."""

    name = "s3"

    def __init__(self, settings: Settings) -> None:
        self._s = settings
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._bucket_ready = False

    async def start(self) -> None:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        s = self._s
        cfg = AioConfig(
            connect_timeout=3, read_timeout=10, retries={"max_attempts": 1},
            s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )  # fmt: skip
        self._client = await self._stack.enter_async_context(
            get_session().create_client(
                "s3",
                endpoint_url=s.s3_endpoint,
                region_name=s.s3_region,
                config=cfg,
                aws_access_key_id=s.s3_access_key,
                aws_secret_access_key=s.s3_secret_key,
            )
        )
        with contextlib.suppress(Exception):  # the store may be down at start: put() tries again
            await self._ensure_bucket()

    async def _ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            await self._client.head_bucket(Bucket=self._s.s3_bucket)
        except ClientError:
            await self._client.create_bucket(Bucket=self._s.s3_bucket)
        self._bucket_ready = True

    async def close(self) -> None:
        await self._stack.aclose()

    async def ping(self) -> None:
        try:
            await self._client.head_bucket(Bucket=self._s.s3_bucket)
        except Exception as e:
            raise ArchiveError(f"S3 at {self._s.s3_endpoint}: {e}") from e

    async def put(self, key: str, data: bytes, rows: int) -> None:
        try:
            if not self._bucket_ready:
                await self._ensure_bucket()
            await self._client.put_object(
                Bucket=self._s.s3_bucket, Key=key, Body=data, Metadata={"rows": str(rows)},
                ContentType="application/x-ndjson", ContentEncoding="gzip",
            )  # fmt: skip
        except Exception as e:
            raise ArchiveError(f"S3 at {self._s.s3_endpoint}: {e}") from e

    async def get(self, key: str) -> bytes:
        r = await self._client.get_object(Bucket=self._s.s3_bucket, Key=key)
        async with r["Body"] as body:
            return bytes(await body.read())

    async def list(self, prefix: str) -> AsyncIterator[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self._s.s3_bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"]


def open_store(settings: Settings) -> Store | None:
    if settings.archive == "s3":
        return S3Store(settings)
    if settings.archive == "directory":
        return DirectoryStore(Path(settings.data_dir) / "archive")
    return None


def _atomic_write(path: Path, data: bytes, sync: bool = True) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())
    os.replace(tmp, path)


class Spool:
    """Objects waiting for the store, as files `<flush_id>.gz` with a `.json` sidecar."""

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
        files = [p for p in self.dir.glob("*.gz*") if not p.name.endswith(".tmp")] if self.dir.exists() else []
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
        data = gzip.compress(lines, compresslevel=3)
        _atomic_write(self.dir / f"{flush_id}.json", orjson.dumps({"key": key, "rows": rows}), sync=False)
        _atomic_write(self.dir / f"{flush_id}.gz", data)

    def _meta(self, flush_id: str, data: bytes) -> tuple[str, int]:
        """(object key, rows) of a spooled object: from its sidecar, or from the object."""
        try:
            meta = orjson.loads((self.dir / f"{flush_id}.json").read_bytes())
            return str(meta["key"]), int(meta["rows"])
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("archive sidecar missing or torn; read from the object", extra={"flush_id": flush_id})
            return object_key(flush_id, flush_created_ms(flush_id)), gzip.decompress(data).count(b"\n")

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
        for p in sorted(self.dir.glob("*.gz*")):
            name = p.name
            if name.endswith(".tmp"):
                continue  # a write in progress (or left by a crash): `_atomic_write`'s temporary
            if name.endswith(".gz"):
                target = p.with_name(f"{name}.{me}")
            elif ".gz." in name and (int(name.rsplit(".", 1)[1]) == me or not _alive(int(name.rsplit(".", 1)[1]))):
                target = p.with_name(f"{name.split('.gz.')[0]}.gz.{me}")  # ours, or its worker died
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
                flush_id = path.name.split(".gz")[0]
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
                    os.rename(path, self.dir / (path.name.split(".gz")[0] + ".gz"))
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
