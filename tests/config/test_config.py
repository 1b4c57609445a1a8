"""Settings: defaults, TOML < env < flags, and one clear line for a bad setting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meterflow.config import ConfigError, load
from meterflow.metering.meters import configured_meters


def test_defaults_are_the_embedded_mode() -> None:
    s = load(env={})
    assert (s.port, s.storage, s.dedup, s.workers) == (3000, "chdb", "memory", 1)
    assert s.embedded


def test_toml_then_env_then_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "mf.toml"
    cfg.write_text(
        'port = 4000\nstorage = "clickhouse"\nflush_max_rows = 5\n'
        '[[meters]]\ncode = "gpu"\nevent_type = "compute"\naggregation = "SUM"\nproperty = "gpu_s"\n'
    )
    s = load(env={"MF_CONFIG": str(cfg), "MF_PORT": "4100"}, overrides={"workers": None})
    assert (s.port, s.storage, s.flush_max_rows) == (4100, "clickhouse", 5)
    assert [m.code for m in configured_meters(s)] == ["gpu"]
    assert [m.code for m in configured_meters(load(env={}))] == ["api_calls", "bandwidth", "storage_peak", "compute_time"]
    assert load(env={"MF_CONFIG": str(cfg)}, overrides={"port": 4200}).port == 4200


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"MF_PORT": "abc"}, "MF_PORT must be an integer"),
        ({"MF_PORT": "70000"}, "MF_PORT must be from 1 to 65535"),
        ({"MF_STORAGE": "postgres"}, "MF_STORAGE must be one of chdb, clickhouse"),
        ({"MF_PROT": "1"}, "MF_PROT is not a MeterFlow setting"),
        ({"MF_WORKERS": "2"}, "use MF_WORKERS=1"),
        ({"MF_FLUSH_MAX_ROWS": "0"}, "MF_FLUSH_MAX_ROWS must be a positive integer"),
        ({"MF_REDIS_URL": "localhost"}, "MF_REDIS_URL is not a URL"),
        ({"MF_CONFIG": "/nonexistent.toml"}, "does not exist"),
        ({"MF_DEDUP_WINDOW_S": "60"}, "MF_DEDUP_WINDOW_S must cover"),
        ({"MF_ADMIN_KEY": "hunter2"}, "MF_ADMIN_KEY must look like"),
    ],
)
def test_bad_settings_name_themselves(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(env=env)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_meter_in_toml_names_it(tmp_path: Path) -> None:
    cfg = tmp_path / "mf.toml"
    cfg.write_text('[[meters]]\ncode = "x"\nevent_type = "e"\naggregation = "MEDIAN"\n')
    with pytest.raises(ConfigError) as e:
        configured_meters(load(env={"MF_CONFIG": str(cfg)}))
    assert "meters[0].aggregation" in str(e.value)


def test_serve_fails_at_start_with_one_line() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "meterflow.cli", "serve"],
        env={"MF_PORT": "not-a-port", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == "meterflow: MF_PORT must be an integer, got 'not-a-port'."
