"""archive_flush: compressing one flush's archive object (3000 events), zstd beside the gzip it replaced.

- `zstd`: MeterFlow's way (`archive.format.compress`, zstd level 1);
- `gzip3`: gzip level 3, what the archive wrote before;
- the paired test times both in alternation (`benches/paired.py`) and keeps the
  ratio, and the two objects' sizes, in extra_info.
"""

from __future__ import annotations

import gzip
import time
from typing import Any

import pytest
from paired import paired_ratio

from meterflow import samples
from meterflow.archive.format import compress, decompress
from meterflow.kernel.rust import decode_batch

NOW = samples.now_ms()
# A flush under load gathers a few requests of 1000 events.
LINES = b"".join(
    decode_batch(samples.body(samples.batch(1000, seed=s, prefix=f"a{s}", ts=NOW)), NOW).archive_lines(None)
    for s in range(3)
)


def gzip3(lines: bytes) -> bytes:
    return gzip.compress(lines, compresslevel=3)


@pytest.mark.benchmark(group="archive_flush")
@pytest.mark.parametrize("codec", ["zstd", "gzip3"])
def test_compress_a_flush(benchmark: Any, codec: str) -> None:
    fn = compress if codec == "zstd" else gzip3
    body = benchmark(fn, LINES)
    assert decompress(body) == LINES.splitlines()


@pytest.mark.benchmark(group="archive_flush_paired")
def test_zstd_vs_gzip_paired(benchmark: Any) -> None:
    """The guarded ratio (benches/ratios.py): zstd and gzip 3 timed in alternation, same flush, on this
    thread's CPU clock (both compress in this thread), so time the machine's load takes is not counted."""
    pairs = 3 if benchmark.disabled else 50
    ratio = benchmark.pedantic(paired_ratio, args=(lambda: compress(LINES), lambda: gzip3(LINES), pairs),
                               kwargs={"clock": time.thread_time}, rounds=1, iterations=1)  # fmt: skip
    benchmark.extra_info["paired_ratio"] = ratio
    benchmark.extra_info["pair"] = "zstd vs gzip3"
    benchmark.extra_info["bytes"] = {"raw": len(LINES), "zstd": len(compress(LINES)), "gzip3": len(gzip3(LINES))}
    assert ratio > 1
    assert len(compress(LINES)) < len(gzip3(LINES))
