"""README's example of the books after the fact, run as written against the server it names."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.harness.backends import Backend
from tests.harness.meterflow import TEST_ADMIN_KEY, MeterFlowServer
from tests.harness.processes import ROOT

README = ROOT / "README.md"


def example() -> tuple[str, dict[str, str]]:
    """The shell block after "An example that runs as written", and the settings its first comment names."""
    text = README.read_text()
    block = text[text.index("**An example that runs as written.**"):]
    code = block[block.index("```sh\n") + 6:]
    code = code[: code.index("```")]
    settings = dict(re.findall(r"(MF_[A-Z_]+)=(\S+)", code.split("make run")[0]))
    return code, settings


def test_the_books_example_runs_as_written_and_answers_what_it_says(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer], tmp_path: Path
) -> None:
    code, settings = example()
    assert settings["MF_INVOICE_CLOSE_INTERVAL_S"] == "2"
    server = start_server(make_backend("embedded"), **settings)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "admin.key").write_text(TEST_ADMIN_KEY)
    script = "set -euo pipefail\n" + code.replace("http://127.0.0.1:3000", server.url)
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # Each comment that shows an answer (a JSON object or a Python tuple) is the line the command printed.
    shown = [ln[2:] for ln in code.splitlines() if ln.startswith(("# {", "# ("))]
    year = str(dt.datetime.now(dt.UTC).year)
    assert out.stdout.splitlines() == [s.replace("2026", year) for s in shown]
