"""The contract every archive store passes: the directory and S3 (Garage), through the protocol only."""

from __future__ import annotations

import gzip
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meterflow.archive import ArchiveError, DirectoryStore, S3Store, Store, object_key
from meterflow.archive.format import GZIP_SUFFIX, compress, decompress, suffix_of
from meterflow.config import Settings
from tests.harness.processes import Garage, free_port

_bucket = itertools.count(1)
LINES = b'{"transaction_id":"a"}\n{"transaction_id":"b"}\n'


def s3_settings(garage: Garage, endpoint: str | None = None) -> Settings:
    env = garage.env(f"mf-contract-{next(_bucket)}")
    return Settings(archive="s3", s3_endpoint=endpoint or env["MF_S3_ENDPOINT"], s3_bucket=env["MF_S3_BUCKET"],
                    s3_region=env["MF_S3_REGION"], s3_access_key=env["MF_S3_ACCESS_KEY"],
                    s3_secret_key=env["MF_S3_SECRET_KEY"])  # fmt: skip


@pytest.fixture(params=["directory", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = (DirectoryStore(tmp_path / "archive") if request.param == "directory"
                else S3Store(s3_settings(request.getfixturevalue("garage"))))  # fmt: skip
    await s.start()
    yield s
    await s.close()


async def keys(store: Store, prefix: str) -> list[str]:
    return sorted([k async for k in store.list(prefix)])


async def test_an_object_reads_back_with_its_rows(store: Store) -> None:
    key = object_key("0190000000001234567890ab", 1_700_000_000_000)
    assert key == "events/dt=2023-11-14/hour=22/0190000000001234567890ab.ndjson.zst"
    await store.ping()
    await store.put(key, compress(LINES), 2)
    assert decompress(await store.get(key)) == LINES.splitlines()
    assert await store.rows(key) == 2


async def test_list_yields_the_keys_under_a_prefix_only(store: Store) -> None:
    a = object_key("0190000000001234567890aa", 1_700_000_000_000)
    b = object_key("0190000000001234567890bb", 1_700_003_600_000)
    for k in (a, b):
        await store.put(k, compress(LINES), 2)
    assert await keys(store, "events/") == [a, b]
    assert await keys(store, "events/dt=2023-11-14/hour=22/") == [a]
    assert await keys(store, "events/dt=1999-01-01/") == []


async def test_put_again_replaces_the_object(store: Store) -> None:
    key = object_key("0190000000001234567890cc", 1_700_000_000_000)
    await store.put(key, compress(LINES), 2)
    await store.put(key, compress(LINES + b'{"transaction_id":"c"}\n'), 3)
    assert await keys(store, "events/") == [key]
    assert len(decompress(await store.get(key))) == 3 and await store.rows(key) == 3


async def test_a_missing_object_is_an_archive_error(store: Store) -> None:
    with pytest.raises(ArchiveError):
        await store.get("events/dt=2023-11-14/hour=22/missing.ndjson.gz")
    with pytest.raises(ArchiveError):
        await store.rows("events/dt=2023-11-14/hour=22/missing.ndjson.gz")


@pytest.mark.parametrize("kind", ["directory", "s3"])
async def test_an_unreachable_store_is_an_archive_error(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if kind == "directory":
        (tmp_path / "not-a-dir").write_bytes(b"")
        down: Store = DirectoryStore(tmp_path / "not-a-dir")
    else:
        down = S3Store(s3_settings(request.getfixturevalue("garage"), f"http://127.0.0.1:{free_port()}"))
        await down.start()
    try:
        with pytest.raises(ArchiveError):
            await down.ping()
        with pytest.raises(ArchiveError):
            await down.put(object_key("0190000000001234567890dd", 1_700_000_000_000), compress(LINES), 2)
    finally:
        await down.close()


async def test_a_gzip_object_of_an_older_version_reads_back(store: Store) -> None:
    key = object_key("0190000000001234567890dd", 1_700_000_000_000, GZIP_SUFFIX)
    assert key.endswith(".ndjson.gz")
    await store.put(key, gzip.compress(LINES), 2)
    assert await keys(store, "events/") == [key]
    assert decompress(await store.get(key)) == LINES.splitlines()


def test_new_objects_are_zstd_and_smaller_than_gzip() -> None:
    lines = b"".join(b'{"transaction_id":"t%d","customer_id":"c","event_type":"api"}\n' % i for i in range(1000))
    body = compress(lines)
    assert body.startswith(b"\x28\xb5\x2f\xfd")  # the zstd frame's magic number
    assert suffix_of(body) == ".ndjson.zst" and suffix_of(gzip.compress(lines)) == ".ndjson.gz"
    assert len(body) < len(gzip.compress(lines, compresslevel=3))
    assert decompress(body) == lines.splitlines()
    assert decompress(body + compress(b'{"transaction_id":"x"}\n'))[-1] == b'{"transaction_id":"x"}'


@pytest.mark.parametrize("body", [b"", b"plain text\n", b"\x28\xb5\x2f\xfd\x00torn", b"\x1f\x8btorn"])
def test_a_body_neither_zstd_nor_gzip_is_an_archive_error(body: bytes) -> None:
    with pytest.raises(ArchiveError):
        decompress(body)


def test_a_torn_zstd_object_is_an_archive_error() -> None:
    """An object cut short (a torn upload, a truncated copy) never reads as fewer rows."""
    lines = b"".join(b'{"transaction_id":"t%d","customer_id":"c","event_type":"api"}\n' % i for i in range(1000))
    body = compress(lines)
    joined = body + compress(b'{"transaction_id":"x"}\n')
    assert decompress(joined)[-1] == b'{"transaction_id":"x"}'  # joined frames still read
    for cut in (5, 12, len(body) // 3, len(body) // 2, len(body) - 1, len(body) + 5, len(joined) - 1):
        with pytest.raises(ArchiveError, match="torn"):
            decompress(joined[:cut])
