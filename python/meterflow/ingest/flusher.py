"""Group commit: rows of concurrent requests gather into one flush, one insert per flush.

The flusher groups only: when a flush goes is decided here; storing and committing it is `ingest.commit`'s."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from meterflow.archive import Spool
from meterflow.config import Settings
from meterflow.ingest import commit
from meterflow.ingest.dedup import Dedup
from meterflow.kernel.flush_ids import new_flush_id
from meterflow.kernel.rust import Batch
from meterflow.metrics import Metrics
from meterflow.storage import Storage, StorageError

log = logging.getLogger("meterflow.flusher")


# Under load a flush grows: while an insert is in flight, the open flush keeps
# gathering past MF_FLUSH_MAX_ROWS (up to GROWTH times it) and past MF_FLUSH_MAX_WAIT_MS
# (up to GROWTH times it), and goes when that insert ends. ClickHouse inserts rows
# faster in fewer, larger inserts (`make loadtest` measures both sizes).
GROWTH = 10


class Overloaded(Exception):
    """The flush queue is full; the request is refused before any I/O."""


@dataclass(eq=False)
class Flush:
    """One future insert. Requests join it before they reserve their ids (the
    reservation names the flush), then add their rows or leave."""

    id: str
    created: float
    done: asyncio.Future[None]
    rows: list[bytes] = field(default_factory=list)
    archive: list[bytes] = field(default_factory=list)
    parts: list[tuple[Batch, bytes | None]] = field(default_factory=list)
    count: int = 0
    pending: int = 0
    sealed: bool = False
    writing: bool = False
    # A request failed after its reservation may have reached the dedup store:
    # no commit record, so the flush's ids are taken over after the flush timeout.
    tainted: bool = False

    def reserved_keys(self) -> list[str]:
        """The dedup keys this flush holds (used only to release them after a failure)."""
        keys: list[str] = []
        for batch, keep in self.parts:
            keys.extend(batch.key(i) for i in range(len(batch)) if keep is None or keep[i])
        return keys


class Flusher:
    def __init__(
        self, settings: Settings, storage: Storage, dedup: Dedup, metrics: Metrics, spool: Spool | None = None
    ) -> None:
        self.spool = spool
        self._max_rows = settings.flush_max_rows
        self._max_wait = settings.flush_max_wait_ms / 1000
        self._queue_max = settings.flush_queue_max_rows
        self._dedup = dedup
        self._metrics = metrics
        self._sink = commit.Sink(storage, spool, metrics, asyncio.Semaphore(settings.flush_concurrency))
        self._current: Flush | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self.queued_rows = 0
        self.closed = False

    def join(self, n: int) -> Flush:
        """Joins the open flush for up to `n` rows; refuses when the queue is full."""
        if self.closed:
            raise Overloaded("MeterFlow is shutting down.")
        if self.queued_rows + n > self._queue_max:
            self._metrics.inc("meterflow_flush_queue_full_total")
            raise Overloaded(f"The flush queue holds {self.queued_rows} rows; the limit is {self._queue_max}.")
        f = self._current
        if f is None or f.sealed:
            loop = asyncio.get_running_loop()
            done: asyncio.Future[None] = loop.create_future()
            # A flush whose waiters were cancelled must not log "never retrieved".
            done.add_done_callback(lambda fut: fut.cancelled() or fut.exception())
            f = Flush(id=new_flush_id(), created=time.monotonic(), done=done)
            self._current = f
            loop.call_later(self._max_wait, self._timer, f)
        f.pending += 1
        self.queued_rows += n
        return f

    def add(self, f: Flush, batch: Batch, keep: bytes | None, rows: bytes, count: int, joined: int) -> None:
        """Adds a request's reserved rows to the flush it joined for `joined` rows."""
        f.rows.append(rows)
        if self.spool is not None:
            f.archive.append(batch.archive_lines(keep))
        f.parts.append((batch, keep))
        f.count += count
        self.queued_rows -= joined - count
        f.pending -= 1
        if f.count >= (self._max_rows * GROWTH if self._writes else self._max_rows):
            self._seal(f)
        self._seal_if_idle(f)
        self._maybe_write(f)

    def leave(self, f: Flush, joined: int) -> None:
        """Leaves the flush without rows (nothing new, or reservation failed)."""
        f.pending -= 1
        self.queued_rows -= joined
        self._seal_if_idle(f)
        self._maybe_write(f)

    def _seal_if_idle(self, f: Flush) -> None:
        """Adaptive group commit: with no insert in flight there is nothing to wait
        for, so a flush whose requests have all added their rows goes at once.
        While an insert runs, new requests gather into the next flush instead."""
        if not f.sealed and f.pending == 0 and f.count and not self._writes:
            self._seal(f)

    def _timer(self, f: Flush) -> None:
        """The flush's age limit. While an insert runs the flush keeps gathering (the
        insert's end sends it), up to GROWTH times the limit."""
        if f.sealed:
            return
        if self._writes and time.monotonic() - f.created < self._max_wait * GROWTH:
            asyncio.get_running_loop().call_later(self._max_wait, self._timer, f)
            return
        self._seal(f)

    def _seal(self, f: Flush) -> None:
        if f.sealed:
            return
        f.sealed = True
        if self._current is f:
            self._current = None
        self._maybe_write(f)

    def _maybe_write(self, f: Flush) -> None:
        if not f.sealed or f.pending or f.writing or f.done.done():
            return
        f.writing = True
        if f.count == 0:
            f.done.set_result(None)
            return
        task = asyncio.get_running_loop().create_task(self._write(f))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, f: Flush) -> None:
        rows, archive = b"".join(f.rows), b"".join(f.archive)
        f.rows.clear()
        f.archive.clear()
        try:
            await commit.flush(self._sink, f.id, rows, archive, f.count, commit.Reserved(self._dedup, f, self._metrics))
        except StorageError as e:  # its reservations are released
            self._metrics.inc("meterflow_flush_failures_total")
            log.warning("flush failed", extra={"flush_id": f.id, "rows": f.count, "error": str(e)})
            self.queued_rows -= f.count
            f.done.set_exception(e)
            return
        except BaseException as e:
            self.queued_rows -= f.count
            f.done.set_exception(StorageError(f"insert interrupted: {e!r}"))
            raise
        self.queued_rows -= f.count
        f.done.set_result(None)
        # This write is over: the flush gathered meanwhile goes now (its requests
        # still reserving add their rows first), or as soon as it is idle.
        self._writes.discard(asyncio.current_task())
        if self._current is not None:
            if self._current.count >= self._max_rows or time.monotonic() - self._current.created >= self._max_wait:
                self._seal(self._current)
            else:
                self._seal_if_idle(self._current)

    async def drain(self) -> None:
        """Seals the open flush and waits for every write (SIGTERM)."""
        self.closed = True
        if self._current is not None:
            self._seal(self._current)
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)
