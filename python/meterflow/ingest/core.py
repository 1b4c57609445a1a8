"""The one door to the Rust core: the rest of the package imports from here."""

from meterflow._core import (
    Batch,
    DecodeError,
    DedupIndex,
    Limits,
    ReplyError,
    decode_batch,
    parse_reserve_replies,
)

__all__ = [
    "Batch",
    "DecodeError",
    "DedupIndex",
    "Limits",
    "ReplyError",
    "decode_batch",
    "parse_reserve_replies",
]
