"""API keys: `mf_<id><secret>`, stored only as a SHA-256 hash, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from meterflow.customers import ID_RE
from meterflow.storage.base import Storage
from meterflow.storage.documents import Documents

Scope = Literal["ingest", "read", "admin"]
SCOPES = ("ingest", "read", "admin")
ALPHABET = string.ascii_letters + string.digits
ID_LEN = 12
SECRET_LEN = 32  # 32 base62 characters: about 190 bits of randomness
CACHE_S = 2.0  # a revoked key stops working on every worker within this time
CACHE_MAX = 10_000  # keys (known or not) remembered per worker
LAST_USED_EVERY_S = 60.0
RATE_FIELDS = ("requests_per_s", "requests_burst", "events_per_s", "events_burst")


class KeyError_(ValueError):
    """A key definition is invalid."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id and what it may do."""

    key_id: str
    scope: Scope
    customer_id: str | None = None
    rate_limits: dict[str, int] = field(default_factory=dict)

    def allows(self, needed: Scope) -> bool:
        return self.scope == "admin" or self.scope == needed


def _random(n: int) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(n))


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_key(raw: str) -> tuple[str, str] | None:
    if not raw.startswith("mf_") or len(raw) != 3 + ID_LEN + SECRET_LEN:
        return None
    body = raw[3:]
    if not all(c in ALPHABET for c in body):
        return None
    return body[:ID_LEN], body[ID_LEN:]


def new_key() -> tuple[str, str, str]:
    """(key id, the full key shown once, its hash)."""
    key_id, secret = _random(ID_LEN), _random(SECRET_LEN)
    return key_id, f"mf_{key_id}{secret}", digest(secret)


def check_rate_limits(raw: Any) -> dict[str, int]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or set(raw) - set(RATE_FIELDS):
        raise KeyError_(f"`rate_limits` may set {', '.join(RATE_FIELDS)}.")
    for k, v in raw.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise KeyError_(f"`rate_limits.{k}` must be a positive integer.")
    return dict(raw)


class KeyStore:
    def __init__(self, storage: Storage, static_admin_key: str = "") -> None:
        self._docs = Documents(storage, "api_key")
        # last_used_at lives apart: rewriting the key's own document could undo a
        # revocation that landed between the read and the write.
        self._used = Documents(storage, "api_key_used")
        self._cache: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._last_used_written: dict[str, float] = {}
        self._static = split_key(static_admin_key) if static_admin_key else None

    async def create(self, scope: str, name: str = "", customer_id: str | None = None,
                     rate_limits: dict[str, int] | None = None) -> tuple[dict[str, Any], str]:  # fmt: skip
        if scope not in SCOPES:
            raise KeyError_(f"`scope` must be one of {', '.join(SCOPES)}, got {scope!r}.")
        if customer_id is not None and scope != "ingest":
            raise KeyError_("`customer_id` binds an ingest key to one customer; only `ingest` keys take it.")
        if customer_id is not None and not ID_RE.fullmatch(customer_id):
            raise KeyError_("`customer_id` must be 1 to 255 of A-Z, a-z, 0-9, '_' or '-'.")
        key_id, full, hashed = new_key()
        now = int(time.time() * 1000)
        doc = {"id": key_id, "name": name, "scope": scope, "customer_id": customer_id,
               "rate_limits": rate_limits or {}, "hash": hashed, "created_at": now,
               "last_used_at": None, "revoked_at": None}  # fmt: skip
        await self._docs.put(key_id, doc)
        return public(doc), full

    async def list(self, after: str = "", limit: int = 100) -> list[dict[str, Any]]:
        keys = await self._docs.page(after, limit)
        used = await self._used.get_many([k["id"] for k in keys])
        return [public({**k, "last_used_at": used.get(k["id"], {}).get("last_used_at")}) for k in keys]

    async def any_exist(self) -> bool:
        return bool(await self._docs.page("", 1, include_deleted=True))

    async def revoke(self, key_id: str) -> bool:
        if len(key_id) != ID_LEN or not all(c in ALPHABET for c in key_id):
            return False  # no key has such an id: no query
        doc = await self._docs.get(key_id)
        if doc is None:
            return False
        doc["revoked_at"] = int(time.time() * 1000)
        await self._docs.delete(key_id, doc)
        self._cache.pop(key_id, None)
        return True

    async def authenticate(self, raw: str) -> Principal | None:
        """The key's principal, or None for an unknown, malformed or revoked key."""
        parts = split_key(raw)
        if parts is None:
            return None
        key_id, secret = parts
        if (
            self._static is not None
            and hmac.compare_digest(digest(secret), digest(self._static[1]))
            and key_id == self._static[0]
        ):
            return Principal(key_id=key_id, scope="admin")
        doc = await self._lookup(key_id)
        if doc is None or not hmac.compare_digest(str(doc["hash"]), digest(secret)):
            return None
        await self._touch(doc)
        return Principal(key_id=key_id, scope=doc["scope"], customer_id=doc.get("customer_id"),
                         rate_limits=doc.get("rate_limits") or {})  # fmt: skip

    async def _lookup(self, key_id: str) -> dict[str, Any] | None:
        now = time.monotonic()
        hit = self._cache.get(key_id)
        if hit is not None and now - hit[0] < CACHE_S:
            return hit[1]
        doc = await self._docs.get(key_id)  # revoked keys are deleted documents: None
        self._cache[key_id] = (now, doc)
        if len(self._cache) > CACHE_MAX:  # unknown ids must not grow it: drop the oldest (dicts keep order)
            del self._cache[next(iter(self._cache))]
        return doc

    async def _touch(self, doc: dict[str, Any]) -> None:
        """Keeps last_used_at, written at most once a minute per key and worker."""
        now = time.monotonic()
        if now - self._last_used_written.get(doc["id"], -LAST_USED_EVERY_S) < LAST_USED_EVERY_S:
            return
        self._last_used_written[doc["id"]] = now
        await self._used.put(doc["id"], {"id": doc["id"], "last_used_at": int(time.time() * 1000)})


def public(doc: dict[str, Any]) -> dict[str, Any]:
    """A key as listed: never the secret or its hash."""
    return {k: v for k, v in doc.items() if k not in ("hash", "deleted")}
