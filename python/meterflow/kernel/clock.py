"""The one clock of the package: epoch milliseconds now, injectable so that billing histories replay in tests."""

from __future__ import annotations

import time
from typing import Protocol

DAY_MS = 86_400_000


def now_ms() -> int:
    """The wall clock in epoch milliseconds, for code that has no clock of its own to ask."""
    return time.time_ns() // 1_000_000


class Clock(Protocol):
    def now_ms(self) -> int:
        """The current instant in epoch milliseconds."""


class SystemClock:
    """Wall-clock time."""

    def now_ms(self) -> int:
        return now_ms()


class ManualClock:
    """A clock that moves only when told (tests and replays of histories)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def now_ms(self) -> int:
        return self.at

    def set(self, at: int) -> None:
        self.at = at


SYSTEM = SystemClock()
