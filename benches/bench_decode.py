"""decode_1000: the Rust core beside the best pure-Python pipelines, same batch."""

from __future__ import annotations

import time

import orjson
import pytest
from paired import paired_ratio
from pipelines import PIPELINES

from meterflow import samples

NOW = samples.now_ms()
BODY = samples.body(samples.batch(1000, ts=NOW))


@pytest.mark.benchmark(group="decode_1000", min_rounds=50, disable_gc=True, warmup=True)
@pytest.mark.parametrize("name", list(PIPELINES))
def test_decode_1000(benchmark, name: str) -> None:
    pipeline = PIPELINES[name]
    n, failed, _rows, lines, dups = benchmark(pipeline, BODY, NOW)
    assert (n, failed, dups) == (1000, [], 0)
    assert lines.count(b"\n") == 1000


def mixed_body() -> bytes:
    events = samples.batch(40, ts=NOW)
    events[3]["timestamp"] = NOW + 3_600_000
    events[5]["timestamp"] = NOW - 31 * 86_400_000
    events[7]["transaction_id"] = "has space"
    events[9]["timestamp"] = "1700000000000"
    events[11]["properties"]["note"] = "x" * 1001
    events[13]["properties"]["nested"] = {"a": 1}
    del events[15]["customer_id"]
    events[17]["extra"] = 1
    events[19]["event_type"] = ""
    events[21] = {**events[20]}  # a duplicate
    events[27] = {**events[26], "timestamp": NOW - 1}  # same customer and id, other content
    events[23]["timestamp"] = 1.5
    events[25]["properties"]["huge"] = 1e30
    return samples.body(events)


def test_pipelines_agree_on_a_mixed_batch() -> None:
    """The baselines do the core's work: same failures, same archive lines."""
    body = mixed_body()
    results = {name: p(body, NOW) for name, p in PIPELINES.items()}
    core = results["core"]
    assert core[0] == 27 and core[4] == 1
    expected_reasons = [
        (3, "timestamp_in_future"), (5, "timestamp_too_old"), (7, "invalid_transaction_id"),
        (9, "wrong_type:timestamp"), (11, "property_value_too_long"),
        (13, "wrong_type:properties.nested"), (15, "missing_field:customer_id"),
        (17, "unknown_field:extra"), (19, "invalid_event_type"), (23, "wrong_type:timestamp"),
        (25, "property_out_of_range"), (27, "idempotency_conflict"),
    ]
    for name, (n, failed, rows, lines, dups) in results.items():
        assert [(i, r) for i, _, r in failed] == expected_reasons, name
        assert (n, dups) == (core[0], core[4]), name
        assert [orjson.loads(x) for x in lines.splitlines()] == [
            orjson.loads(x) for x in core[3].splitlines()
        ], name
        assert rows.count(b"\n") == n or name == "core"


@pytest.mark.benchmark(group="decode_1000_paired")
def test_core_vs_msgspec_paired(benchmark) -> None:
    """The guarded ratio (benches/ratios.py): core and msgspec timed in alternation, same batch, on this
    thread's CPU clock (both decode in this thread only), so time the machine's load takes is not counted."""
    pairs = 3 if benchmark.disabled else 100
    ratio = benchmark.pedantic(
        paired_ratio, args=(lambda: PIPELINES["core"](BODY, NOW), lambda: PIPELINES["msgspec"](BODY, NOW), pairs),
        kwargs={"clock": time.thread_time}, rounds=1, iterations=1,
    )  # fmt: skip
    benchmark.extra_info["paired_ratio"] = ratio
    benchmark.extra_info["pair"] = "core vs msgspec"
    assert ratio > 1
