"""The dashboard's pieces without a browser: signed sessions, the per-minute history, number formatting."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from meterflow.dashboard.format import json_script, money, number, size
from meterflow.dashboard.sessions import LIFETIME_S, Signer, load_secret
from meterflow.metrics import HISTORY_MINUTES, Metrics


def test_a_session_cookie_is_read_back_only_untampered_and_unexpired(tmp_path: Path) -> None:
    signer = Signer(load_secret(tmp_path))
    cookie, session = signer.issue("abcdefghijkl", now=1000.0)
    assert signer.read(cookie, now=1000.0 + LIFETIME_S - 1) == session
    assert signer.read(cookie, now=1000.0 + LIFETIME_S) is None
    payload, _, mac = cookie.partition(".")
    assert signer.read(payload + "." + mac[:-1] + ("0" if mac[-1] != "0" else "1"), now=1000.0) is None
    assert signer.read("garbage", now=1000.0) is None
    other, _ = Signer(b"x" * 32).issue("abcdefghijkl", now=1000.0)
    assert signer.read(other, now=1000.0) is None  # another server's secret
    assert signer.csrf_ok(session, signer.csrf(session))
    assert not signer.csrf_ok(session, "") and not signer.csrf_ok(session, signer.csrf(signer.issue("k")[1]))


def test_every_worker_reads_the_same_secret_from_the_data_dir(tmp_path: Path) -> None:
    assert load_secret(tmp_path) == load_secret(tmp_path)
    assert oct((tmp_path / "dashboard.secret").stat().st_mode & 0o777) == "0o600"


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
