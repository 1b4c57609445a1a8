"""The stored events themselves, newest first, a page at a time: "did my event arrive?"."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import orjson

from meterflow.kernel.errors import FieldError
from meterflow.kernel.ids import ID_RE, ID_RULE
from meterflow.kernel.params import EPOCH_MS_MAX, EPOCH_MS_MIN
from meterflow.storage.base import QueryLimits, Storage, quote

EVENTS_PAGE_MAX = 500
EVENT_TYPE_MAX = 255  # longer filter text can match no stored event type


class EventsError(FieldError):
    """A parameter of an events query is wrong; `field` is the parameter."""


class OtherCustomer(EventsError):
    """A key bound to one customer asked for another's events."""


@dataclass(frozen=True)
class Cursor:
    """Where the previous page stopped: the last row's sort key."""

    timestamp_ms: int
    customer_id: str
    transaction_id: str

    def encode(self) -> str:
        raw = orjson.dumps([self.timestamp_ms, self.customer_id, self.transaction_id])
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            ts, customer, txid = orjson.loads(raw)
            if not (isinstance(ts, int) and isinstance(customer, str) and isinstance(txid, str)):
                raise ValueError
        except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
            raise EventsError("cursor", "`cursor` must be the `next_cursor` of a previous page.") from None
        return cls(ts, customer, txid)


@dataclass(frozen=True)
class EventsQuery:
    customer_id: str | None = None
    event_type: str | None = None
    start: int = EPOCH_MS_MIN
    end: int = EPOCH_MS_MAX
    limit: int = 100
    cursor: Cursor | None = None


def events_query(customer_id: str | None = None, event_type: str | None = None, start: int = EPOCH_MS_MIN,
                 end: int = EPOCH_MS_MAX, limit: int = 100, cursor: Cursor | None = None,
                 bound_customer: str | None = None) -> EventsQuery:  # fmt: skip
    """The query, its values checked (EventsError names the field); a key bound to a customer sees that customer
    only. The API reads these values from URL parameters (`api.events.parse_query`), the dashboard from its form."""
    check_subject(customer_id, event_type, bound_customer)
    if not 1 <= limit <= EVENTS_PAGE_MAX:
        raise EventsError("limit", f"`limit` must be an integer from 1 to {EVENTS_PAGE_MAX}, got {limit!r}.")
    if end <= start:
        raise EventsError("end", f"`end` ({end}) must be after `start` ({start}); the period is [start, end).")
    return EventsQuery(bound_customer if bound_customer is not None else customer_id, event_type, start, end, limit,
                       cursor)  # fmt: skip


def check_subject(customer_id: str | None, event_type: str | None, bound_customer: str | None = None) -> None:
    """Whose events of which type: the customer id's rule, the bound key's customer, the event type's length."""
    if customer_id is not None and not ID_RE.fullmatch(customer_id):
        raise EventsError("customer_id", f"`customer_id` must be {ID_RULE}.")
    if bound_customer is not None and customer_id is not None and customer_id != bound_customer:
        raise OtherCustomer("customer_id", f"This key sees the events of customer {bound_customer!r} only.")
    if event_type is not None and len(event_type) > EVENT_TYPE_MAX:
        raise EventsError("event_type", f"`event_type` is longer than {EVENT_TYPE_MAX} characters, the limit.")


def _sql(q: EventsQuery) -> str:
    where = [f"timestamp_ms >= {q.start}", f"timestamp_ms < {q.end}"]
    if q.customer_id is not None:
        where.append(f"customer_id = {quote(q.customer_id)}")
    if q.event_type is not None:
        where.append(f"event_type = {quote(q.event_type)}")
    if (c := q.cursor) is not None:
        # Strictly after the cursor in (timestamp_ms, customer_id, transaction_id) descending order.
        cid, tid = quote(c.customer_id), quote(c.transaction_id)
        where.append(
            f"(timestamp_ms < {c.timestamp_ms} OR (timestamp_ms = {c.timestamp_ms} AND "
            f"(customer_id < {cid} OR (customer_id = {cid} AND transaction_id < {tid}))))"
        )
    # A transaction re-inserted before ClickHouse merged it shows once (LIMIT 1 BY).
    return (
        "SELECT transaction_id, customer_id, event_type, timestamp_ms, properties FROM events "
        f"WHERE {' AND '.join(where)} "
        "ORDER BY timestamp_ms DESC, customer_id DESC, transaction_id DESC "
        f"LIMIT 1 BY customer_id, transaction_id LIMIT {q.limit + 1}"
    )


@dataclass(frozen=True)
class StoredEvent:
    transaction_id: str
    customer_id: str
    event_type: str
    timestamp_ms: int
    properties: str  # the canonical JSON text as stored


@dataclass(frozen=True)
class EventsPage:
    events: list[StoredEvent]
    next_cursor: str | None  # None on the last page


async def list_events(storage: Storage, q: EventsQuery, limits: QueryLimits) -> EventsPage:
    """A page of events, newest first, each read within `limits` (QueryLimitExceeded past them)."""
    rows = await storage.query(_sql(q), limits)
    events = [
        StoredEvent(str(r["transaction_id"]), str(r["customer_id"]), str(r["event_type"]), int(r["timestamp_ms"]),
                    str(r["properties"]) or "{}")
        for r in rows[: q.limit]
    ]  # fmt: skip
    more = len(rows) > q.limit and events
    last = events[-1] if more else None
    cursor = Cursor(last.timestamp_ms, last.customer_id, last.transaction_id).encode() if last else None
    return EventsPage(events, cursor)
