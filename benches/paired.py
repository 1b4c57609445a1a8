"""Paired timing: our path and its baseline measured in alternation, so a shared machine's load hits both alike."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

P = TypeVar("P")
Clock = Callable[[], float]


def low(times: Sequence[float]) -> float:
    """A side's cost undisturbed: its 10th-percentile time, the fastest but for a few stray readings."""
    return sorted(times)[len(times) // 10]


def _times(
    fn: Callable[[], object], repeat: int, clock: Clock, setup: Callable[[], object] | None = None
) -> list[float]:
    out = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return out


def paired_ratio(
    ours: Callable[[], object],
    baseline: Callable[[], object],
    pairs: int,
    repeat: int = 3,
    setup: Callable[[], object] | None = None,
    clock: Clock = time.perf_counter,
) -> float:
    """(baseline's `low` call time) / (ours'), over `pairs` turns of `repeat` calls of each side taken
    back to back in alternating order. Each side's fast calls are its cost undisturbed; taken in
    alternation, both sides get the same chances of a quiet moment. (A median of per-pair ratios does
    not cancel load: a call of 7 ms is preempted far more often than one of 0.5 ms, so the ratio of a
    long baseline to a short path grew 2-5x on a loaded machine.) For work done in this thread only,
    pass `clock=time.thread_time`: the time other processes hold the CPU is then not counted at all.
    `setup`, if given, runs untimed before each call of `ours` (e.g. emptying what `ours` writes)."""
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        o_times: list[float] = []
        b_times: list[float] = []
        for i in range(pairs):
            if i % 2:
                b_times += _times(baseline, repeat, clock)
                o_times += _times(ours, repeat, clock, setup)
            else:
                o_times += _times(ours, repeat, clock, setup)
                b_times += _times(baseline, repeat, clock)
        return low(b_times) / low(o_times)
    finally:
        if gc_was_on:
            gc.enable()


def paired_ratio_of_parts(
    parts: Sequence[P],
    ours: Callable[[P], object],
    baseline: Callable[[P], object],
    clock: Clock = time.perf_counter,
) -> float:
    """(baseline's `low` part time) / (ours'), each part taken once by each side, back to back in
    alternating order: for work `ours` uses up (a period closed stays closed), split into many short
    parts of like size so that each pair lasts well under the comings and goings of the machine's load.
    The low part of each side, not the median of per-part ratios: a side that hands work between
    threads or processes more often (closing's many small writes) loses more to a busy scheduler, so
    per-part ratios move with the load (the closing ratio fell 15% between two runs); each side's
    least disturbed parts do not. The collector stays on (the parts are I/O-heavy and long)."""
    o_times: list[float] = []
    b_times: list[float] = []
    for i, part in enumerate(parts):
        if i % 2:
            b_times.append(_time_once(baseline, part, clock))
            o_times.append(_time_once(ours, part, clock))
        else:
            o_times.append(_time_once(ours, part, clock))
            b_times.append(_time_once(baseline, part, clock))
    return low(b_times) / low(o_times)


def _time_once(fn: Callable[[P], object], arg: P, clock: Clock) -> float:
    t0 = clock()
    fn(arg)
    return clock() - t0
