"""The flush id: the one name of a flush, carried by its reservations, its archive object and its commit record."""

from __future__ import annotations

import secrets

from meterflow.kernel import clock


def new_flush_id(now_ms: int | None = None) -> str:
    """A flush id that carries its creation time: 12 hex digits of epoch ms, then 12 random."""
    ms = clock.now_ms() if now_ms is None else now_ms
    return f"{ms:012x}{secrets.token_hex(6)}"


def flush_created_ms(flush_id: str) -> int:
    """The epoch ms a flush id was made at; 0 for an id that does not carry one."""
    try:
        return int(flush_id[:12], 16)
    except ValueError:
        return 0
