"""Dashboard sessions: an API key exchanged for a signed cookie that names the key, and the CSRF token of its forms."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

COOKIE = "mf_session"
LIFETIME_S = 12 * 3600
SECRET_FILE = "dashboard.secret"


def load_secret(data_dir: Path) -> bytes:
    """The signing secret every worker shares: a random file in the data dir, made by whichever worker comes first."""
    path = data_dir / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    # Another worker may have created the file a moment ago and not written it yet.
    deadline = time.monotonic() + 5
    while True:
        text = path.read_text().strip()
        if len(text) == 64 or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    if len(text) != 64:
        raise RuntimeError(f"{path} does not hold a 64-character hex secret; delete it to make a new one")
    return bytes.fromhex(text)


@dataclass(frozen=True)
class Session:
    """Who signed in: the key's id (its scope is looked up on every request) and a random session id."""

    key_id: str
    sid: str
    expires: int  # epoch seconds


class Signer:
    """Signs session cookies and derives their CSRF tokens with one server secret."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _mac(self, purpose: str, payload: bytes) -> str:
        return hmac.new(self._secret, purpose.encode() + b"\0" + payload, hashlib.sha256).hexdigest()

    def issue(self, key_id: str, now: float | None = None) -> tuple[str, Session]:
        now = time.time() if now is None else now
        s = Session(key_id, secrets.token_urlsafe(16), int(now) + LIFETIME_S)
        payload = base64.urlsafe_b64encode(orjson.dumps([s.key_id, s.sid, s.expires])).decode()
        return f"{payload}.{self._mac('session', payload.encode())}", s

    def read(self, cookie: str, now: float | None = None) -> Session | None:
        """The session of a cookie this server signed and that has not expired, else None."""
        payload, _, mac = cookie.partition(".")
        if not hmac.compare_digest(mac.encode(), self._mac("session", payload.encode()).encode()):
            return None
        try:
            key_id, sid, expires = orjson.loads(base64.urlsafe_b64decode(payload))
        except (ValueError, TypeError, orjson.JSONDecodeError):
            return None
        if not (isinstance(key_id, str) and isinstance(sid, str) and isinstance(expires, int)):
            return None
        if expires <= (time.time() if now is None else now):
            return None
        return Session(key_id, sid, expires)

    def csrf(self, session: Session) -> str:
        return self._mac("csrf", session.sid.encode())

    def csrf_ok(self, session: Session, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self.csrf(session).encode())
