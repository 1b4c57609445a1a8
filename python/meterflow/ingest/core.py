"""The one door to the Rust core: the rest of the package imports from here."""

from meterflow._core import (
    Batch,
    DecodeError,
    DedupIndex,
    Limits,
    ReplyError,
    conflict_fields,
    decode_batch,
)

# Events accepted once (archived or stored) are read back with these limits:
# their age no longer matters.
STORED_LIMITS = Limits(max_future_ms=100 * 365 * 86_400_000, max_age_ms=100 * 365 * 86_400_000)

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
