"""What every dedup backend offers: reserve a batch's ids under a flush, commit or release the flush."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from meterflow.kernel.rust import Batch


class DedupUnavailable(Exception):
    """The dedup store cannot be reached; nothing of the request was accepted."""


class DedupFull(DedupUnavailable):
    """The dedup store refuses writes for want of memory (Redis at `maxmemory`, noeviction); nothing was accepted."""


@dataclass
class Reservation:
    """The dedup verdict for one batch's valid events."""

    keep: bytes | None  # one byte per valid event, non-zero = reserved now; None = all
    accepted: int
    duplicates: int
    in_flight: list[int] = field(default_factory=list)  # valid-event indexes
    # (valid-event index, differing fields as bits: 1 event_type, 2 timestamp, 4 properties)
    conflicts: list[tuple[int, int]] = field(default_factory=list)
    stream_length: int | None = None  # async mode: the stream's entries right after this batch's
    stream_bytes: int | None = None  # async mode: the bytes of events the stream holds right after this batch's


class Dedup(Protocol):
    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raises DedupUnavailable when the store does not answer."""

    async def reserve(self, batch: Batch, flush_id: str) -> Reservation: ...

    async def commit(self, flush_id: str) -> None: ...

    async def release(self, flush_id: str, keys: list[str]) -> None:
        """Frees the keys (`Batch.key`) this flush reserved (its insert failed)."""

    async def warm(self, batch: Batch) -> None:
        """Marks events found in storage as committed (embedded start-up)."""
