"""The embedded mode's dedup: the Rust core's in-process index, authoritative in one process."""

from __future__ import annotations

import itertools
import time

from meterflow.config import Settings
from meterflow.ingest.dedup.protocol import Reservation
from meterflow.kernel.rust import Batch, DedupIndex

# DedupIndex.reserve's codes: 0 new, 1 duplicate, 2 in flight, 16 | differing fields.
_DUPLICATE, _IN_FLIGHT, _CONFLICT = 1, 2, 0x10
_KEEP_NEW = bytes([1]) + bytes(255)


class MemoryDedup:
    """The embedded mode's index, in the Rust core; authoritative in one process."""

    name = "memory"

    def __init__(self, settings: Settings) -> None:
        self._ix = DedupIndex()
        self._window_s = settings.dedup_window_s
        self._last_expiry = 0.0
        # The Rust index names a flush by a number: the flush id's, until it commits or is released.
        self._numbers: dict[str, int] = {}
        self._next = itertools.count(1)

    def _number(self, flush_id: str) -> int:
        n = self._numbers.get(flush_id)
        if n is None:
            n = self._numbers[flush_id] = next(self._next)
        return n

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._ix)

    async def reserve(self, batch: Batch, flush_id: str) -> Reservation:
        now = time.time()
        if now - self._last_expiry > 3600:
            self._last_expiry = now
            self._ix.expire(int(now) - self._window_s)
        codes = self._ix.reserve(batch, self._number(flush_id))
        n = len(codes)
        keep = codes.translate(_KEEP_NEW)
        accepted = keep.count(1)
        if accepted == n:
            return Reservation(keep=None, accepted=n, duplicates=0)
        dups = codes.count(_DUPLICATE)
        flight = [i for i, c in enumerate(codes) if c == _IN_FLIGHT] if codes.count(_IN_FLIGHT) else []
        conflicts = []
        if accepted + dups + len(flight) < n:
            conflicts = [(i, c & 0x0F) for i, c in enumerate(codes) if c & _CONFLICT]
        return Reservation(keep=keep, accepted=accepted, duplicates=dups, in_flight=flight, conflicts=conflicts)

    async def commit(self, flush_id: str) -> None:
        n = self._numbers.pop(flush_id, None)
        if n is not None:
            self._ix.commit(n, int(time.time()))

    async def release(self, flush_id: str, keys: list[str]) -> None:
        n = self._numbers.pop(flush_id, None)
        if n is not None:
            self._ix.release(n)

    async def warm(self, batch: Batch) -> None:
        self._ix.load(batch, int(time.time()))
