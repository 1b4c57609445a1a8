"""Per-stage timings of the ingest path as Prometheus histograms in /metrics, and the worker's collector tuning."""

from __future__ import annotations

import gc
import re
from collections.abc import Callable

import httpx
import orjson

from meterflow import samples
from meterflow.config import Settings
from meterflow.metrics import BUCKETS, Metrics
from meterflow.runtime import GC_THRESHOLDS, running
from tests.harness.backends import Backend
from tests.harness.http import JSON
from tests.harness.meterflow import MeterFlowServer
from tests.harness.processes import Garage, until

STAGES = ("decode", "rate_check", "dedup", "flush_wait", "insert", "spool", "commit", "upload")


def test_histogram_buckets_are_cumulative_and_count_every_observation() -> None:
    m = Metrics()
    for s in (0.00001, 0.0003, 0.0003, 0.07, 9.0):
        m.stage("insert", s)
    text = m.render()
    assert "# TYPE meterflow_stage_seconds histogram" in text
    buckets = re.findall(r'meterflow_stage_seconds_bucket\{stage="insert",le="([^"]+)"\} (\d+)', text)
    assert [le for le, _ in buckets] == [f"{b:g}" for b in BUCKETS] + ["+Inf"]
    counts = dict((le, int(n)) for le, n in buckets)
    assert counts["5e-05"] == 1 and counts["0.00025"] == 1 and counts["0.0005"] == 3
    assert counts["0.05"] == 3 and counts["0.1"] == 4 and counts["5"] == 4 and counts["+Inf"] == 5
    assert 'meterflow_stage_seconds_count{stage="insert"} 5' in text
    total = float(re.findall(r'meterflow_stage_seconds_sum\{stage="insert"\} ([\d.]+)', text)[0])
    assert abs(total - 9.07061) < 1e-5


def stage_counts(server: MeterFlowServer) -> dict[str, int]:
    text = httpx.get(f"{server.url}/metrics", headers=server.auth, timeout=10).text
    return {s: int(n) for s, n in re.findall(r'meterflow_stage_seconds_count\{stage="(\w+)"\} (\d+)', text)}


async def test_every_stage_of_an_accepted_batch_is_timed(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer], garage: Garage
) -> None:
    backend = make_backend("full")
    server = start_server(backend, **garage.env("mf-test-stages"))
    r = httpx.post(f"{server.url}/v1/events", content=orjson.dumps({"events": samples.batch(10, seed=7)}),
                   headers={**server.auth, **JSON}, timeout=30)  # fmt: skip
    assert r.status_code == 200 and r.json()["accepted"] == 10
    # The upload runs after the answer: wait for it, then every stage was timed at least once.
    await until(lambda: stage_counts(server).get("upload", 0) >= 1, "archive upload timed", 60)
    counts = stage_counts(server)
    assert {s: counts.get(s, 0) >= 1 for s in STAGES} == dict.fromkeys(STAGES, True)


async def test_a_started_worker_tunes_the_collector(make_backend: Callable[[str], Backend]) -> None:
    """The worker's startup objects are frozen and young collections are rarer (runtime.tune_gc)."""
    backend = make_backend("full")
    env = {k[3:].lower(): v for k, v in backend.env.items()}
    before = gc.get_threshold()
    try:
        gc.unfreeze()
        async with running(Settings(**env)):  # type: ignore[arg-type]
            assert gc.get_threshold() == GC_THRESHOLDS
            assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
