"""The archive's format: object keys partitioned by hour, zstd NDJSON bodies (gzip ones still read)."""

from __future__ import annotations

import gzip
import zlib
from datetime import UTC, datetime

import zstandard

PREFIX = "events/"
# New objects are zstd (DESIGN §7 allows it or gzip): at level 1 it compresses
# a flush of 3000 events about 3.5x faster than gzip level 3 did (0.17 µs an
# event instead of 0.6), into an object about 10% smaller (`benches/bench_archive.py`).
# Objects written as gzip before stay readable: a body tells its codec by its
# magic bytes, a key by its suffix.
ZSTD_SUFFIX = ".ndjson.zst"
GZIP_SUFFIX = ".ndjson.gz"
SUFFIXES = (ZSTD_SUFFIX, GZIP_SUFFIX)
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"
ZSTD_LEVEL = 1


class ArchiveError(Exception):
    """The store cannot be reached or refused an object."""


def object_key(flush_id: str, created_ms: int, suffix: str = ZSTD_SUFFIX) -> str:
    t = datetime.fromtimestamp(created_ms / 1000, UTC)
    return f"{PREFIX}dt={t:%Y-%m-%d}/hour={t:%H}/{flush_id}{suffix}"


def is_object_key(key: str) -> bool:
    return key.endswith(SUFFIXES)


def key_hour_ms(key: str) -> int | None:
    """The UTC hour an object key's partition names, as epoch ms."""
    try:
        dt = key.split("dt=", 1)[1][:10]
        hour = key.split("hour=", 1)[1][:2]
        return int(datetime.strptime(f"{dt} {hour}", "%Y-%m-%d %H").replace(tzinfo=UTC).timestamp() * 1000)
    except (IndexError, ValueError):
        return None


def content_encoding(key: str) -> str:
    """The HTTP `Content-Encoding` of an object, from its key."""
    return "gzip" if key.endswith(GZIP_SUFFIX) else "zstd"


def suffix_of(data: bytes) -> str:
    """The key suffix that names an object's codec, from its body."""
    return GZIP_SUFFIX if data.startswith(_GZIP_MAGIC) else ZSTD_SUFFIX


def compress(lines: bytes) -> bytes:
    """An object's body: the flush's NDJSON lines, zstd-compressed (one frame, size in its header)."""
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(lines)


def decompress(data: bytes) -> list[bytes]:
    """The NDJSON lines of an object's body, zstd or gzip; ArchiveError if it is neither or torn."""
    try:
        if data.startswith(_ZSTD_MAGIC):
            raw = _zstd_frames(data)
        elif data.startswith(_GZIP_MAGIC):
            raw = gzip.decompress(data)
        else:
            raise ArchiveError("an archive object is neither zstd nor gzip")
    except (zstandard.ZstdError, OSError, EOFError, zlib.error) as e:
        raise ArchiveError(f"an archive object is torn: {e}") from e
    return [line for line in raw.splitlines() if line]


def _zstd_frames(data: bytes) -> bytes:
    """Every frame of a zstd body, joined; ArchiveError unless each frame ends whole
    (a stream reader would return a torn frame's first part without a word)."""
    dctx = zstandard.ZstdDecompressor()
    out: list[bytes] = []
    rest = data
    while rest:
        frame = dctx.decompressobj()
        out.append(frame.decompress(rest))
        if not frame.eof:
            raise ArchiveError("an archive object is torn: its last zstd frame ends early")
        rest = frame.unused_data
    return b"".join(out)
