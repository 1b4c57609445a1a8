"""The paired measurements behind the guarded bench ratios (benches/paired.py), on a simulated clock."""

from __future__ import annotations

import pytest

from benches import paired


class Machine:
    """A clock that advances only when a simulated call runs: each call costs its work, plus whatever
    the load schedule adds while that call runs (a long call is hit more often than a short one)."""

    def __init__(self, load: list[float]) -> None:
        self.now = 0.0
        self.load = load
        self.calls = 0

    def clock(self) -> float:
        return self.now

    def work(self, cost: float) -> None:
        extra = self.load[self.calls % len(self.load)] * cost  # preemption grows with the call's length
        self.calls += 1
        self.now += cost + extra


@pytest.mark.parametrize("load", [[0.0], [0.0, 0.0, 3.0], [0.0, 5.0, 0.0, 0.0, 9.0, 0.0, 0.0]])
def test_paired_ratio_is_the_undisturbed_ratio_under_any_load(load: list[float]) -> None:
    m = Machine(load)
    ratio = paired.paired_ratio(lambda: m.work(0.5), lambda: m.work(7.0), pairs=40, repeat=3, clock=m.clock)
    assert ratio == pytest.approx(14.0)


def test_a_few_stray_low_readings_do_not_make_the_ratio() -> None:
    """One reading far below any real cost (a clock glitch) is dropped with the lowest tenth."""
    m = Machine([0.0])
    ours_calls = iter(range(1000))

    def ours() -> None:
        m.work(0.05 if next(ours_calls) == 7 else 0.5)

    ratio = paired.paired_ratio(ours, lambda: m.work(7.0), pairs=40, repeat=3, clock=m.clock)
    assert ratio == pytest.approx(14.0)


def test_paired_ratio_alternates_which_side_goes_first() -> None:
    m = Machine([0.0])
    order: list[str] = []

    def side(name: str) -> None:
        order.append(name)
        m.work(1.0)

    paired.paired_ratio(lambda: side("o"), lambda: side("b"), pairs=4, repeat=1, clock=m.clock)
    assert order == ["o", "b", "b", "o", "o", "b", "b", "o"]


def test_parts_are_each_used_once_and_the_ratio_is_of_each_sides_low_part() -> None:
    m = Machine([0.0])
    closed: list[int] = []
    priced: list[int] = []
    # Parts 10-18 met a busy scheduler, which slows the close side only (its many handoffs): a median
    # of per-part ratios would read 0.75. Part 7's pricing is a stray low reading.

    def close(part: int) -> None:
        closed.append(part)
        m.work(3.0 if 10 <= part <= 18 else 2.0)

    def price(part: int) -> None:
        priced.append(part)
        m.work(0.02 if part == 7 else 1.8)

    ratio = paired.paired_ratio_of_parts(list(range(20)), close, price, clock=m.clock)
    assert closed == priced == list(range(20))
    assert ratio == pytest.approx(0.9)
