"""Webhook endpoints and the outbox they are fed from: register, list, delete, enqueue, sign (Standard Webhooks)."""

from __future__ import annotations

import base64
import builtins
import datetime as dt
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from meterflow.billing.destinations import Destinations, RefusedDestination
from meterflow.kernel.clock import now_ms
from meterflow.kernel.errors import FieldError
from meterflow.records import Records, plain
from meterflow.records.tables import webhook_attempts, webhook_deliveries, webhooks

EVENTS = ("invoice.finalized", "invoice.voided", "invoice.paid", "credit_note.created")
URL_MAX = 2000


class WebhookError(FieldError):
    """A webhook registration is invalid."""



def new_secret() -> str:
    """A `whsec_` secret: base64 of 24 random bytes, as the Standard Webhooks libraries expect."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: `v1,` and the base64 HMAC-SHA256 of `id.timestamp.body`."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def validate(doc: Any) -> tuple[str, tuple[str, ...], str | None]:
    """(url, events, description) of a registration, or a WebhookError naming the field."""
    if not isinstance(doc, dict):
        raise WebhookError("body", "The body must be a JSON object.")
    unknown = sorted(set(doc) - {"url", "events", "description"})
    if unknown:
        field = unknown[0]
        raise WebhookError(field, f"`{field}` is not a webhook field; the fields are url, events, description.")
    url = doc.get("url")
    if not isinstance(url, str) or len(url) > URL_MAX:
        raise WebhookError("url", f"`url` must be an http(s) URL of at most {URL_MAX} characters.")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise WebhookError("url", f"`url` {url[:100]!r} is not an https:// URL with a host.")
    events = doc.get("events", list(EVENTS))
    if not isinstance(events, list) or not events or not all(isinstance(e, str) and e in EVENTS for e in events):
        raise WebhookError("events", f"`events` must be a non-empty list of {', '.join(EVENTS)}.")
    description = doc.get("description")
    if description is not None and (not isinstance(description, str) or len(description) > 500):
        raise WebhookError("description", "`description` must be a string of at most 500 characters.")
    return url, tuple(dict.fromkeys(events)), description


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "url": row["url"], "events": row["events"], "description": row["description"],
            "created_at": row["created_at"]}  # fmt: skip


# What a webhook carries of an invoice or a credit note: its summary and links, never its lines (an
# invoice may have thousands); a receiver reads the rest from the API.
INVOICE_SUMMARY = ("id", "number", "status", "kind", "customer_id", "subscription_id", "plan", "currency",
                   "period", "subtotal", "minimum_adjustment", "late_usage", "total", "amount_credited",
                   "amount_due", "created_at", "issued_at", "due_at", "paid_at", "voided_at")  # fmt: skip
CREDIT_NOTE_SUMMARY = ("id", "number", "invoice_id", "invoice_number", "customer_id", "subscription_id",
                       "reason", "currency", "total", "memo", "created_at")  # fmt: skip


def summary(event_type: str, data: dict[str, Any]) -> dict[str, Any]:
    """The `data` of an event: the document's summary fields, its number of lines and links to it (paths
    under the API's base URL: the JSON, the HTML and the PDF document)."""
    fields: tuple[str, ...]
    if event_type == "credit_note.created":
        fields, base = CREDIT_NOTE_SUMMARY, f"/v1/credit_notes/{data['id']}"
        extra = {"invoice": f"/v1/invoices/{data['invoice_id']}"}
    else:
        fields, base, extra = INVOICE_SUMMARY, f"/v1/invoices/{data['id']}", {}
    out = {k: data[k] for k in fields if k in data}
    out["line_count"] = len(data.get("lines") or ())
    out["links"] = {"self": base, "html": base + ".html", "pdf": base + ".pdf", **extra}
    return out


