"""One fsync per spooled flush: the sidecar is unsynced, and an object whose sidecar a power
loss took still lands under its own key with its row count."""

from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path

import orjson
import pytest

from meterflow.archive import DirectoryStore, Spool, object_key
from meterflow.archive.format import GZIP_SUFFIX, decompress
from meterflow.config import Settings
from meterflow.kernel.flush_ids import flush_created_ms, new_flush_id
from meterflow.metrics import Metrics

LINES = b'{"transaction_id":"a"}\n{"transaction_id":"b"}\n{"transaction_id":"c"}\n'


async def spool_in(tmp_path: Path) -> tuple[Spool, DirectoryStore]:
    store = DirectoryStore(tmp_path / "archive")
    await store.start()
    return Spool(Settings(data_dir=str(tmp_path / "data")), store, Metrics()), store


async def test_a_spooled_flush_costs_one_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool, _ = await spool_in(tmp_path)
    calls: list[int] = []
    real = os.fsync

    def counted(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counted)
    fid = new_flush_id()
    spool._write(fid, object_key(fid, flush_created_ms(fid)), LINES, 3)
    assert len(calls) == 1
    assert sorted(p.name for p in spool.dir.iterdir()) == [f"{fid}.json", f"{fid}.zst"]


@pytest.mark.parametrize("sidecar", [None, b"", b'{"key": "events/'])
async def test_an_object_without_its_sidecar_lands_under_its_key(tmp_path: Path, sidecar: bytes | None) -> None:
    spool, store = await spool_in(tmp_path)
    fid = new_flush_id()
    key = object_key(fid, flush_created_ms(fid))
    spool._write(fid, key, LINES, 3)
    meta = spool.dir / f"{fid}.json"
    if sidecar is None:
        meta.unlink()  # never reached the disk
    else:
        meta.write_bytes(sidecar)  # torn
    assert await spool.drain_once() == 1
    assert [k async for k in store.list("events/")] == [key]
    assert orjson.loads((store.root / (key + ".meta.json")).read_bytes())["rows"] == 3
    assert list(spool.dir.iterdir()) == []


@pytest.mark.parametrize("sidecar", [True, False])
async def test_a_gzip_object_spooled_by_an_older_version_lands_as_gzip(tmp_path: Path, sidecar: bool) -> None:
    spool, store = await spool_in(tmp_path)
    fid = new_flush_id()
    key = object_key(fid, flush_created_ms(fid), GZIP_SUFFIX)
    spool.dir.mkdir(parents=True)
    (spool.dir / f"{fid}.gz").write_bytes(gzip.compress(LINES))
    if sidecar:
        (spool.dir / f"{fid}.json").write_bytes(orjson.dumps({"key": key, "rows": 3}))
    assert spool.depth()[0] == 1
    assert await spool.drain_once() == 1
    assert [k async for k in store.list("events/")] == [key]
    assert decompress(await store.get(key)) == LINES.splitlines()
    assert list(spool.dir.iterdir()) == []


async def test_an_object_a_dead_worker_claimed_is_uploaded_by_another(tmp_path: Path) -> None:
    spool, store = await spool_in(tmp_path)
    fid = new_flush_id()
    key = object_key(fid, flush_created_ms(fid))
    spool._write(fid, key, LINES, 3)
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid no longer runs: the worker that claimed the object died
    (spool.dir / f"{fid}.zst").rename(spool.dir / f"{fid}.zst.{gone.pid}")
    assert await spool.drain_once() == 1
    assert [k async for k in store.list("events/")] == [key]
    assert list(spool.dir.iterdir()) == []
