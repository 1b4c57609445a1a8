"""The Rust core: decode, validate and encode a whole batch in one call."""

from typing import final

__all__ = [
    "Batch",
    "DecodeError",
    "DedupIndex",
    "Limits",
    "ReplyError",
    "decode_batch",
    "parse_reserve_replies",
]

class DecodeError(ValueError):
    """The request as a whole is rejected; ``args`` is ``(code, message)``.

    Codes: ``invalid_utf8``, ``invalid_json``, ``body_not_object``,
    ``events_missing``, ``events_not_array``, ``duplicate_field``,
    ``too_many_events`` (413), ``empty_batch``.
    """

class ReplyError(ValueError):
    """Redis answered the dedup pipeline with an error or an unexpected reply."""

@final
class Limits:
    """The event contract's limits (DESIGN §4); build once at start."""

    def __new__(
        cls,
        *,
        max_events: int = 1000,
        max_future_ms: int = 300_000,
        max_age_ms: int = 2_592_000_000,
        max_id_len: int = 255,
        max_event_type_len: int = 100,
        max_property_value_len: int = 1000,
        max_property_key_len: int = 255,
        max_properties: int = 100,
        max_depth: int = 64,
    ) -> Limits: ...
    @property
    def max_events(self) -> int: ...
    @property
    def max_future_ms(self) -> int: ...
    @property
    def max_age_ms(self) -> int: ...

@final
class Batch:
    """The outcome of one decoded batch; the valid events stay encoded in Rust."""

    def __len__(self) -> int:
        """Number of valid, distinct events."""
    @property
    def received(self) -> int:
        """Events in the request, valid or not."""
    @property
    def in_batch_duplicates(self) -> int:
        """Events whose transaction_id repeats an earlier one of the same batch."""
    @property
    def transaction_ids(self) -> list[str]:
        """The valid events' ids, in request order."""
    @property
    def failed(self) -> list[tuple[int, str | None, str]]:
        """(request index, transaction_id or None, reason code) per invalid event."""
    @property
    def failure_messages(self) -> list[str]:
        """One sentence per entry of ``failed``, same order."""
    def transaction_id(self, i: int) -> str: ...
    def request_index(self, i: int) -> int:
        """Position in the request's ``events`` array of valid event ``i``."""
    def storage_rows(self, keep: bytes | None = None) -> bytes:
        """RowBinary rows (transaction_id, customer_id, event_type, timestamp_ms,
        ts, properties, num_keys, num_values, str_keys, str_values) of the
        events whose ``keep`` byte is non-zero."""
    def archive_lines(self, keep: bytes | None = None) -> bytes:
        """NDJSON of the kept events, one canonical JSON event per line."""
    def redis_reserve(self, prefix: str, flush_id: str, ttl_seconds: int) -> bytes:
        """RESP of one ``SET <prefix><id> <flush_id> NX EX <ttl> GET`` per event."""

def decode_batch(body: bytes, now_ms: int, limits: Limits | None = None, customer_id: str | None = None) -> Batch:
    """Decode, validate and encode a ``{"events": [...]}`` body, GIL released.

    With ``customer_id``, events of any other customer fail with
    ``customer_not_allowed``. Raises DecodeError for envelope errors.
    """

def parse_reserve_replies(data: bytes, count: int) -> list[tuple[int, bytes]] | None:
    """None until ``data`` holds ``count`` replies to ``Batch.redis_reserve``;
    then (event index, flush id) of every id that was already taken."""

@final
class DedupIndex:
    """The embedded mode's in-process dedup index."""

    def __new__(cls) -> DedupIndex: ...
    def __len__(self) -> int: ...
    def reserve(self, batch: Batch, flush: int) -> bytes:
        """One code per valid event: 0 reserved now, 1 duplicate, 2 in flight."""
    def commit(self, flush: int, now_s: int) -> None: ...
    def release(self, flush: int) -> None: ...
    def load(self, ids: list[str], now_s: int) -> None: ...
    def expire(self, before_s: int) -> int: ...
