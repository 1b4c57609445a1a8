"""Async mode: requests queue in a Redis Stream, `meterflow worker` processes commit it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from meterflow import samples
from tests.harness.backends import Backend
from tests.harness.http import get, post_events, sign_in
from tests.harness.meterflow import ASYNC, MeterFlowServer, MeterFlowWorker
from tests.harness.processes import MAXMEMORY, ClickHouse, Redis, until


def overview_html(server: MeterFlowServer) -> str:
    """The dashboard's overview as a signed-in admin sees it (the sign-in form's CSRF token, then the session)."""
    with httpx.Client(base_url=server.url, timeout=10) as c:
        sign_in(c, server.auth["Authorization"].removeprefix("Bearer "))
        page = c.get("/dashboard/")
        assert page.status_code == 200, page.text
        return page.text


def archived_ids(backend: Backend) -> list[str]:
    """Every transaction id in the archive objects (spooled or uploaded), with repeats."""
    import orjson

    from meterflow.archive.format import decompress

    data = Path(backend.env["MF_DATA_DIR"])
    ids: list[str] = []
    objects = [*data.glob("archive/**/*.ndjson.zst"), *data.glob("archive/**/*.ndjson.gz")]
    for path in [*objects, *data.glob("spool/*.zst"), *data.glob("spool/*.gz")]:
        for line in decompress(path.read_bytes()):
            ids.append(orjson.loads(line)["transaction_id"])
    return ids


def test_the_embedded_default_refuses_async_mode_at_start(tmp_path: Path) -> None:
    env = {"MF_INGEST_MODE": "async", "MF_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "meterflow.cli", "serve"], env=env, capture_output=True, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "MF_INGEST_MODE=async needs the full stack" in lines[0], lines


async def test_async_mode_queues_then_workers_store_each_event_once(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer],
    start_worker: Callable[..., MeterFlowWorker],
) -> None:  # fmt: skip
    backend = make_backend("full")
    server = start_server(backend, **ASYNC)
    events = samples.batch(300, seed=51, prefix="q")
    first = post_events(server, events[:200])
    assert first.status_code == 202 and first.json() == {"accepted": 200, "duplicates": 0, "failed": []}
    # Queued is as good as stored: a retry is a duplicate before any worker ran.
    again = post_events(server, events[100:300])
    assert again.status_code == 202 and again.json() == {"accepted": 100, "duplicates": 100, "failed": []}
    changed = [{**events[0], "timestamp": events[0]["timestamp"] - 1}]
    assert post_events(server, changed).json()["failed"][0]["reason"] == "idempotency_conflict"
    lag = get(server, "/v1/events/lag").json()
    # Every request with valid events queues an entry in its round trip (the
    # conflict's too: the worker keeps only the keys an entry's flush holds).
    assert lag["mode"] == "async" and lag["stream_length"] == 3 and lag["oldest_pending_age_ms"] >= 0
    start_worker(backend)
    start_worker(backend)
    await until(lambda: get(server, "/v1/events/lag").json()["stream_length"] == 0, "the workers draining the stream")
    assert backend.stored() == (300, 300)
    assert backend.raw_rows() == 300  # duplicates never reached storage
    assert sorted(archived_ids(backend)) == sorted(e["transaction_id"] for e in events)
    assert post_events(server, events).json() == {"accepted": 0, "duplicates": 300, "failed": []}
    lag = get(server, "/v1/events/lag").json()
    await until(lambda: sum(w["rows_total"] for w in get(server, "/v1/events/lag").json()["workers"].values()) == 300,
                "per-worker throughput reported")  # fmt: skip
    metrics = get(server, "/metrics").text
    assert "meterflow_stream_length 0" in metrics and "meterflow_worker_rows_per_second{worker=" in metrics
    ready = httpx.get(f"{server.url}/ready").json()
    assert ready["stream"]["length"] == 0 and ready["stream"]["dead_letters"] == 0


async def test_a_full_stream_answers_503_before_reserving(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer],
    start_worker: Callable[..., MeterFlowWorker],
) -> None:  # fmt: skip
    backend = make_backend("full")
    server = start_server(backend, **ASYNC, MF_STREAM_MAX_ENTRIES="3")
    for seed in range(3):
        assert post_events(server, samples.batch(10, seed=60 + seed)).status_code == 202
    refused = samples.batch(10, seed=63)
    r = post_events(server, refused)
    assert r.status_code == 503 and r.headers["Retry-After"] == "1" and r.json()["error"] == "overloaded"
    assert "3 entries" in r.json()["message"]
    start_worker(backend)
    answers: list[httpx.Response] = []

    async def accepted() -> bool:
        answers.append(await asyncio.to_thread(post_events, server, refused))
        assert answers[-1].status_code in (202, 503), answers[-1].text
        return answers[-1].status_code == 202

    await until(accepted, "the refused batch accepted once the stream drained", every=0.1)
    # Nothing of the refused batch was reserved: it is accepted in full, not as duplicates.
    assert answers[-1].json() == {"accepted": 10, "duplicates": 0, "failed": []}


async def test_an_entry_failing_max_attempts_goes_to_the_dead_letters_and_retry_puts_it_back(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer],
    start_worker: Callable[..., MeterFlowWorker], clickhouse: ClickHouse,
) -> None:  # fmt: skip
    backend = make_backend("full")
    server = start_server(backend, **ASYNC)
    worker = start_worker(backend, MF_WORKER_MAX_ATTEMPTS="2")
    db = backend.database
    # ClickHouse answers, but refuses the insert: the entry itself fails, attempt after attempt.
    clickhouse.query(f"RENAME TABLE {db}.events TO {db}.events_away")
    events = samples.batch(50, seed=71, prefix="dl")
    assert post_events(server, events).status_code == 202
    await until(lambda: httpx.get(f"{server.url}/ready").json()["stream"]["dead_letters"] == 1,
                "the entry reaching the dead letters", 60)  # fmt: skip
    assert "meterflow_stream_dead_letters 1" in get(server, "/metrics").text
    assert "<span class=\"label\">Dead letters</span><span class=\"value\">1</span>" in overview_html(server)
    cli = [sys.executable, "-m", "meterflow.cli", "worker"]
    listed = subprocess.run([*cli, "dead-letters"], env=worker.env, capture_output=True, timeout=60)
    assert listed.returncode == 0 and "50 events  2 attempts" in listed.stdout.decode(), listed
    # Still accepted: a retry of the dead-lettered events is a duplicate, not a new event.
    assert post_events(server, events).json()["duplicates"] == 50
    clickhouse.query(f"RENAME TABLE {db}.events_away TO {db}.events")
    back = subprocess.run([*cli, "retry"], env=worker.env, capture_output=True, timeout=60)
    assert back.returncode == 0 and "1 dead letters put back" in back.stdout.decode()
    await until(lambda: backend.stored() == (50, 50), "the retried entry stored", 60)
    assert httpx.get(f"{server.url}/ready").json()["stream"] == {
        "status": "ok", "length": 0, "dead_letters": 0, "oldest_pending_age_ms": 0, "workers": 1}


def lag_of(server: MeterFlowServer) -> dict[str, Any]:
    return dict(get(server, "/v1/events/lag").json())


async def test_a_stream_full_in_bytes_answers_503_and_rounds_stay_within_their_bytes(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer],
    start_worker: Callable[..., MeterFlowWorker],
) -> None:  # fmt: skip
    """Bounded in bytes, not only entries: few large requests cannot fill Redis, nor one round a worker;
    every event acknowledged before the 503 is stored once the workers drain."""
    backend = make_backend("full")
    limit, round_limit = 100_000, 40_000
    server = start_server(backend, **ASYNC, MF_STREAM_MAX_BYTES=str(limit))
    accepted = 0
    refused: httpx.Response | None = None
    for seed in range(40):  # about 17 KB of events a batch: full after a handful, far below 100,000 entries
        r = post_events(server, samples.batch(100, seed=900 + seed, prefix=f"b{seed}"))
        assert r.status_code in (202, 503), r.text
        if r.status_code == 503:
            refused = r
            last = seed
            break
        accepted += r.json()["accepted"]
    assert refused is not None, "the stream was never full in bytes"
    assert refused.headers["Retry-After"] == "1" and refused.json()["error"] == "overloaded"
    assert "MF_STREAM_MAX_BYTES" in refused.json()["message"] and str(limit) in refused.json()["message"]
    lag = lag_of(server)
    assert 0 < lag["stream_bytes"] <= limit and lag["stream_length"] == last
    start_worker(backend, MF_WORKER_ROUND_MAX_BYTES=str(round_limit))
    await until(lambda: lag_of(server)["stream_length"] == 0, "the worker draining the stream", 60)
    assert lag_of(server)["stream_bytes"] == 0  # counted off exactly
    assert backend.stored() == (accepted, accepted)  # nothing acknowledged lost, nothing twice

    def stats() -> dict[str, Any]:
        workers = lag_of(server)["workers"]
        return dict(next(iter(workers.values()))) if workers else {}

    await until(lambda: stats().get("entries_total") == last, "the worker's statistics")
    # Each round read at most 40,000 bytes of events (two entries of about 17 KB), not the whole stream.
    assert 0 < stats()["largest_round_bytes"] <= round_limit
    again = post_events(server, samples.batch(100, seed=900 + last, prefix=f"b{last}"))
    assert again.status_code == 202 and again.json()["accepted"] == 100  # nothing of the refused batch was kept


async def test_redis_at_maxmemory_answers_503_and_workers_still_drain(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer],
    start_worker: Callable[..., MeterFlowWorker], redis_server: Redis,
) -> None:  # fmt: skip
    """Redis refusing writes (maxmemory, noeviction): requests get 503 with Retry-After and nothing of
    them is kept; the workers still commit and delete what was acknowledged, which frees the memory."""
    backend = make_backend("full")
    server = start_server(backend, **ASYNC)
    queued = [samples.batch(50, seed=950 + i, prefix=f"m{i}") for i in range(3)]
    for events in queued:
        assert post_events(server, events).status_code == 202
    assert redis_server.command(b"CONFIG SET maxmemory 1", b"+OK")  # every write past it: OOM
    try:
        refused = samples.batch(50, seed=960, prefix="oom")
        r = post_events(server, refused)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
        assert r.json()["error"] == "overloaded" and "maxmemory" in r.json()["message"]
        start_worker(backend)  # its consumer group is created at maxmemory too
        await until(lambda: lag_of(server)["stream_length"] == 0, "the worker draining at maxmemory", 60)
        assert backend.stored() == (150, 150)
        assert post_events(server, refused).status_code == 503  # still full: still refused, still nothing kept
    finally:
        assert redis_server.command(f"CONFIG SET maxmemory {MAXMEMORY}".encode(), b"+OK")
    r = post_events(server, refused)
    assert r.status_code == 202 and r.json() == {"accepted": 50, "duplicates": 0, "failed": []}
    await until(lambda: backend.stored() == (200, 200), "the batch refused at maxmemory stored once accepted")
