"""Real processes killed by real signals at stage boundaries and inside the final swap (docs/design.md §13).

Whatever the signal and the moment, the destination holds no less than it did before, and a finished stage
is never lost: SIGINT and SIGTERM exit 130 keeping the finished stages; SIGKILL leaves them in the staging
folder, which the next run reports (and puts back an output caught in the middle of its swap).  A run started
with SIGINT ignored (a background job, nohup) keeps ignoring it; SIGTERM still ends it.

Every child is started with its SIGINT disposition set here, never inherited from whatever runs pytest: a
parent that ignores SIGINT (a background job of a non-interactive shell, some CI runners) passes SIG_IGN on
through exec, and ``subprocess``'s ``restore_signals`` does not reset it.  ``.ci/run`` runs this file a second
time with SIGINT ignored to keep it so.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mambascope.results.outputs import MARKER, OutputDir

RUNNER = Path(__file__).with_name("signal_runner.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Part of the built-in validation split as a text file (reading it is much faster than building it)."""
    from mambascope.data import load_corpus

    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(load_corpus("builtin", "validation").texts[:200]))
    return path


@pytest.fixture
def census_args(small_checkpoints, corpus):
    def args(out: Path, *extra: str) -> list[str]:
        return ["census", "--model", small_checkpoints["gpt2"], "--corpus", str(corpus), "--window", "32",
                "--max-tokens", "512", "--draws", "3", "--no-report", "--quiet", "--out", str(out), *extra]
    return args


def killed_run(signal_name: str, point: str, argv: list[str],
               sigint: signal.Handlers = signal.SIG_DFL) -> subprocess.CompletedProcess:
    """The CLI in a child that sends itself ``signal_name`` (``A+B``: both, in that order) at ``point``;
    ``sigint``: the SIGINT disposition the child starts with (SIG_DFL: Python installs its Ctrl-C handler)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run([sys.executable, str(RUNNER), signal_name, point, "--", *argv], capture_output=True,
                          text=True, env=env, timeout=300, preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def previous(tmp_path_factory, small_checkpoints):
    """A complete earlier output (census only), copied by each test that reruns over it."""
    from mambascope.cli import main

    path = tmp_path_factory.mktemp("previous") / "out"
    argv = ["census", "--model", small_checkpoints["gpt2"], "--window", "32", "--max-tokens", "256",
            "--no-ablation", "--no-report", "--quiet", "--out", str(path)]
    assert main(argv) == 0
    return path


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_interrupt_at_a_stage_boundary_keeps_the_finished_stage(tmp_path, census_args, signal_name):
    out = tmp_path / "out"
    run = killed_run(signal_name, "save:1", census_args(out))
    assert run.returncode == 130, run.stderr
    assert "Traceback" not in run.stderr and "finished stages kept" in run.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["layers"] and results["incomplete"] == ["interventions"]
    assert (out / "neurons.parquet").is_file()  # the finished census's table too
    assert json.loads((out / MARKER).read_text())["status"] == "incomplete"
    assert leftovers(tmp_path) == []  # no staging folder, no lock


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_interrupting_an_overwrite_keeps_the_old_output(tmp_path, census_args, previous, signal_name):
    out = tmp_path / "out"
    shutil.copytree(previous, out)
    before = snapshot(out)
    run = killed_run(signal_name, "save:1", census_args(out, "--overwrite"))
    assert run.returncode == 130, run.stderr
    assert snapshot(out) == before
    (staging,) = tmp_path.glob(".out.partial-*")
    assert str(staging / "results.json") in run.stderr
    assert json.loads((staging / "results.json").read_text())["incomplete"] == ["interventions"]


def test_sigterm_while_loading_leaves_nothing(tmp_path, census_args):
    run = killed_run("SIGTERM", "load", census_args(tmp_path / "out"))
    assert run.returncode == 130, run.stderr
    assert "interrupted" in run.stderr and "Traceback" not in run.stderr
    assert list(tmp_path.iterdir()) == []


def test_sigkill_at_a_stage_boundary_then_the_next_run(tmp_path, census_args, previous):
    out = tmp_path / "out"
    shutil.copytree(previous, out)
    before = snapshot(out)
    run = killed_run("SIGKILL", "save:1", census_args(out, "--overwrite"))
    assert run.returncode == -9
    assert snapshot(out) == before
    (staging,) = tmp_path.glob(".out.partial-*")
    notices = []
    with OutputDir(out, overwrite=True, notice=notices.append):  # the next run: the kill's lock is gone
        pass
    assert staging.exists() and any("kept" in n and str(staging) in n for n in notices)
    assert snapshot(out) == before


def test_sigkill_inside_the_swap_is_undone_by_the_next_run(tmp_path, census_args, previous):
    out = tmp_path / "out"
    shutil.copytree(previous, out)
    before = snapshot(out)
    run = killed_run("SIGKILL", "swap", census_args(out, "--overwrite"))
    assert run.returncode == -9
    assert not out.exists() and list(tmp_path.glob(".out.old-*"))  # killed between the two renames
    notices = []
    with OutputDir(out, overwrite=True, notice=notices.append):
        pass
    assert any("restored" in n for n in notices)
    assert snapshot(out) == before and not list(tmp_path.glob(".out.old-*"))


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_an_interrupt_inside_the_swap_waits_for_it(tmp_path, census_args, previous, signal_name):
    out = tmp_path / "out"
    shutil.copytree(previous, out)
    run = killed_run(signal_name, "swap", census_args(out, "--overwrite"))
    assert run.returncode == 130, run.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["incomplete"] == [] and results["ablation"] is not None  # the new, complete output
    assert json.loads((out / MARKER).read_text())["status"] == "complete"
    assert leftovers(tmp_path) == []


def test_a_run_started_with_sigint_ignored_keeps_ignoring_it(tmp_path, census_args):
    """POSIX: a background job's ignored SIGINT stays ignored (docs/design.md §13); the run completes."""
    out = tmp_path / "out"
    run = killed_run("SIGINT", "save:1", census_args(out), sigint=signal.SIG_IGN)
    assert run.returncode == 0, run.stderr
    assert json.loads((out / "results.json").read_text())["incomplete"] == []
    assert json.loads((out / MARKER).read_text())["status"] == "complete"


