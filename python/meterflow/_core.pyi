"""The Rust core: decode, validate and encode a whole batch in one call."""

from typing import final

__all__ = [
    "Batch",
    "DecodeError",
    "DedupIndex",
    "Limits",
    "ReplyError",
    "conflict_fields",
    "decode_batch",
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
    @property
    def max_id_len(self) -> int: ...
    @property
    def max_event_type_len(self) -> int: ...
    @property
    def max_property_value_len(self) -> int: ...
    @property
    def max_property_key_len(self) -> int: ...
    @property
    def max_properties(self) -> int: ...

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
        """Events that repeat an earlier one of the same batch: same
        customer_id, transaction_id and content (other content fails with
        ``idempotency_conflict``)."""
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
    def key(self, i: int) -> str:
        """Valid event ``i``'s idempotency key, a 128-bit hash of
        (customer_id, transaction_id) as 22 characters of the id alphabet."""
    def fingerprint(self, i: int) -> str:
        """Valid event ``i``'s content fingerprint (event_type, timestamp,
        properties in any key order) as 16 characters."""
    def redis_reserve(self, prefix: str, flush_id: str, ttl_seconds: int) -> bytes:
        """RESP of one ``SET <prefix><key> <flush_id>|<fingerprint> NX EX <ttl> GET`` per event."""
    def reserve_replies(self, data: bytes) -> list[tuple[int, bytes, int]] | None:
        """None until ``data`` holds the replies to ``redis_reserve``; then per
        key already held: (event index, the flush id holding it, the fields in
        which the held event differs as bits: 1 event_type, 2 timestamp,
        4 properties; 0 when the content is the same)."""

def decode_batch(body: bytes, now_ms: int, limits: Limits | None = None, customer_id: str | None = None) -> Batch:
    """Decode, validate and encode a ``{"events": [...]}`` body, GIL released.

    With ``customer_id``, events of any other customer fail with
    ``customer_not_allowed``. Raises DecodeError for envelope errors.
    """

def conflict_fields(differs: int) -> str:
    """The names of the fields in a ``differs`` bit set, e.g. ``"timestamp, properties"``."""

@final
class DedupIndex:
    """The embedded mode's in-process dedup index."""

    def __new__(cls) -> DedupIndex: ...
    def __len__(self) -> int: ...
    def reserve(self, batch: Batch, flush: int) -> bytes:
        """One code per valid event: 0 reserved now, 1 duplicate, 2 in flight,
        16 + the differing fields' bits (1 event_type, 2 timestamp,
        4 properties) for a conflict."""
    def commit(self, flush: int, now_s: int) -> None: ...
    def release(self, flush: int) -> None: ...
    def load(self, batch: Batch, now_s: int) -> None:
        """Marks the batch's events as committed (warming from storage)."""
    def expire(self, before_s: int) -> int: ...
