"""The raw-event archive: exactly once per accepted event, through outages, and replay."""

from __future__ import annotations

import asyncio
import gzip
import io
import itertools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest

from meterflow import samples
from meterflow.archive import DirectoryStore, Store, object_key
from meterflow.archive.format import GZIP_SUFFIX, decompress
from meterflow.archive.replay import replay as replay_range
from meterflow.kernel.flush_ids import new_flush_id
from meterflow.storage import Storage
from tests.harness.backends import Backend, archive_store
from tests.harness.http import JSON, post_events
from tests.harness.meterflow import MeterFlowServer
from tests.harness.processes import Garage, free_port, until, wait_for

_bucket = iter(range(1, 10_000))
pytestmark = pytest.mark.slow


def archived_setup(kind: str, make_backend: Callable[[str], Backend], garage: Garage | None) -> tuple[Backend, dict[str, str]]:
    backend = make_backend("embedded" if kind == "directory" else "full")
    env = {} if kind == "directory" else garage.env(f"mf-test-{next(_bucket)}")  # type: ignore[union-attr]
    return backend, env


async def read_archive(store: Store) -> tuple[Counter[str], int, int]:
    """(transaction id -> objects holding it, objects, rows per metadata)."""
    await store.start()
    ids: Counter[str] = Counter()
    objects = meta_rows = 0
    try:
        async for key in store.list("events/"):
            assert key.startswith("events/dt=") and "/hour=" in key and key.endswith(".ndjson.zst")
            lines = decompress(await store.get(key))
            ids.update(orjson.loads(x)["transaction_id"] for x in lines)
            objects += 1
            meta_rows += await store.rows(key)  # the metadata, through the protocol
    finally:
        await store.close()
    return ids, objects, meta_rows


def wait_drained(server: MeterFlowServer, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = httpx.get(f"{server.url}/ready").json()
        if ready["archive"]["spool_objects"] == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"the spool did not drain: {ready}")


@pytest.fixture(params=["directory", "s3"])
def archive_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def maybe_garage(request: pytest.FixtureRequest, archive_kind: str) -> Garage | None:
    return request.getfixturevalue("garage") if archive_kind == "s3" else None


async def test_every_accepted_event_is_archived_exactly_once(
    archive_kind: str, maybe_garage: Garage | None, make_backend: Callable[[str], Backend],
    start_server: Callable[..., MeterFlowServer],
) -> None:  # fmt: skip
    backend, env = archived_setup(archive_kind, make_backend, maybe_garage)
    server = start_server(backend, **env)
    accepted: set[str] = set()
    sent = []
    for seed in range(3):
        events = samples.batch(300, seed=seed)
        events[5]["timestamp"] = "bad"  # invalid: never archived
        r = post_events(server, events).json()
        assert r["accepted"] == 299
        accepted |= {e["transaction_id"] for i, e in enumerate(events) if i != 5}
        sent.append(events)
    resend = sent[1][:5] + sent[1][6:]
    assert post_events(server, resend).json()["duplicates"] == 299  # duplicates: not archived
    wait_drained(server)
    ids, objects, meta_rows = await read_archive(archive_store(backend, env))
    assert set(ids) == accepted
    assert all(n == 1 for n in ids.values())
    assert meta_rows == sum(ids.values()) == 897
    assert objects >= 1


async def test_archive_outage_spools_and_drains_without_5xx(
    garage: Garage, make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer]
) -> None:
    backend, env = archived_setup("s3", make_backend, garage)
    server = start_server(backend, **env)
    statuses: Counter[int] = Counter()
    accepted: set[str] = set()
    over = asyncio.Event()

    async def client(n: int) -> None:
        """Posts before, during and after the outage: until it is over, then 5 more batches."""
        after = 0
        deadline = time.monotonic() + 120
        async with httpx.AsyncClient(timeout=30) as c:
            for i in itertools.count():
                if after >= 5 or time.monotonic() > deadline:
                    return
                after += over.is_set()
                events = samples.batch(100, seed=n * 1000 + i, prefix=f"o{n}")
                r = await c.post(f"{server.url}/v1/events", content=samples.body(events), headers={**JSON, **server.auth})
                statuses[r.status_code] += 1
                if r.status_code == 200:
                    accepted.update(e["transaction_id"] for e in events)

    async def spooled_while_down() -> bool:
        async with httpx.AsyncClient(timeout=10) as c:
            archive = (await c.get(f"{server.url}/ready")).json()["archive"]
        # An upload has failed: /ready (no key needed) says so with a code, never the S3 client's text.
        return bool(archive["status"] == "down" and archive["spool_objects"] > 0
                    and archive["last_error"] == "upload_failed")  # fmt: skip

    async def outage() -> None:
        await until(lambda: len(accepted) >= 300, "batches accepted before the outage", 60)
        await asyncio.to_thread(garage.stop)
        try:
            await until(spooled_while_down, "objects spooled while the store is down", 60)
        finally:
            await asyncio.to_thread(garage.start)
            over.set()

    await asyncio.gather(*(client(n) for n in range(3)), outage())
    assert set(statuses) == {200}, statuses
    wait_drained(server, 90)
    ids, _, _ = await read_archive(archive_store(backend, env))
    assert set(ids) == accepted and all(n == 1 for n in ids.values())


