"""Benchmark regression runs: keep a baseline run, compare a new run's same-run ratios with it.

    python benches/compare.py baseline [RUN.json]        # mark a saved run (default: the newest) as the baseline
    python benches/compare.py check NEW.json [--tolerance 0.15] [--baseline FILE]

`check` prints each ratio of the baseline beside the new run's and exits 1 when
any fell by more than the tolerance (a fraction of the baseline's ratio), or
when a ratio of the baseline is missing from the new run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ratios import ratios

STORAGE = Path(".benchmarks")
BASELINE = STORAGE / "baseline.json"
# The saved run's number, for pytest-benchmark's own `--benchmark-compare=NNNN`.
BASELINE_ID = STORAGE / "baseline.id"
DEFAULT_TOLERANCE = 0.15


@dataclass(frozen=True)
class Row:
    name: str
    baseline: float
    new: float | None

    @property
    def change(self) -> float | None:
        return None if self.new is None else self.new / self.baseline - 1

    def regressed(self, tolerance: float) -> bool:
        return self.change is None or self.change < -tolerance


def compare(baseline: dict[str, object], new: dict[str, object]) -> list[Row]:
    old_r, new_r = ratios(baseline), ratios(new)
    return [Row(name, value, new_r.get(name)) for name, value in sorted(old_r.items())]


def render(rows: list[Row], tolerance: float) -> str:
    width = max((len(r.name) for r in rows), default=10)
    lines = [f"{'same-run ratio':{width}s}  {'baseline':>9s}  {'this run':>9s}  {'change':>8s}",
             f"{'':-<{width}}  {'':->9}  {'':->9}  {'':->8}"]  # fmt: skip
    for r in rows:
        new = "missing" if r.new is None else f"{r.new:8.2f}x"
        change = "" if r.change is None else f"{r.change:+8.1%}"
        verdict = "  REGRESSION" if r.regressed(tolerance) else ""
        lines.append(f"{r.name:{width}s}  {r.baseline:8.2f}x  {new:>9s}  {change:>8s}{verdict}")
    return "\n".join(lines)


def newest_saved_run(storage: Path = STORAGE) -> Path:
    """The newest run pytest-benchmark saved (`--benchmark-autosave`): runs are numbered 0001_, 0002_, ..."""
    runs = sorted(storage.glob("*/[0-9][0-9][0-9][0-9]_*.json"), key=lambda p: p.name)
    if not runs:
        raise SystemExit("no saved benchmark run under .benchmarks/: run `make bench` first")
    return runs[-1]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="benches/compare.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("baseline", help="keep a saved run as the baseline")
    b.add_argument("run", nargs="?", type=Path, help="a saved run's JSON (default: the newest)")
    c = sub.add_parser("check", help="compare a run's ratios with the baseline's")
    c.add_argument("new", type=Path)
    c.add_argument("--baseline", type=Path, default=BASELINE)
    c.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="allowed fall, as a fraction")
    args = p.parse_args(argv)
    if args.cmd == "baseline":
        src = args.run or newest_saved_run()
        STORAGE.mkdir(exist_ok=True)
        shutil.copyfile(src, BASELINE)
        BASELINE_ID.write_text(src.name.split("_", 1)[0] + "\n")
        found = ratios(json.loads(BASELINE.read_text()))
        print(f"baseline: {src} ({len(found)} same-run ratios) -> {BASELINE}")
        return 0
    if not args.baseline.exists():
        print(f"no baseline at {args.baseline}: run `make bench` then `make bench-baseline`", file=sys.stderr)
        return 2
    rows = compare(json.loads(args.baseline.read_text()), json.loads(args.new.read_text()))
    print(render(rows, args.tolerance))
    bad = [r for r in rows if r.regressed(args.tolerance)]
    if not rows:
        print("the baseline holds no same-run ratio", file=sys.stderr)
        return 2
    if bad:
        print(f"{len(bad)} ratio(s) fell by more than {args.tolerance:.0%}: a regression", file=sys.stderr)
        return 1
    print(f"no ratio fell by more than {args.tolerance:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
