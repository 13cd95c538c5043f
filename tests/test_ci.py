"""CI cannot pass without the browser tests: with MAMBASCOPE_REQUIRE_BROWSER=1 a missing Chromium fails them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _browser_tests(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """tests/test_browser.py in a child pytest whose PATH holds no browser."""
    child = {k: v for k, v in os.environ.items() if k != "MAMBASCOPE_REQUIRE_BROWSER"}
    child |= {"PATH": str(tmp_path), "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                                                   child.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           str(ROOT / "tests" / "test_browser.py")],
                          cwd=ROOT, env=child | env, capture_output=True, text=True, timeout=300, check=False)


def test_missing_browser_skips_locally_and_fails_when_required(tmp_path: Path) -> None:
    local = _browser_tests(tmp_path)
    assert local.returncode == 0 and "skipped" in local.stdout and "no Chromium" in local.stdout, local.stdout
    required = _browser_tests(tmp_path, MAMBASCOPE_REQUIRE_BROWSER="1")
    assert required.returncode == 1, required.stdout
    assert "MAMBASCOPE_REQUIRE_BROWSER=1 requires the browser tests to run" in required.stdout
    assert "skipped" not in required.stdout


def test_ci_script_requires_the_browser_and_runs_ruff_before_the_tests() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    lines = [line.strip() for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert "set -euo pipefail" in lines and "export MAMBASCOPE_REQUIRE_BROWSER=1" in lines
    assert not any("||" in line for line in lines), "no failure may be softened into a message"
    readme = (ROOT / "README.md").read_text()
    second = next(line for line in readme.splitlines() if line.startswith("python3 -m venv") and "[test]" in line)
    install, tests = second.rsplit(" && ", 1)  # the README's second command: install && tests
    order = [lines.index(install), lines.index(".venv/bin/ruff check src tests benchmarks"), lines.index(tests)]
    assert order == sorted(order), "install, then ruff, then the tests"
    assert lines.index("export MAMBASCOPE_REQUIRE_BROWSER=1") < order[-1]


def test_ci_script_reruns_the_machine_dependent_tests_elsewhere() -> None:
    """After the ordinary run, the CI runs the signal tests with SIGINT ignored (as a background job of a
    non-interactive shell or some CI runners start them) and the tests with rounding-sensitive comparisons on
    other ATen kernels (the other CPUs' rounding)."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    (rerun,) = [line for line in lines if line.startswith("(trap '' INT; ")]
    assert "ATEN_CPU_CAPABILITY=$cap " in rerun and rerun.endswith(".venv/bin/pytest -q tests/test_signals.py "
                                                                   "tests/test_patching.py tests/test_trace.py)")
    (cap,) = [line for line in lines if line.startswith("cap=")]
    assert lines.index(cap) < lines.index(rerun)
    assert lines.index(rerun) > lines.index("HF_HUB_OFFLINE=1 .venv/bin/pytest -q")


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_ci_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(ROOT / ".ci" / "run")], check=True)
