"""API keys: `mf_<id><secret>`, stored only as a SHA-256 hash, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import sqlalchemy as sa

from meterflow.kernel.clock import now_ms
from meterflow.kernel.ids import ID_RE, ID_RULE
from meterflow.records import IfMatch, Records, RecordsUnavailable, StaleVersion, plain
from meterflow.records.tables import api_keys

Scope = Literal["ingest", "read", "admin"]
SCOPES = ("ingest", "read", "admin")
ALPHABET = string.ascii_letters + string.digits
ID_LEN = 12
SECRET_LEN = 32  # 32 base62 characters: about 190 bits of randomness
CACHE_S = 2.0  # a revoked key stops working on every worker within this time
CACHE_MAX = 10_000  # active keys remembered per worker, least recently used dropped first
MISSES_MAX = 1_000  # unknown or revoked ids remembered per worker, apart: a flood of them evicts no active key
LAST_USED_EVERY_S = 60.0
V = TypeVar("V")
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


@dataclass(frozen=True)
class Refused:
    """A presented key that does not authenticate: `key_id` is set when the id is an active key's
    and the secret is wrong (failures count against that key id, else against the address)."""

    key_id: str | None


def _random(n: int) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(n))


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


KEY_RE = re.compile(f"mf_([A-Za-z0-9]{{{ID_LEN}}})([A-Za-z0-9]{{{SECRET_LEN}}})")


def split_key(raw: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key, else None (one regex match: it runs on every request)."""
    m = KEY_RE.fullmatch(raw)
    return (m[1], m[2]) if m else None


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
    """Keys in the records database, looked up through a short per-worker cache."""

    def __init__(self, records: Records, static_admin_key: str = "", grace_s: float = 60.0) -> None:
        self._db = records
        self._grace_s = grace_s
        self._cache: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._misses: OrderedDict[str, float] = OrderedDict()
        self._last_used_written: dict[str, float] = {}
        static = split_key(static_admin_key) if static_admin_key else None
        # The static admin key's id and the hash of its secret, computed once.
        self._static = (static[0], digest(static[1])) if static else None
        self._static_admin = Principal(key_id=static[0] if static else "", scope="admin")

    async def create(self, scope: str, name: str = "", customer_id: str | None = None,
                     rate_limits: dict[str, int] | None = None) -> tuple[dict[str, Any], str]:  # fmt: skip
        if scope not in SCOPES:
            raise KeyError_(f"`scope` must be one of {', '.join(SCOPES)}, got {scope!r}.")
        if customer_id is not None and scope != "ingest":
            raise KeyError_("`customer_id` binds an ingest key to one customer; only `ingest` keys take it.")
        if customer_id is not None and not ID_RE.fullmatch(customer_id):
            raise KeyError_(f"`customer_id` must be {ID_RULE}.")
        key_id, full, hashed = new_key()
        now = now_ms()
        row = {"id": key_id, "name": name, "scope": scope, "customer_id": customer_id,
               "rate_limits": rate_limits or {}, "hash": hashed, "created_at": now,
               "last_used_at": None, "revoked_at": None, "version": 1}  # fmt: skip
        async with self._db.begin() as conn:
            await conn.execute(sa.insert(api_keys).values(row))
        return public(row), full

    async def list(self, after: str = "", limit: int = 100) -> list[dict[str, Any]]:
        q = (
            sa.select(api_keys)
            .where(api_keys.c.revoked_at.is_(None), api_keys.c.id > after)
            .order_by(api_keys.c.id)
            .limit(limit)
        )
        async with self._db.connect() as conn:
            return [public(plain(r)) for r in (await conn.execute(q)).mappings()]

    async def any_exist(self) -> bool:
        async with self._db.connect() as conn:
            return (await conn.execute(sa.select(api_keys.c.id).limit(1))).first() is not None

    async def revoke(self, key_id: str, if_match: IfMatch | None = None) -> bool:
        """Revokes an active key; False when there is none with this id."""
        if len(key_id) != ID_LEN or not all(c in ALPHABET for c in key_id):
            return False  # no key has such an id: no query
        q = sa.update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
        if if_match is not None and not if_match.any:
            q = q.where(api_keys.c.version.in_(sorted(if_match.versions)))
        async with self._db.begin() as conn:
            done = await conn.execute(q.values(revoked_at=now_ms(), version=api_keys.c.version + 1))
            if not done.rowcount and if_match is not None:
                active = await conn.execute(
                    sa.select(api_keys.c.id).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                )
                if active.first() is not None:
                    raise StaleVersion
        self._cache.pop(key_id, None)
        self._misses.pop(key_id, None)
        return bool(done.rowcount)

    async def authenticate(self, raw: str) -> Principal | None:
        """The key's principal, or None for an unknown, malformed, revoked or wrong key."""
        found = await self.verify(raw)
        return found if isinstance(found, Principal) else None

    async def verify(self, raw: str) -> Principal | Refused:
        """The key's principal, or why it is refused: an unknown, malformed or revoked key
        (`Refused(None)`), or a known key id with a wrong secret (`Refused(<id>)`)."""
        parts = split_key(raw)
        if parts is None:
            return Refused(None)
        key_id, secret = parts
        hashed = digest(secret)
        if self._static is not None and key_id == self._static[0]:
            return self._static_admin if hmac.compare_digest(hashed, self._static[1]) else Refused(key_id)
        doc = await self._lookup(key_id)
        if doc is None:
            return Refused(None)
        if not hmac.compare_digest(str(doc["hash"]), hashed):
            return Refused(key_id)
        await self._touch(doc)
        return Principal(key_id=key_id, scope=doc["scope"], customer_id=doc.get("customer_id"),
                         rate_limits=doc.get("rate_limits") or {})  # fmt: skip

    async def principal_of(self, key_id: str) -> Principal | None:
        """The principal of an active key by its id alone (a dashboard session names its key this way);
        None once the key is revoked (within the cache time)."""
        if self._static is not None and key_id == self._static[0]:
            return Principal(key_id=key_id, scope="admin")
        if len(key_id) != ID_LEN or not all(c in ALPHABET for c in key_id):
            return None
        doc = await self._lookup(key_id)
        if doc is None:
            return None
        return Principal(key_id=key_id, scope=doc["scope"], customer_id=doc.get("customer_id"),
                         rate_limits=doc.get("rate_limits") or {})  # fmt: skip

    async def _lookup(self, key_id: str) -> dict[str, Any] | None:
        now = time.monotonic()
        hit: tuple[float, dict[str, Any] | None] | None = self._cache.get(key_id)
        if hit is not None:
            self._cache.move_to_end(key_id)  # least recently used goes first
        elif key_id in self._misses:
            hit = (self._misses[key_id], None)
        if hit is not None and now - hit[0] < CACHE_S:
            return hit[1]
        q = sa.select(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
        try:
            async with self._db.connect() as conn:
                row = (await conn.execute(q)).mappings().first()
        except RecordsUnavailable:
            # An outage of the records database does not stop ingestion at once:
            # a key seen recently keeps working for the grace time, then 503.
            if hit is not None and now - hit[0] < self._grace_s:
                return hit[1]
            raise
        doc = plain(row) if row is not None else None  # revoked keys: None
        if doc is not None:
            self._misses.pop(key_id, None)
            _remember(self._cache, key_id, (now, doc), CACHE_MAX)
        else:
            self._cache.pop(key_id, None)
            _remember(self._misses, key_id, now, MISSES_MAX)
        return doc

    async def _touch(self, doc: dict[str, Any]) -> None:
        """Keeps last_used_at, written at most once a minute per key and worker.
        It updates that one column only: it can never undo a revocation."""
        now = time.monotonic()
        if now - self._last_used_written.get(doc["id"], -LAST_USED_EVERY_S) < LAST_USED_EVERY_S:
            return
        self._last_used_written[doc["id"]] = now
        try:
            async with self._db.begin() as conn:
                await conn.execute(
                    sa.update(api_keys).where(api_keys.c.id == doc["id"]).values(last_used_at=now_ms())
                )
        except RecordsUnavailable:
            pass  # a statistic: it does not stop a request that is otherwise served


def _remember(cache: OrderedDict[str, V], key: str, value: V, limit: int) -> None:
    """Puts `key` last (most recent); drops the least recently used beyond `limit`."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)


def public(doc: dict[str, Any]) -> dict[str, Any]:
    """A key as listed: never the secret or its hash."""
    return {k: v for k, v in doc.items() if k != "hash"}
