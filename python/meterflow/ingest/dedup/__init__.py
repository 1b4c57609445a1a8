"""Dedup: exactly-once acceptance, by reserving ids per flush and committing once per flush (DESIGN §3).

Idempotency is per customer: every layer keys on (customer_id, transaction_id),
as the fixed-size key the Rust core computes (`Batch.key`). Beside each
reservation sits the fingerprint of the event's content, so a retry (same
content: duplicate) is told from a conflict (other content: failed with
`idempotency_conflict`) without another lookup.

Owns: the `Dedup` protocol and its two backends, `memory` (the Rust core's
in-process index, embedded mode) and `redis` (shared by every worker), with
the Redis keys they keep (reservations, commit records, queued markers).
Does not own: when a flush commits or releases (`ingest.commit`), the flush id's
format (`kernel.flush_ids`), or the Redis connection (`meterflow.redis`).
"""

from __future__ import annotations

from meterflow.config import Settings
from meterflow.ingest.dedup.memory import MemoryDedup
from meterflow.ingest.dedup.protocol import Dedup, DedupFull, DedupUnavailable, Reservation
from meterflow.ingest.dedup.redis import (
    FLUSH_PREFIX,
    KEY_PREFIX,
    QUEUED_PREFIX,
    RedisDedup,
    commit_record,
    stream_bytes_key,
)

__all__ = [
    "FLUSH_PREFIX",
    "KEY_PREFIX",
    "QUEUED_PREFIX",
    "Dedup",
    "DedupFull",
    "DedupUnavailable",
    "MemoryDedup",
    "RedisDedup",
    "Reservation",
    "commit_record",
    "open_dedup",
    "stream_bytes_key",
]


def open_dedup(settings: Settings) -> Dedup:
    if settings.dedup == "redis":
        return RedisDedup(settings)
    return MemoryDedup(settings)
