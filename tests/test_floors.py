"""The package's floors: a module imports only from its own package or from a lower floor, and no
import cycle exists between modules (issue 22). The floors are written here once, lowest first."""

from __future__ import annotations

import ast
from pathlib import Path

import meterflow

# Lowest first. A package on a floor may import any package on a lower floor; two packages that
# share a floor (api and dashboard) never import each other.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("_core",),  # the Rust extension: only kernel.rust opens it
    ("kernel",),  # ids, clock, calendar, flush ids, the Rust door, errors, params, decimal text
    ("config",),  # settings only
    ("logs",),
    ("metrics",),
    ("redis",),  # the one Redis client and every connection
    ("storage",),
    ("records",),
    ("archive",),
    ("ingest",),
    ("customers",),
    ("metering",),
    ("auth",),
    ("billing",),
    ("runtime",),  # the one wiring of every process
    ("web",),  # shared by both HTTP edges
    ("api", "dashboard"),
    ("app",),  # the Starlette app: mounts api/ and dashboard/
    ("cli",),
    ("samples", ""),  # sample events for tests and benches; the package's own __init__
)
FLOOR = {name: i for i, names in enumerate(FLOORS) for name in names}
ROOT = Path(meterflow.__file__).parent


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_of(p): p for p in ROOT.rglob("*.py") if "migrations" not in p.parts}


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `module` imports (at any depth of its code, lazily or not)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t.startswith("meterflow"):
                found.add(t)
    found.discard(module)
    return found


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods) | {"meterflow._core"}
    # A module's own parent packages run first anyway; importing them is not a dependency on a floor.
    return {m: {t for t in _imports(m, p, known) if not m.startswith(t + ".") and t != "meterflow"}
            for m, p in mods.items()}  # fmt: skip


def test_every_package_has_a_floor() -> None:
    missing = sorted({_package(m) for m in _modules()} - set(FLOOR))
    assert not missing, f"packages without a floor in FLOORS: {missing}"


def test_no_import_runs_up_a_floor_or_sideways() -> None:
    wrong = []
    for module, targets in sorted(_graph().items()):
        here = _package(module)
        for target in sorted(targets):
            there = _package(target)
            if there != here and FLOOR[there] >= FLOOR[here]:
                wrong.append(f"{module} imports {target} ({there!r} is not below {here!r})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the path, 2 done
    cycles: list[str] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(" -> ".join([*path[path.index(t):], t]))
            elif t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The walk finds imports: config importing billing would be reported (a test that can fail)."""
    probe = tmp_path / "probe.py"
    probe.write_text("from meterflow.billing.plans import Plan\ndef f():\n    from meterflow.runtime import started\n")
    found = _imports("meterflow.config", probe, set(_modules()))
    assert {"meterflow.billing.plans", "meterflow.runtime"} <= found


def test_every_package_says_what_it_owns_and_what_it_does_not() -> None:
    silent = []
    for init in sorted(ROOT.glob("*/__init__.py")):
        if "migrations" in init.parts:
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        if "Owns" not in doc or "not own" not in doc:
            silent.append(init.parent.name)
    assert not silent, f"packages whose docstring does not say what they own and do not own: {silent}"