def payload(event_type: str, data: dict[str, Any], at_ms: int) -> bytes:
    """The JSON body: `{type, timestamp, data}`, the payload structure the specification recommends."""
    stamp = dt.datetime.fromtimestamp(at_ms / 1000, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return orjson.dumps({"type": event_type, "timestamp": stamp, "data": data})


class Webhooks:
    """Webhook endpoints in the records database and the outbox rows their events become."""

    def __init__(self, records: Records, destinations: Destinations | None = None) -> None:
        self._db = records
        self._destinations = destinations if destinations is not None else Destinations()

    async def register(self, url: str, events: Sequence[str], description: str | None) -> dict[str, Any]:
        """The new endpoint with its secret (shown this once); WebhookError when `url` may not receive
        webhooks (its rules, or an address its host resolves to now)."""
        try:
            await self._destinations.check(url)
        except RefusedDestination as e:
            raise WebhookError("url", e.message) from None
        row = {"id": "wh_" + secrets.token_hex(12), "url": url, "secret": new_secret(), "events": list(events),
               "description": description, "created_at": now_ms(), "deleted_at": None}  # fmt: skip
        async with self._db.begin() as conn:
            await conn.execute(sa.insert(webhooks).values(row))
        return {**_public(row), "secret": row["secret"]}

    async def list(self, after: str, limit: int) -> list[dict[str, Any]]:
        q = sa.select(webhooks).where(webhooks.c.deleted_at.is_(None), webhooks.c.id > after)
        async with self._db.connect() as conn:
            rows = (await conn.execute(q.order_by(webhooks.c.id).limit(limit))).mappings().all()
        return [_public(plain(r)) for r in rows]

    async def exists(self, webhook_id: str) -> bool:
        q = sa.select(webhooks.c.id).where(webhooks.c.id == webhook_id, webhooks.c.deleted_at.is_(None))
        async with self._db.connect() as conn:
            return (await conn.execute(q)).first() is not None

    async def delete(self, webhook_id: str) -> bool:
        """Soft: its delivery log stays readable; its pending deliveries are no longer sent."""
        async with self._db.begin() as conn:
            done = await conn.execute(
                sa.update(webhooks)
                .where(webhooks.c.id == webhook_id, webhooks.c.deleted_at.is_(None))
                .values(deleted_at=now_ms())
            )
        return bool(done.rowcount)

    async def deliveries(self, webhook_id: str, after: str, limit: int) -> builtins.list[dict[str, Any]]:
        """Deliveries in id order, each with its attempts."""
        d = webhook_deliveries
        q = sa.select(d).where(d.c.webhook_id == webhook_id, d.c.id > after).order_by(d.c.id).limit(limit)
        async with self._db.connect() as conn:
            rows = [plain(r) for r in (await conn.execute(q)).mappings().all()]
            ids = [r["id"] for r in rows]
            a = webhook_attempts
            tries = (await conn.execute(
                sa.select(a).where(a.c.delivery_id.in_(ids)).order_by(a.c.id)
            )).mappings().all() if ids else []  # fmt: skip
        by: dict[str, builtins.list[dict[str, Any]]] = {i: [] for i in ids}
        for t in tries:
            by[t["delivery_id"]].append({"attempted_at": t["attempted_at"], "status_code": t["status_code"],
                                         "error": t["error"], "duration_ms": t["duration_ms"]})  # fmt: skip
        return [{"id": r["id"], "event_type": r["event_type"], "status": r["status"], "attempts": by[r["id"]],
                 "created_at": r["created_at"], "next_attempt_at": r["next_attempt_at"] if r["status"] == "pending"
                 else None, "delivered_at": r["delivered_at"], "payload": orjson.loads(r["payload"])}
                for r in rows]  # fmt: skip


async def enqueue(conn: AsyncConnection, event_type: str, data: dict[str, Any]) -> int:
    """Writes one delivery per endpoint that wants `event_type`, in the caller's transaction: the event
    and its deliveries commit together, and sending happens later, never in the caller's way. `data` is
    the whole invoice or credit note; the delivery carries its summary."""
    rows = (await conn.execute(sa.select(webhooks.c.id, webhooks.c.events).where(webhooks.c.deleted_at.is_(None))))
    targets = [r.id for r in rows if event_type in r.events]
    if not targets:
        return 0
    at = now_ms()
    body = payload(event_type, summary(event_type, data), at).decode()
    await conn.execute(sa.insert(webhook_deliveries), [
        {"id": "msg_" + secrets.token_hex(16), "webhook_id": w, "event_type": event_type, "payload": body,
         "status": "pending", "attempts": 0, "created_at": at, "next_attempt_at": at, "claim": None,
         "delivered_at": None} for w in targets])  # fmt: skip
    return len(targets)
