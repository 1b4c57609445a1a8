"""Dashboard sessions, kept in the records database: a random cookie token, its CSRF token, and what ends it.

The cookie holds 256 random bits; the database holds only their SHA-256, so a copy of the table
signs nobody in. Every worker reads the same rows, so a session ends everywhere at once: at sign-out
(its row is deleted), at its expiry (`MF_DASHBOARD_SESSION_S` after sign-in), or when its API key is
revoked (the lookup joins the key's row: no cache stands between a revocation and the next page).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

import sqlalchemy as sa

from meterflow.kernel.clock import now_ms
from meterflow.records import Records
from meterflow.records.tables import api_keys, dashboard_sessions

COOKIE = "mf_session"
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)


def _digest(purpose: str, token: str) -> str:
    return hashlib.sha256(purpose.encode() + b"\0" + token.encode()).hexdigest()


@dataclass(frozen=True)
class Session:
    """A live sign-in: its row's id, the key it signed in with (its scope is looked up on every request), when it
    expires (epoch ms), and the CSRF token of its forms (derived from the cookie's token, which pages never show)."""

    id: str
    key_id: str
    expires_at: int
    csrf: str
    key_revoked: bool = False  # the guard ends such a session and says why

    def csrf_ok(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self.csrf.encode())


class Sessions:
    """The dashboard's sessions in the records database."""

    def __init__(self, records: Records, lifetime_s: int) -> None:
        self._db = records
        self.lifetime_s = lifetime_s

    async def start(self, key_id: str, now: int | None = None) -> tuple[str, Session]:
        """A new session of `key_id`: (the cookie's token, the session); expired sessions are dropped on the way."""
        now = now_ms() if now is None else now
        token = secrets.token_urlsafe(32)
        s = Session(_digest("session", token), key_id, now + self.lifetime_s * 1000, _digest("csrf", token))
        async with self._db.begin() as conn:
            await conn.execute(sa.delete(dashboard_sessions).where(dashboard_sessions.c.expires_at <= now))
            await conn.execute(sa.insert(dashboard_sessions).values(
                id=s.id, key_id=key_id, created_at=now, expires_at=s.expires_at))  # fmt: skip
        return token, s

    async def read(self, token: str, now: int | None = None) -> Session | None:
        """The session of a cookie's token (`key_revoked` once its key is revoked); None once signed out or expired
        (or never issued)."""
        if not TOKEN_RE.fullmatch(token):
            return None  # no session has such a token: no query
        now = now_ms() if now is None else now
        t = dashboard_sessions
        revoked = sa.exists().where(api_keys.c.id == t.c.key_id, api_keys.c.revoked_at.is_not(None))
        q = sa.select(t.c.key_id, t.c.expires_at, revoked.label("revoked")).where(
            t.c.id == _digest("session", token), t.c.expires_at > now)  # fmt: skip
        async with self._db.connect() as conn:
            row = (await conn.execute(q)).first()
        if row is None:
            return None
        return Session(_digest("session", token), str(row.key_id), int(row.expires_at), _digest("csrf", token),
                       bool(row.revoked))  # fmt: skip

    async def end(self, session: Session) -> None:
        """Signs out: the session's cookie no longer works on any worker."""
        async with self._db.begin() as conn:
            await conn.execute(sa.delete(dashboard_sessions).where(dashboard_sessions.c.id == session.id))
