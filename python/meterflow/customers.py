"""Customers: versioned rows in the system of record; deletes are soft (invoices keep them)."""

from __future__ import annotations

import re
import time
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from meterflow.errors import FieldError
from meterflow.storage.base import Storage
from meterflow.storage.documents import Documents

ID_RE = re.compile(r"[A-Za-z0-9_-]{1,255}")
EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
CURRENCY_RE = re.compile(r"[A-Z]{3}")
FIELDS = ("name", "email", "currency", "timezone", "metadata")


class CustomerError(FieldError):
    """A customer document is invalid."""


def validate(doc: Any, partial: bool = False) -> dict[str, Any]:
    """The writable fields of a customer, checked; `partial` for PATCH."""
    if not isinstance(doc, dict):
        raise CustomerError("body", "The body must be a JSON object.")
    unknown = sorted(set(doc) - set(FIELDS) - {"id", "created_at", "updated_at"})
    if unknown:
        raise CustomerError(unknown[0], f"`{unknown[0]}` is not a customer field; the fields are {', '.join(FIELDS)}.")
    out: dict[str, Any] = {}
    for f in FIELDS:
        if f not in doc:
            continue
        v = doc[f]
        if f == "metadata":
            if v is None:
                v = {}
            if not isinstance(v, dict) or not all(
                isinstance(k, str) and isinstance(x, str) and 0 < len(k) <= 100 and len(x) <= 1000 for k, x in v.items()
            ):
                raise CustomerError(
                    "metadata", "`metadata` must map keys of 1 to 100 characters to strings of at most 1000."
                )
            if len(v) > 100:
                raise CustomerError("metadata", "`metadata` holds more than 100 keys, the limit.")
        elif v is not None:
            if not isinstance(v, str):
                raise CustomerError(f, f"`{f}` must be a string.")
            if f == "name" and len(v) > 500:
                raise CustomerError(f, "`name` is longer than 500 characters.")
            if f == "email" and (len(v) > 320 or not EMAIL_RE.fullmatch(v)):
                raise CustomerError(f, f"`email` {v!r} is not an email address.")
            if f == "currency" and not CURRENCY_RE.fullmatch(v):
                raise CustomerError(f, f"`currency` {v!r} must be an ISO 4217 code such as EUR or USD.")
            if f == "timezone":
                try:
                    ZoneInfo(v)
                except (ZoneInfoNotFoundError, ValueError):
                    raise CustomerError(f, f"`timezone` {v!r} is not an IANA time zone name.") from None
        out[f] = v
    if not partial:
        for f in FIELDS:
            out.setdefault(f, {} if f == "metadata" else None)
        out["timezone"] = out["timezone"] or "UTC"
    return out


class Customers:
    def __init__(self, storage: Storage) -> None:
        self._docs = Documents(storage, "customer")

    async def put(self, customer_id: str, fields: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Creates or replaces; returns (customer, created)."""
        old = await self._docs.get(customer_id, include_deleted=True)
        now = int(time.time() * 1000)
        created = old is None or bool(old.get("deleted"))
        doc = {"id": customer_id, **fields, "created_at": now if created else old["created_at"],  # type: ignore[index]
               "updated_at": now}  # fmt: skip
        await self._docs.put(customer_id, doc)
        return doc, created

    async def patch(self, customer_id: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        old = await self._docs.get(customer_id)
        if old is None:
            return None
        doc = {**old, **fields, "updated_at": int(time.time() * 1000)}
        await self._docs.put(customer_id, doc)
        return doc

    async def get(self, customer_id: str) -> dict[str, Any] | None:
        return await self._docs.get(customer_id)

    async def delete(self, customer_id: str) -> bool:
        old = await self._docs.get(customer_id)
        if old is None:
            return False
        await self._docs.delete(customer_id, {**old, "deleted_at": int(time.time() * 1000)})
        return True

    async def list(self, after: str, limit: int, name: str = "", email: str = "") -> list[dict[str, Any]]:
        match = {}
        if name:
            match["name"] = name
        if email:
            match["email"] = email
        return await self._docs.page(after, limit, match=match)
