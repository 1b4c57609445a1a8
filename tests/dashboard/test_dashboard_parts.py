"""The dashboard's pieces without a browser: sessions in the records database, the per-minute history, number formatting."""

from __future__ import annotations

from decimal import Decimal

import sqlalchemy as sa

from meterflow.auth.keys import KeyStore
from meterflow.dashboard.format import json_script, money, number, size
from meterflow.dashboard.sessions import Sessions
from meterflow.metrics import HISTORY_MINUTES, Metrics
from meterflow.records import Records
from meterflow.records.tables import dashboard_sessions


async def test_a_session_is_read_back_until_it_expires_or_is_ended(records: Records) -> None:
    sessions = Sessions(records, lifetime_s=3600)
    token, session = await sessions.start("abcdefghijkl", now=1_000_000)
    assert await sessions.read(token, now=1_000_000) == session
    assert await sessions.read(token, now=1_000_000 + 3600_000 - 1) == session
    assert await sessions.read(token, now=1_000_000 + 3600_000) is None  # expired
    assert await sessions.read(token[:-1] + ("A" if token[-1] != "A" else "B"), now=1_000_000) is None
    assert await sessions.read("garbage", now=1_000_000) is None
    assert session.csrf_ok(session.csrf) and not session.csrf_ok("") and session.csrf != token
    other_token, other = await sessions.start("abcdefghijkl", now=1_000_000)
    assert other_token != token and not session.csrf_ok(other.csrf)
    await sessions.end(session)  # sign-out: the same token no longer works, the key's other session does
    assert await sessions.read(token, now=1_000_000) is None
    assert await sessions.read(other_token, now=1_000_000) == other


async def test_the_database_holds_only_a_hash_and_drops_expired_sessions(records: Records) -> None:
    sessions = Sessions(records, lifetime_s=60)
    token, _ = await sessions.start("abcdefghijkl", now=1_000_000)
    await sessions.start("abcdefghijkl", now=1_000_000 + 60_000)  # the first one has expired: dropped
    async with records.connect() as conn:
        rows = (await conn.execute(sa.select(dashboard_sessions))).mappings().all()
    assert len(rows) == 1 and token not in str(dict(rows[0]))


async def test_a_revoked_key_marks_its_sessions(records: Records) -> None:
    keys = KeyStore(records)
    key, _ = await keys.create("read", "dashboard")
    sessions = Sessions(records, lifetime_s=3600)
    token, _ = await sessions.start(key["id"])
    found = await sessions.read(token)
    assert found is not None and not found.key_revoked
    assert await keys.revoke(key["id"])
    found = await sessions.read(token)  # no key cache in between: at once, on every worker
    assert found is not None and found.key_revoked


def test_events_are_counted_per_minute_and_old_minutes_dropped() -> None:
    now = [600_000.0]
    m = Metrics(clock=lambda: now[0])
    m.inc("meterflow_events_accepted_total", 5)
    m.inc("meterflow_events_failed_total", 2, reason="invalid_json")
    now[0] += 60
    m.inc("meterflow_events_duplicate_total", 3)
    last = m.per_minute(2)
    assert last == [(600_000 * 1000, [5, 0, 2]), (600_060 * 1000, [0, 3, 0])]
    now[0] += 60 * HISTORY_MINUTES
    m.inc("meterflow_events_accepted_total", 1)
    assert len(m._minutes) == 1  # the old minutes are gone
    assert sum(row[0] for _, row in m.per_minute(HISTORY_MINUTES)) == 1


def test_flush_latency_quantiles_from_the_latest_samples() -> None:
    m = Metrics()
    assert m.quantile("meterflow_flush_seconds", 0.5) is None
    for i in range(1, 101):
        m.observe("meterflow_flush_seconds", i / 1000)
    assert m.quantile("meterflow_flush_seconds", 0.5) == 0.05
    assert m.quantile("meterflow_flush_seconds", 0.99) == 0.099


def test_numbers_are_written_for_people() -> None:
    assert number(1234567) == "1,234,567"
    assert number(Decimal("-98765432109876543210.123456789")) == "-98,765,432,109,876,543,210.123456789"
    assert number(Decimal("0.50")) == "0.5"
    assert size(1536) == "1.5 KiB" and size(12) == "12 B"
    assert json_script({"a": "</script><b>&"}) == '{"a":"\\u003c/script\\u003e\\u003cb\\u003e\\u0026"}'


def test_numbers_and_money_of_38_significant_digits_are_written_exactly() -> None:
    """The plan rules allow Decimal128(38, 9) quantities: outside the default 28-digit context."""
    q = Decimal("12345678901234567890123456789.123456789")
    assert number(q) == "12,345,678,901,234,567,890,123,456,789.123456789"
    assert number(q, 2) == "12,345,678,901,234,567,890,123,456,789.12"
    assert money(q, "EUR") == "€12,345,678,901,234,567,890,123,456,789.123456789"
