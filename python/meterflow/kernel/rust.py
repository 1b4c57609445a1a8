"""The one door to the Rust core (`meterflow._core`): the rest of the package imports it from here, never directly."""

from meterflow._core import (
    Batch,
    DecodeError,
    DedupIndex,
    Limits,
    ReplyError,
    conflict_fields,
    decode_batch,
)

# Events accepted once (archived, queued or stored) are read back with these limits:
# their age no longer matters, and a queued entry holds one request's batch at most.
_ANY_TIME_MS = 100 * 365 * 86_400_000
STORED_LIMITS = Limits(max_events=1_000_000, max_future_ms=_ANY_TIME_MS, max_age_ms=_ANY_TIME_MS)

__all__ = [
    "STORED_LIMITS",
    "Batch",
    "DecodeError",
    "DedupIndex",
    "Limits",
    "ReplyError",
    "conflict_fields",
    "decode_batch",
]
