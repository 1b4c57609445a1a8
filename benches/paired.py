"""Paired timing: our path and its baseline measured in alternation, so a shared machine's load hits both alike."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

P = TypeVar("P")


def _fastest_of(fn: Callable[[], object], repeat: int, setup: Callable[[], object] | None = None) -> float:
    best = float("inf")
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _time_once(fn: Callable[[P], object], arg: P) -> float:
    t0 = time.perf_counter()
    fn(arg)
    return time.perf_counter() - t0


def paired_ratio(
    ours: Callable[[], object],
    baseline: Callable[[], object],
    pairs: int,
    repeat: int = 3,
    setup: Callable[[], object] | None = None,
) -> float:
    """The median over `pairs` of (baseline time / our time), each side the fastest of `repeat` calls,
    the two sides taken back to back and in alternating order. A load that comes and goes slows both
    sides of a pair together, so the ratio moves far less than two medians taken minutes apart.
    `setup`, if given, runs untimed before each call of `ours` (e.g. emptying what `ours` writes)."""
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        ratios = []
        for i in range(pairs):
            if i % 2:
                b, o = _fastest_of(baseline, repeat), _fastest_of(ours, repeat, setup)
            else:
                o, b = _fastest_of(ours, repeat, setup), _fastest_of(baseline, repeat)
            ratios.append(b / o)
        return statistics.median(ratios)
    finally:
        if gc_was_on:
            gc.enable()


def paired_ratio_of_parts(parts: Sequence[P], ours: Callable[[P], object], baseline: Callable[[P], object]) -> float:
    """The median over `parts` of (baseline(part) time / ours(part) time), the two taken back to back
    in alternating order, once each: for work `ours` uses up (a period closed stays closed), split into
    many short parts so that each pair lasts well under the comings and goings of the machine's load.
    The collector stays on (the parts are I/O-heavy and long): a collection in one pair is an outlier
    the median drops."""
    ratios = []
    for i, part in enumerate(parts):
        if i % 2:
            b, o = _time_once(baseline, part), _time_once(ours, part)
        else:
            o, b = _time_once(ours, part), _time_once(baseline, part)
        ratios.append(b / o)
    return statistics.median(ratios)
