"""Where archived objects end up: a directory or an S3-compatible store, behind one protocol."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import orjson

from meterflow.archive.format import ArchiveError, content_encoding, is_object_key
from meterflow.config import Settings


class Store(Protocol):
    """Where archived objects end up: S3 or a directory."""

    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def put(self, key: str, data: bytes, rows: int) -> None: ...

    async def get(self, key: str) -> bytes: ...

    def list(self, prefix: str) -> AsyncIterator[str]: ...

    async def rows(self, key: str) -> int:
        """The row count stored with an object (its metadata)."""

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
        atomic_write(path, data)
        atomic_write(path.with_name(path.name + ".meta.json"), orjson.dumps({"rows": rows}))

    async def put(self, key: str, data: bytes, rows: int) -> None:
        try:
            await asyncio.to_thread(self._write, key, data, rows)
        except OSError as e:
            raise ArchiveError(f"directory {self.root}: {e}") from e

    async def get(self, key: str) -> bytes:
        try:
            return await asyncio.to_thread((self.root / key).read_bytes)
        except OSError as e:
            raise ArchiveError(f"directory {self.root}: cannot read {key}: {e}") from e

    async def rows(self, key: str) -> int:
        try:
            meta = await asyncio.to_thread((self.root / (key + ".meta.json")).read_bytes)
        except OSError as e:
            raise ArchiveError(f"directory {self.root}: cannot read the metadata of {key}: {e}") from e
        return int(orjson.loads(meta)["rows"])

    async def list(self, prefix: str) -> AsyncIterator[str]:
        base = self.root / prefix
        paths = sorted(p for p in base.rglob("*.ndjson.*") if is_object_key(p.name)) if base.exists() else []
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
                ContentType="application/x-ndjson", ContentEncoding=content_encoding(key),
            )  # fmt: skip
        except Exception as e:
            raise ArchiveError(f"S3 at {self._s.s3_endpoint}: {e}") from e

    async def get(self, key: str) -> bytes:
        try:
            r = await self._client.get_object(Bucket=self._s.s3_bucket, Key=key)
            async with r["Body"] as body:
                return bytes(await body.read())
        except Exception as e:
            raise ArchiveError(f"S3 at {self._s.s3_endpoint}: cannot read {key}: {e}") from e

    async def rows(self, key: str) -> int:
        try:
            head = await self._client.head_object(Bucket=self._s.s3_bucket, Key=key)
        except Exception as e:
            raise ArchiveError(f"S3 at {self._s.s3_endpoint}: cannot read the metadata of {key}: {e}") from e
        return int(head["Metadata"]["rows"])

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


def atomic_write(path: Path, data: bytes, sync: bool = True) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())
    os.replace(tmp, path)


