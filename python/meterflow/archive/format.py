"""The archive's format: object keys partitioned by hour, gzip NDJSON bodies."""

from __future__ import annotations

import gzip
from datetime import UTC, datetime

PREFIX = "events/"


class ArchiveError(Exception):
    """The store cannot be reached or refused an object."""


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


def compress(lines: bytes) -> bytes:
    """An object's body: the flush's NDJSON lines, gzip-compressed."""
    return gzip.compress(lines, compresslevel=3)


def decompress(data: bytes) -> list[bytes]:
    """The NDJSON lines of an object's body."""
    return [line for line in gzip.decompress(data).splitlines() if line]
