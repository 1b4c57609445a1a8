"""The benchmark regression guard: same-run ratios against a kept baseline (benches/compare.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.processes import ROOT

FIXTURES = Path(__file__).parent / "fixtures" / "bench"
COMPARE = ROOT / "benches" / "compare.py"


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(COMPARE), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def check(new: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run("check", str(FIXTURES / new), "--baseline", str(FIXTURES / "baseline.json"), *extra)


def test_a_ratio_that_fell_30_percent_fails_the_compare() -> None:
    out = check("regressed_30pct.json")
    assert out.returncode == 1, out.stdout + out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("decode_1000_paired: core vs msgspec"))
    assert "-30.0%" in line and "REGRESSION" in line
    assert "fell by more than 15%" in out.stderr


def test_a_ratio_within_tolerance_passes() -> None:
    out = check("within_5pct.json")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "REGRESSION" not in out.stdout and "-5.0%" in out.stdout


def test_the_same_run_compared_with_itself_passes() -> None:
    out = check("baseline.json")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "dedup_1000_paired: core_resp vs redis-benchmark" in out.stdout


def test_the_tolerance_is_a_setting() -> None:
    assert check("regressed_30pct.json", "--tolerance", "0.35").returncode == 0
    assert check("within_5pct.json", "--tolerance", "0.03").returncode == 1


def test_a_ratio_missing_from_the_new_run_is_a_regression(tmp_path: Path) -> None:
    doc = json.loads((FIXTURES / "baseline.json").read_text())
    doc["benchmarks"] = [b for b in doc["benchmarks"] if b["group"] != "dedup_1000_paired"]
    new = tmp_path / "new.json"
    new.write_text(json.dumps(doc))
    out = run("check", str(new), "--baseline", str(FIXTURES / "baseline.json"))
    assert out.returncode == 1
    assert "missing" in out.stdout


def test_without_a_baseline_the_compare_says_how_to_make_one(tmp_path: Path) -> None:
    out = run("check", str(FIXTURES / "baseline.json"), cwd=tmp_path)
    assert out.returncode == 2
    assert "make bench-baseline" in out.stderr


@pytest.mark.parametrize("n_runs", [1, 3])
def test_baseline_keeps_the_newest_saved_run(tmp_path: Path, n_runs: int) -> None:
    machine = tmp_path / ".benchmarks" / "Linux-CPython-3.11-64bit"
    machine.mkdir(parents=True)
    for i in range(1, n_runs + 1):
        doc = json.loads((FIXTURES / "baseline.json").read_text())
        doc["commit_info"]["id"] = f"run{i}"
        (machine / f"{i:04d}_run{i}_20261125_000000.json").write_text(json.dumps(doc))
    out = run("baseline", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    kept = json.loads((tmp_path / ".benchmarks" / "baseline.json").read_text())
    assert kept["commit_info"]["id"] == f"run{n_runs}"
    assert "2 same-run ratios" in out.stdout


def test_the_fixtures_are_pytest_benchmark_runs() -> None:
    """The fixtures were saved by `--benchmark-autosave` (then one ratio scaled): same shape as a real run."""
    for f in FIXTURES.glob("*.json"):
        doc = json.loads(f.read_text())
        assert {"machine_info", "commit_info", "benchmarks", "version"} <= doc.keys()
