"""The same-run ratios of a pytest-benchmark JSON run: each is how many times our path beats its baseline.

A ratio compares two measurements taken in the same run on the same machine, so
it survives a noisy, shared machine far better than an absolute median does;
`benches/compare.py` guards them against a kept baseline run.

A bench joins in one of two ways. Best, it times both sides in alternation
(`benches/paired.py`) and puts the result in `extra_info["paired_ratio"]` with
a name in `extra_info["pair"]`. Or it marks its two sides in `extra_info["role"]`:
`"ours"` and `"baseline"` in the same group (the ratio is the baseline's fastest
round over ours: the minimum is the round least disturbed by other processes). """

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Run = Mapping[str, Any]


def _by_group(run: Run) -> dict[str, list[Mapping[str, Any]]]:
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for b in run.get("benchmarks", []):
        groups.setdefault(b.get("group") or "", []).append(b)
    return groups


def _role_ratios(groups: Mapping[str, list[Mapping[str, Any]]]) -> dict[str, float]:
    """`<group>: <ours> vs <baseline>` = baseline min / our min, for each baseline in the group."""
    out: dict[str, float] = {}
    for group, benches in groups.items():
        ours = [b for b in benches if b.get("extra_info", {}).get("role") == "ours"]
        bases = [b for b in benches if b.get("extra_info", {}).get("role") == "baseline"]
        for o in ours:
            for base in bases:
                name = f"{group}: {_label(o)} vs {_label(base)}"
                out[name] = base["stats"]["min"] / o["stats"]["min"]
    return out


def _label(b: Mapping[str, Any]) -> str:
    return str(b.get("param") or b["name"].removeprefix("test_"))


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
    return {**_paired(groups), **_role_ratios(groups)}