def test_sigterm_still_ends_a_run_started_with_sigint_ignored(tmp_path, census_args):
    out = tmp_path / "out"
    run = killed_run("SIGTERM", "save:1", census_args(out), sigint=signal.SIG_IGN)
    assert run.returncode == 130, run.stderr
    assert "finished stages kept" in run.stderr
    assert json.loads((out / "results.json").read_text())["incomplete"] == ["interventions"]


def test_an_ignored_sigint_inside_the_swap_does_not_hide_a_sigterm(tmp_path, census_args, previous):
    """Both arrive while the swap holds them: the ignored SIGINT is dropped, the SIGTERM still ends the run."""
    out = tmp_path / "out"
    shutil.copytree(previous, out)
    run = killed_run("SIGINT+SIGTERM", "swap", census_args(out, "--overwrite"), sigint=signal.SIG_IGN)
    assert run.returncode == 130, run.stderr
    assert json.loads((out / "results.json").read_text())["incomplete"] == []  # the swap itself completed
    assert leftovers(tmp_path) == []


def test_a_parent_that_ignores_sigint_does_not_change_the_children(tmp_path, census_args):
    """What the CI's second run (SIGINT ignored by its shell) checks, here in every run of the suite."""
    parent = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        run = killed_run("SIGINT", "load", census_args(tmp_path / "out"))
    finally:
        signal.signal(signal.SIGINT, parent)
    assert run.returncode == 130, run.stderr
    assert "interrupted" in run.stderr and list(tmp_path.iterdir()) == []
