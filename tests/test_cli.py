"""The command line: outputs, and one clear line with a non-zero exit for every user error."""

import json

import pytest

from cli_helpers import run


def test_census_writes_results_and_table(tmp_path, capsys, small_checkpoints):
    out = tmp_path / "census"
    code, stdout, _ = run(capsys, "census", "--model", small_checkpoints["mamba2"], "--window", "32",
                           "--max-tokens", "512", "--draws", "3", "--out", str(out), "--quiet")
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["corpus"]["tokens"] == 512 and results["model"]["arch"] == "mamba2"
    assert results["errors"] == {} and results["incomplete"] == []
    assert (out / "neurons.parquet").exists()
    assert "results:" in stdout
    assert not list(tmp_path.glob(".census.partial-*"))


@pytest.mark.parametrize("argv,message", [
    (["--model", "no-such-model"], "bundled models: tiny-mamba, tiny-mamba2, tiny-gpt"),
    (["--layers", "7"], "layer 7 out of range"),
    (["--corpus", "/nonexistent/file.txt"], "/nonexistent/file.txt"),
    (["--window", "100000"], "window"),
])
def test_user_errors_are_one_line(tmp_path, capsys, small_checkpoints, argv, message):
    argv = ["census", "--model", small_checkpoints["mamba"], *argv, "--out", str(tmp_path / "o"), "--quiet"]
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("mambascope")]
    assert len(lines) == 1 and message in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial-*"))


def test_existing_output_is_refused_unless_overwrite(tmp_path, capsys, small_checkpoints):
    out = tmp_path / "o"
    args = ["census", "--model", small_checkpoints["gpt2"], "--window", "32", "--max-tokens", "256",
            "--no-ablation", "--out", str(out), "--quiet"]
    assert run(capsys, *args)[0] == 0
    first = (out / "results.json").read_text()
    code, _, err = run(capsys, *args)
    assert code == 2 and "--overwrite" in err
    assert (out / "results.json").read_text() == first
    code, _, _ = run(capsys, *args, "--overwrite")
    assert code == 0 and (out / "results.json").exists() and (out / ".mambascope").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no staging, old copy or lock left behind


def test_interrupt_keeps_finished_parts(tmp_path, capsys, small_checkpoints, monkeypatch):
    import mambascope.pipeline as pipeline

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "census_interventions", interrupt)
    out = tmp_path / "o"
    code, _, err = run(capsys, "census", "--model", small_checkpoints["mamba"], "--window", "32",
                        "--max-tokens", "512", "--out", str(out), "--quiet")
    assert code == 130 and "finished stages kept" in err
    results = json.loads((out / "results.json").read_text())
    assert results["layers"] and results["incomplete"] == ["interventions"]
