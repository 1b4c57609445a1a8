"""The same-run ratios of a pytest-benchmark JSON run: each is how many times our path beats its baseline.

A ratio compares two measurements taken in the same run on the same machine, so
it survives a noisy, shared machine far better than an absolute median does;
`benches/compare.py` guards them against a kept baseline run.

A bench joins by timing both sides in alternation (`benches/paired.py`) and
putting the result in `extra_info["paired_ratio"]`, with a name in
`extra_info["pair"]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Run = Mapping[str, Any]


def _by_group(run: Run) -> dict[str, list[Mapping[str, Any]]]:
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for b in run.get("benchmarks", []):
        groups.setdefault(b.get("group") or "", []).append(b)
    return groups


def _paired(groups: Mapping[str, list[Mapping[str, Any]]]) -> dict[str, float]:
    return {
        f"{group}: {b['extra_info']['pair']}": float(b["extra_info"]["paired_ratio"])
        for group, benches in groups.items()
        for b in benches
        if "paired_ratio" in b.get("extra_info", {})
    }


def ratios(run: Run) -> dict[str, float]:
    """Every same-run ratio the run holds, by a stable name; higher is better for each."""
    groups = _by_group(run)
    return _paired(groups)