async def test_spool_survives_a_restart(
    garage: Garage, make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer]
) -> None:
    backend, env = archived_setup("s3", make_backend, garage)
    server = start_server(backend, **env)
    garage.stop()
    try:
        events = samples.batch(50, seed=77)
        assert post_events(server, events).json()["accepted"] == 50
        server.stop(signal.SIGTERM)
    finally:
        garage.start()
    spool = Path(backend.env["MF_DATA_DIR"]) / "spool"
    assert list(spool.glob("*.zst*")), "the object should have stayed in the spool"
    server2 = start_server(backend, **env)
    wait_drained(server2)
    ids, _, _ = await read_archive(archive_store(backend, env))
    assert set(ids) == {e["transaction_id"] for e in events}


def test_full_spool_answers_503(make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer]) -> None:
    backend = make_backend("embedded")
    dead = {"MF_ARCHIVE": "s3", "MF_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}", "MF_S3_ACCESS_KEY": "x",
            "MF_S3_SECRET_KEY": "y", "MF_SPOOL_MAX_BYTES": "1000"}  # fmt: skip
    server = start_server(backend, **dead)
    assert post_events(server, samples.batch(100, seed=1)).status_code == 200  # spooled: the store is down
    answers: list[httpx.Response] = []

    def refused() -> bool:  # ingest re-reads the spool's depth once a second
        answers.append(post_events(server, samples.batch(100, seed=2 + len(answers))))
        return answers[-1].status_code == 503

    wait_for(refused, "ingest refusing once the spool is full", 15)
    assert {a.status_code for a in answers[:-1]} <= {200}
    r = answers[-1]
    assert r.status_code == 503 and r.json()["error"] == "archive_spool_full"
    assert "Retry-After" in r.headers
    ready = httpx.get(f"{server.url}/ready")
    assert ready.status_code == 503 and ready.json()["archive"]["spool_bytes"] >= 1000
    assert "meterflow_archive_spool_full_total" in httpx.get(f"{server.url}/metrics", headers=server.auth).text


def replay(env: dict[str, str], start: int, end: int, *extra: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MF_")} | env
    return subprocess.run([sys.executable, "-m", "meterflow.cli", "replay", "--from", str(start), "--to", str(end), *extra],
                          env=full, capture_output=True, text=True, timeout=300)  # fmt: skip


def per_customer(backend: Backend) -> dict[str, int]:
    rows = backend.query_json("SELECT customer_id AS c, count() AS n FROM events FINAL GROUP BY c ORDER BY c")
    return {str(r["c"]): int(r["n"]) for r in rows}  # type: ignore[call-overload]


async def test_replay_keeps_the_same_id_of_two_customers(storage: Storage, tmp_path: Path) -> None:
    now = samples.now_ms()
    store = DirectoryStore(tmp_path / "archive")
    await store.start()
    lines = [orjson.dumps({**samples.seed_event(now), "customer_id": c}) for c in ("cust_a", "cust_b", "cust_a")]
    # Written as gzip, as archives were before zstd: replay reads both.
    await store.put(object_key(new_flush_id(now), now, GZIP_SUFFIX), gzip.compress(b"\n".join(lines) + b"\n"), 3)
    report = await replay_range(store, storage, now - 3_600_000, now + 3_600_000, out=io.StringIO())
    assert (report.events, report.inserted) == (3, 2)
    rows = await storage.query("SELECT customer_id AS c, count() AS n FROM events GROUP BY c ORDER BY c")
    assert rows == [{"c": "cust_a", "n": 1}, {"c": "cust_b", "n": 1}]


def test_replay_restores_counts_and_is_idempotent(
    garage: Garage, make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer]
) -> None:
    backend, env = archived_setup("s3", make_backend, garage)
    server = start_server(backend, **env)
    t0 = samples.now_ms()
    for seed in range(4):
        post_events(server, samples.batch(500, seed=100 + seed))
    wait_drained(server)
    server.stop()
    before = per_customer(backend)
    assert sum(before.values()) == 2000
    empty = make_backend("full")  # a fresh database: the disaster
    replay_env = {**empty.env, **env}
    window = (t0 - 3_600_000, samples.now_ms() + 3_600_000)
    dry = replay(replay_env, *window, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would insert 2000" in dry.stderr
    tables = f"SELECT count() AS n FROM system.tables WHERE database = '{empty.database}' AND name = 'events'"
    assert empty.query_json(tables) == [{"n": 0}]  # a dry run writes nothing
    first = replay(replay_env, *window)
    assert first.returncode == 0, first.stderr
    assert "inserted 2000" in first.stderr and "objects" in first.stderr
    assert per_customer(empty) == before
    second = replay(replay_env, *window)
    assert second.returncode == 0, second.stderr
    assert per_customer(empty) == before
    assert empty.stored() == (2000, 2000)
    outside = replay(replay_env, window[0] - 10 * 3_600_000, window[0] - 5 * 3_600_000)
    assert "0 objects" in outside.stderr
