"""Bad input and faults against the CLI and the public API (docs/design.md §13).

Each case asserts the exit code (0 ok, 1 a stage failed, 2 bad input, 130 interrupted), that the user sees one
line naming the cause, and that nothing was lost or left behind.  Signals with real processes are in
test_signals.py.
"""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

import cli_helpers
from cli_helpers import run
from mambascope.cli import main

FAST = ["--window", "32", "--max-tokens", "256", "--no-ablation", "--no-report", "--quiet"]


def one_line(err: str, *needles: str) -> str:
    """The single mambascope error (or failure) line of ``err``, checked to name each of ``needles``."""
    return cli_helpers.one_line(err, *needles, prefixes=("mambascope: error", "mambascope: failed"))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_output(tmp_path_factory, small_checkpoints):
    """A complete census output of the small GPT-2 checkpoint, made once; tests copy it."""
    path = tmp_path_factory.mktemp("done") / "out"
    assert main(["census", "--model", small_checkpoints["gpt2"], *FAST, "--out", str(path)]) == 0
    return path


@pytest.fixture
def old_output(tmp_path, finished_output):
    path = tmp_path / "out"
    shutil.copytree(finished_output, path)
    return path


def census(small_checkpoints, out, *extra, arch="gpt2"):
    return ["census", "--model", small_checkpoints[arch], *FAST, "--out", out, *extra]


# -- flags: refused in milliseconds, before any model, corpus or output is touched --------------------------

FLAG_CASES = [
    (["census", "--window", "1"], "--window"),
    (["census", "--window", "0"], "--window"),
    (["census", "--batch-size", "0"], "--batch-size"),
    (["census", "--max-tokens", "-5"], "--max-tokens"),
    (["census", "--max-tokens", "100", "--window", "128"], "--max-tokens"),
    (["census", "--draws", "0"], "--draws"),
    (["census", "--draws", "2"], "--draws"),
    (["census", "--heldout-fraction", "0"], "--heldout-fraction"),
    (["census", "--heldout-fraction", "1.5"], "--heldout-fraction"),
    (["census", "--layers", "-1"], "--layers"),
    (["analyze", "--attention-layers", "-2"], "--attention-layers"),
    (["analyze", "--methods", "bogus_method"], "bogus_method"),
    (["attention", "--methods", "rollout", "nope"], "nope"),
    (["analyze", "--whole-model-methods", "lrp", "saliency"], "--whole-model-methods"),
    (["attention", "--whole-model-methods", "block"], "--whole-model-methods"),
    (["analyze", "--whole-model-methods", "none", "lrp"], "--whole-model-methods none"),
    (["analyze", "--token-windows", "1"], "--token-windows"),
    (["attention", "--task", "mqar", "--token-windows", "16"], "--token-windows"),
    (["census", "--split", "test"], "--split"),
    (["census", "--device", "tpu"], "tpu"),
    (["census", "--device", "cuda:7"], "cuda"),
    (["census", "--dtype", "int8"], "--dtype"),
    (["census", "--window", "ten"], "--window"),
    (["census", "--bogus-flag"], "--bogus-flag"),
    (["frobnicate"], "frobnicate"),
    (["train-tiny", "--arch", "mamba"], "--out"),
    (["train-tiny", "--arch", "rwkv", "--out", "x"], "--arch"),
    (["train-tiny", "--arch", "mamba", "--out", "x", "--threads", "0"], "--threads"),
    (["train-tiny", "--arch", "mamba", "--out", "x", "--steps", "0"], "--steps"),
    (["train-tiny", "--arch", "mamba", "--out", "x", "--seq-len", "1"], "--seq-len"),
    (["train-tiny", "--arch", "mamba", "--out", "x", "--lr", "0"], "--lr"),
    (["compare", "--window", "1"], "--window"),
    # every float flag is finite (float() reads nan and inf; nan passes every range check after it)
    (["census", "--memory-budget", "nan"], "--memory-budget"),
    (["census", "--memory-budget", "inf"], "--memory-budget"),
    (["census", "--heldout-fraction", "nan"], "--heldout-fraction"),
    (["census", "--checkpoint-every", "nans"], "--checkpoint-every"),
    (["census", "--checkpoint-every", "1e999s"], "--checkpoint-every"),
    (["train-tiny", "--arch", "mamba", "--out", "x", "--lr", "nan"], "--lr"),
    (["train-tiny", "--arch", "mamba", "--out", "x", "--task", "mqar", "--weight-decay", "nan"], "--weight-decay"),
    (["train-tiny", "--arch", "mamba", "--out", "x", "--task", "mqar", "--shape", "initializer_range=nan"],
     "--shape"),
    (["patch", "--clean", "The cat", "--target", " sat", "--noise-subject", "cat", "--noise-scale", "nan"],
     "--noise-scale"),
    (["patch", "--clean", "The cat", "--target", " sat", "--noise-subject", "cat", "--noise-scale", "inf"],
     "--noise-scale"),
    # sparse dictionary features (docs/features.md): the directory and the pairings, before the model loads
    (["census", "--dictionary", "no-such-dictionary"], "--dictionary no-such-dictionary"),
    (["census", "--dictionary", "d", "--stream"], "--stream"),
    (["census", "--detector-precision", "1"], "--detector-precision"),
    (["patch", "--clean", "The cat", "--corrupt", "The dog", "--target", " sat", "--units", "features"],
     "--dictionary"),
    (["patch", "--clean", "The cat", "--corrupt", "The dog", "--target", " sat", "--features", "3"], "--features"),
    # flags that were ignored or changed without a word
    (["train-tiny", "--arch", "mamba", "--out", "x", "--shape", "hidden_size=64"], "--shape"),
    (["train-tiny", "--arch", "mamba", "--out", "x", "--stop-at", "0.9"], "--stop-at"),
    (["train-tiny", "--arch", "mamba", "--out", "x", "--task", "mqar", "--stop-at", "1.5"], "--stop-at"),
    (["train-tiny", "--arch", "mamba", "--out", "x", "--task", "mqar", "--eval-every", "0"], "--eval-every"),
    (["train-tiny", "--arch", "mamba", "--out", "x", "--min-pairs", "2"], "--min-pairs"),
    (["train-tiny", "--arch", "mamba", "--out", "x", "--task", "mqar", "--warmup", "-3"], "--warmup"),
    # found only after the work: --task's bootstrap needs two queries; a later model's length limit
    (["attention", "--task", "mqar", "--model", "tiny-gpt-mqar", "--queries", "1"], "--queries"),
    (["compare", "--models", "tiny-mamba", "tiny-gpt", "--window", "200"], "--window 200 exceeds the maximum length "
     "of tiny-gpt, 128"),
]


@pytest.mark.parametrize("argv,flag", FLAG_CASES, ids=[" ".join(a) for a, _ in FLAG_CASES])
def test_bad_flags_fail_before_any_work(tmp_path, monkeypatch, capsys, argv, flag):
    if "cuda" in " ".join(argv):
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    import mambascope.compare
    import mambascope.models

    def no_model(*args, **kwargs):
        raise AssertionError("a flag error must be found before any model loads")

    for module in (mambascope.models, mambascope.compare):
        monkeypatch.setattr(module, "load_model", no_model)
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert code == 2
    one_line(err, flag)
    assert list(tmp_path.iterdir()) == []  # no output, staging folder or lock


# -- flags that need the model: checked right after loading, before the corpus is tokenized -----------------

@pytest.mark.parametrize("argv,flag", [
    (["--layers", "7"], "--layers: layer 7 out of range"),
    (["--layers", "0", "2"], "--layers: layer 2"),
    (["--window", "200"], "--window 200 exceeds"),
], ids=["layer-7", "layer-2-of-2", "window-over-n_positions"])
def test_model_dependent_flags(tmp_path, capsys, small_checkpoints, argv, flag):
    args = census(small_checkpoints, tmp_path / "o")
    code, _, err = run(capsys, *args, *argv)
    assert code == 2
    one_line(err, flag)
    assert list(tmp_path.iterdir()) == []


def test_attention_layers_out_of_range(tmp_path, capsys, small_checkpoints):
    code, _, err = run(capsys, "analyze", "--model", small_checkpoints["mamba"], "--attention-layers", "7",
                       "--out", tmp_path / "o", "--quiet")
    assert code == 2
    one_line(err, "--attention-layers")
    assert list(tmp_path.iterdir()) == []


# -- output paths --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", [".", "..", "/", "~"])
def test_overwrite_refuses_safe_places(tmp_path, monkeypatch, capsys, small_checkpoints, where):
    home = tmp_path / "home"
    work = home / "project"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("precious")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    code, _, err = run(capsys, *census(small_checkpoints, where, "--overwrite"))
    assert code == 2
    one_line(err, "never replaces")
    assert snapshot(tmp_path) == before


def test_overwrite_refuses_a_directory_that_is_not_a_mambascope_output(tmp_path, capsys, small_checkpoints):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"\xff\xd8 not really")
    before = snapshot(tmp_path)
    code, _, err = run(capsys, *census(small_checkpoints, out, "--overwrite"))
    assert code == 2
    one_line(err, "not a mambascope output")
    assert snapshot(tmp_path) == before


def test_existing_output_without_overwrite(tmp_path, capsys, small_checkpoints, old_output):
    before = snapshot(tmp_path)
    code, _, err = run(capsys, *census(small_checkpoints, old_output))
    assert code == 2
    one_line(err, "--overwrite")
    assert snapshot(tmp_path) == before


def test_an_empty_existing_directory_is_used(tmp_path, capsys, small_checkpoints):
    (tmp_path / "o").mkdir()
    code, _, _ = run(capsys, *census(small_checkpoints, tmp_path / "o"))
    assert code == 0 and (tmp_path / "o" / "results.json").is_file()


def test_out_is_a_file(tmp_path, capsys, small_checkpoints):
    (tmp_path / "o").write_text("a file")
    code, _, err = run(capsys, *census(small_checkpoints, tmp_path / "o", "--overwrite"))
    assert code == 2
    one_line(err, "is a file")
    assert (tmp_path / "o").read_text() == "a file"


def test_out_below_a_file(tmp_path, capsys, small_checkpoints):
    (tmp_path / "f").write_text("a file")
    code, _, err = run(capsys, *census(small_checkpoints, tmp_path / "f" / "o"))
    assert code == 2
    one_line(err, "--out")


def test_out_not_writable(capsys, small_checkpoints):
    # /sys refuses new directories even to root (CI runs as root, so chmod proves nothing there).
    code, _, err = run(capsys, *census(small_checkpoints, "/sys/mambascope-test-out"))
    assert code == 2
    one_line(err, "/sys/mambascope-test-out")


def test_out_name_too_long(tmp_path, capsys, small_checkpoints):
    code, _, err = run(capsys, *census(small_checkpoints, tmp_path / ("x" * 300)))
    assert code == 2
    one_line(err, "too long")
    assert list(tmp_path.iterdir()) == []


def test_a_second_run_on_the_same_out_fails_at_once(tmp_path, capsys, small_checkpoints, old_output):
    from mambascope.results.outputs import OutputLock

    before = snapshot(old_output)
    holder = OutputLock(old_output)  # flock is per open file: this holds it against the run below
    try:
        code, _, err = run(capsys, *census(small_checkpoints, old_output, "--overwrite"))
    finally:
        holder.release()
    assert code == 2
    one_line(err, "in use by another mambascope run", f"process {os.getpid()}")
    assert snapshot(old_output) == before


def test_overwrite_replaces_a_mambascope_output(tmp_path, capsys, small_checkpoints, old_output):
    code, _, _ = run(capsys, *census(small_checkpoints, old_output, "--overwrite", "--layers", "1"))
    assert code == 0
    assert list(json.loads((old_output / "results.json").read_text())["layers"]) == ["1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_whose_old_output_cannot_be_removed(tmp_path, capsys, small_checkpoints, old_output,
                                                      monkeypatch):
    """The old output is moved aside before the swap: a failure to delete it loses nothing."""
    import mambascope.results.outputs as outputs

    real_rmtree = shutil.rmtree

    def stubborn(path, *args, **kwargs):
        if ".old-" in str(path) and not kwargs.get("ignore_errors"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(outputs.shutil, "rmtree", stubborn)
    old = snapshot(old_output)
    code, _, err = run(capsys, *census(small_checkpoints, old_output, "--overwrite", "--layers", "1"))
    assert code == 0 and "could not be removed" in err
    assert (old_output / ".mambascope").exists() and list(json.loads(
        (old_output / "results.json").read_text())["layers"]) == ["1"]
    (moved,) = tmp_path.glob(".out.old-*")
    assert snapshot(moved) == old


def test_full_disk_keeps_the_old_output(tmp_path, capsys, small_checkpoints, old_output, monkeypatch):
    import mambascope.results as results

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(results, "write_atomic", full)
    before = snapshot(tmp_path)
    code, _, err = run(capsys, *census(small_checkpoints, old_output, "--overwrite"))
    assert code == 1
    one_line(err, "No space left on device", "results.json")
    assert snapshot(tmp_path) == before


def test_a_stage_failure_keeps_the_old_output_and_says_where_the_new_one_is(tmp_path, capsys, small_checkpoints,
                                                                              old_output, monkeypatch):
    import mambascope.pipeline as pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(pipeline, "census_interventions", broken)
    before = snapshot(old_output)
    args = ["census", "--model", small_checkpoints["gpt2"], "--window", "32", "--max-tokens", "512", "--draws", "3",
            "--no-report", "--quiet", "--out", old_output, "--overwrite"]
    code, _, _ = run(capsys, *args)
    assert code == 1  # a stage failed; the run itself completed
    results = json.loads((old_output / "results.json").read_text())
    assert "boom" in results["errors"]["interventions"] and results["layers"]
    assert snapshot(old_output) != before and not list(tmp_path.glob(".out.*"))


def test_stranded_folders_are_reported_and_cleared(tmp_path, capsys, small_checkpoints, old_output):
    empty = tmp_path / ".out.partial-999999"
    empty.mkdir()
    (empty / ".mambascope").write_text("{}")
    finished = tmp_path / ".out.partial-999998"
    finished.mkdir()
    (finished / "results.json").write_text("{}")
    code, _, err = run(capsys, *census(small_checkpoints, old_output, "--overwrite"))
    assert code == 0
    assert not empty.exists() and "removed" in err and str(empty) in err
    assert finished.exists() and "kept" in err  # finished stages are never deleted for tidiness


def test_an_output_lost_in_the_middle_of_a_swap_is_restored(tmp_path, capsys, small_checkpoints, old_output):
    before = snapshot(old_output)
    aside = tmp_path / ".out.old-999999"
    old_output.rename(aside)  # what a run killed between its two renames leaves
    code, _, err = run(capsys, *census(small_checkpoints, old_output))
    assert code == 2 and "restored" in err  # put back, and then (no --overwrite) refused as existing
    one_line(err, "--overwrite")
    assert snapshot(old_output) == before and not aside.exists()


def test_train_tiny_refuses_an_existing_model(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    code, _, err = run(capsys, "train-tiny", "--arch", "mamba", "--out", model, "--steps", "1")
    assert code == 2
    one_line(err, "--overwrite")
    assert snapshot(model) == {"config.json": b"{}"}


def test_train_tiny_bad_tokenizer(tmp_path, capsys):
    code, _, err = run(capsys, "train-tiny", "--arch", "mamba", "--out", tmp_path / "m", "--tokenizer",
                       tmp_path / "nowhere")
    assert code == 2
    one_line(err, "--tokenizer")
    assert list(tmp_path.iterdir()) == []


# -- models ----------------------------------------------------------------------------------------------------

def _broken_checkpoint(source: str, where: Path, damage: str) -> Path:
    path = where / "ckpt"
    shutil.copytree(source, path)
    weights = path / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "garbage":
        weights.write_bytes(os.urandom(4096))
    elif damage == "no-weights":
        weights.unlink()
    elif damage == "config-not-json":
        (path / "config.json").write_text("{ not json")
    elif damage == "config-list":
        (path / "config.json").write_text("[1, 2]")
    elif damage == "wrong-shape":
        config = json.loads((path / "config.json").read_text())
        config["n_embd"] = 64
        (path / "config.json").write_text(json.dumps(config))
    elif damage == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                     "merges.txt"):
            (path / name).unlink(missing_ok=True)
    elif damage == "unsupported":
        config = json.loads((path / "config.json").read_text())
        config["model_type"] = "bert"
        (path / "config.json").write_text(json.dumps(config))
    return path


MODEL_DAMAGE = ["truncated", "empty", "garbage", "no-weights", "config-not-json", "config-list", "wrong-shape",
                "no-tokenizer", "unsupported"]


@pytest.mark.parametrize("damage", MODEL_DAMAGE)
def test_broken_checkpoints(tmp_path, capsys, small_checkpoints, damage):
    path = _broken_checkpoint(small_checkpoints["gpt2"], tmp_path, damage)
    code, _, err = run(capsys, *census(small_checkpoints, tmp_path / "o"), "--model", path)
    assert code == 2
    one_line(err, "ckpt")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o*"))


@pytest.mark.parametrize("name,needle", [
    ("tiny-mamab", "did you mean 'tiny-mamba'"),
    ("./no/such/dir", "no such directory"),
    ("someone/some-model", "offline"),
])
def test_unknown_models(tmp_path, capsys, small_checkpoints, name, needle):
    code, _, err = run(capsys, *census(small_checkpoints, tmp_path / "o"), "--model", name)
    assert code == 2
    one_line(err, needle)
    assert list(tmp_path.iterdir()) == []


# -- corpora ---------------------------------------------------------------------------------------------------

def _corpus(tmp_path: Path, kind: str) -> Path:
    files = {
        "empty": ("c.txt", b""),
        "blank": ("c.txt", b"\n\n   \n"),
        "binary": ("c.txt", os.urandom(2048) + b"\xff\xfe"),
        "latin-1": ("c.txt", "café au lait, déjà vu\n".encode("latin-1") * 50),
        "jsonl-bad-line": ("c.jsonl", b'{"text": "fine"}\n{not json\n'),
        "jsonl-no-text": ("c.jsonl", b'{"body": "x"}\n'),
        "jsonl-list": ("c.jsonl", b'[1, 2]\n'),
        "csv": ("c.csv", b"a,b\n1,2\n"),
    }
    name, data = files[kind]
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


@pytest.mark.parametrize("kind", ["empty", "blank", "binary", "latin-1", "jsonl-bad-line", "jsonl-no-text",
                                  "jsonl-list", "csv"])
def test_bad_corpora_name_the_file(tmp_path, capsys, small_checkpoints, kind):
    corpus = _corpus(tmp_path, kind)
    code, _, err = run(capsys, *census(small_checkpoints, tmp_path / "o"), "--corpus", corpus)
    assert code == 2
    one_line(err, corpus.name)
    assert sorted(p.name for p in tmp_path.iterdir()) == [corpus.name]


def test_missing_corpus_file(tmp_path, capsys, small_checkpoints):
    code, _, err = run(capsys, *census(small_checkpoints, tmp_path / "o"), "--corpus", tmp_path / "nope.txt")
    assert code == 2
    one_line(err, "nope.txt")


def test_a_users_three_document_file_is_analysed_whole(tmp_path, capsys, small_checkpoints):
    from mambascope.data import load_corpus

    builtin = load_corpus("builtin", "validation").texts
    docs = sorted(builtin, key=len)[-3:]
    (tmp_path / "mine.txt").write_text("\n\n".join(docs))
    code, _, err = run(capsys, *census(small_checkpoints, tmp_path / "o"), "--corpus", tmp_path / "mine.txt")
    assert code == 0, err
    corpus = json.loads((tmp_path / "o" / "results.json").read_text())["corpus"]
    assert corpus["split"] == "all" and corpus["texts"] == 3


def test_too_little_text_for_a_held_out_split(tmp_path, capsys, small_checkpoints):
    (tmp_path / "tiny.txt").write_text("only a handful of words")
    code, _, err = run(capsys, "census", "--model", small_checkpoints["gpt2"], "--window", "8", "--corpus",
                       tmp_path / "tiny.txt", "--out", tmp_path / "o", "--quiet")
    assert code == 2
    one_line(err, "windows")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.txt"]


# -- results files (report) ------------------------------------------------------------------------------------

@pytest.mark.parametrize("content,needle", [
    (None, "no results.json"),
    ("[1, 2, 3]", "JSON array"),
    ("null", "JSON null"),
    ("\"text\"", "JSON string"),
    ("{\"model\": {}", "not valid JSON"),
    ("{}", "lacks model, corpus, errors"),
    (b"\x89PNG\r\n\x1a\n\xff\xfe", "not a text file"),
    ("dir", "is a directory"),
])
def test_report_on_malformed_results(tmp_path, capsys, content, needle):
    target = tmp_path / "r"
    target.mkdir()
    if content == "dir":
        (target / "results.json").mkdir()
    elif isinstance(content, bytes):
        (target / "results.json").write_bytes(content)
    elif content is not None:
        (target / "results.json").write_text(content)
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "report", target)
    assert code == 2
    one_line(err, needle)
    assert snapshot(tmp_path) == before


def test_report_on_a_missing_directory(tmp_path, capsys):
    code, _, err = run(capsys, "report", tmp_path / "absent")
    assert code == 2
    one_line(err, "absent")


def test_report_rerenders_in_place(capsys, old_output):
    results = (old_output / "results.json").read_bytes()
    code, out, _ = run(capsys, "report", old_output)
    assert code == 0 and "report.html" in out
    assert (old_output / "report.html").stat().st_size > 1000 and list((old_output / "figures").glob("*.png"))
    assert (old_output / "results.json").read_bytes() == results
    assert not [p for p in old_output.iterdir() if p.name.startswith((".report-", ".figures-old"))]


# -- compare ---------------------------------------------------------------------------------------------------

def test_compare_with_a_failed_model_exits_1(tmp_path, capsys, small_checkpoints):
    broken = _broken_checkpoint(small_checkpoints["gpt2"], tmp_path, "truncated")
    code, _, err = run(capsys, "compare", "--models", small_checkpoints["mamba"], small_checkpoints["mamba2"], broken,
                       "--window", "32",
                       "--max-tokens", "256", "--out", tmp_path / "cmp", "--quiet")
    assert code == 1
    assert "FAILED" in err and "ckpt" in err
    assert (tmp_path / "cmp" / "comparison.json").is_file()


# -- the public API ---------------------------------------------------------------------------------------------

def test_api_load_results_is_checked(tmp_path):
    from mambascope.results import load_results

    (tmp_path / "results.json").write_text("[]")
    with pytest.raises(ValueError, match="JSON array"):
        load_results(tmp_path)


def test_api_output_dir_refuses_the_working_directory(tmp_path, monkeypatch):
    from mambascope.results.outputs import OutputDir

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="working directory"):
        OutputDir(".", overwrite=True)


def test_api_output_dir_leaves_nothing_when_nothing_finished(tmp_path):
    from mambascope.results.outputs import OutputDir

    with OutputDir(tmp_path / "o") as out:
        assert out.staging.is_dir()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("window", [0, -3])
def test_api_tokenize_windows_rejects_bad_windows(small_tokenizer, window):
    from mambascope.data import tokenize_windows

    with pytest.raises(ValueError, match="window"):
        tokenize_windows(["some text"], small_tokenizer, window)


def test_api_trace_rejects_out_of_vocabulary_ids(small_checkpoints):
    import torch

    from mambascope import load_model, trace

    model, _ = load_model(small_checkpoints["mamba"], device="cpu")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        trace(model, torch.tensor([[1, 2, 10_000]]))


def test_api_load_corpus_bad_split():
    from mambascope.data import load_corpus

    with pytest.raises(ValueError, match="split"):
        load_corpus("builtin", split="test")


def test_quiet_prints_nothing_on_stderr(tmp_path, capsys, small_checkpoints):
    code, out, err = run(capsys, *census(small_checkpoints, tmp_path / "o"))
    assert code == 0 and err == "" and "results:" in out


def test_debug_shows_the_traceback(tmp_path, capsys, small_checkpoints):
    code, _, err = run(capsys, *census(small_checkpoints, tmp_path / "o"), "--layers", "9", "--debug")
    assert code == 2 and "Traceback" in err and "--layers: layer 9 out of range" in err


@pytest.mark.parametrize("models,needle", [
    (["tiny-mamba"], "at least two models"),
    (["tiny-mamba", "/no/such/model"], "/no/such/model"),
    (["tiny-mamba", "tiny-gtp"], "did you mean 'tiny-gpt'"),
])
def test_compare_refuses_bad_models_before_any_work(tmp_path, capsys, models, needle):
    code, _, err = run(capsys, "compare", "--models", *models, "--out", tmp_path / "cmp", "--quiet")
    assert code == 2
    one_line(err, needle)
    assert list(tmp_path.iterdir()) == []


# -- issue 18: kept results, planted checkpoints, a full disk, report's lock --------------------------------------

def test_a_rerun_never_deletes_a_kept_staging_folder_that_has_its_pid(tmp_path):
    """PIDs repeat (PID 1 in every container): a kept .DIR.partial-<our pid> with results.json survives."""
    from mambascope.results.outputs import OutputDir

    kept = tmp_path / f".out.partial-{os.getpid()}"
    kept.mkdir()
    (kept / "results.json").write_text('{"finished": "census"}')
    notices = []
    with OutputDir(tmp_path / "out", notice=notices.append) as out:
        assert out.staging != kept and out.staging.name.startswith(f".out.partial-{os.getpid()}-")
        out.file("results.json").write_text("{}")
        out.commit()
    assert (kept / "results.json").read_text() == '{"finished": "census"}'
    assert [n for n in notices if str(kept) in n and "kept" in n]


class _Planted:
    """What an attacker could pickle: unpickling it calls open(path, "w"), which creates the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_planted_checkpoint_is_refused_unexecuted(tmp_path, capsys, small_checkpoints):
    import torch

    ran = tmp_path / "the-planted-code-ran"
    torch.save({"format": 3, "payload": _Planted(ran)}, tmp_path / ".out.checkpoint-0-of-1")
    code, _, err = run(capsys, *census(small_checkpoints, tmp_path / "out", "--resume"))
    assert code == 2 and not ran.exists()
    one_line(err, "refused", ".out.checkpoint-0-of-1", "was not run")


def test_a_full_disk_after_the_census_says_where_it_is_kept_in_one_line(tmp_path, capsys, small_checkpoints,
                                                                       old_output, monkeypatch):
    """The disk fills once the census stage is saved: the figures, report.html, the next results.json and the
    marker's temp file all fail.  One line, no traceback, naming the kept folder, whose marker says failed."""
    import pathlib

    import matplotlib.figure

    import mambascope.results as results
    import mambascope.results.outputs as outputs

    full = []

    def no_space(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    def unless_full(function):
        def call(self_or_path, *args, **kwargs):
            if full:
                no_space(self_or_path)
            return function(self_or_path, *args, **kwargs)
        return call

    save_results = results.save_results
    monkeypatch.setattr(results, "save_results", lambda *a, **k: (save_results(*a, **k), full.append(1))[0])
    monkeypatch.setattr(results, "write_atomic", unless_full(results.write_atomic))
    monkeypatch.setattr(outputs, "write_atomic", unless_full(outputs.write_atomic))
    savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda figure, path, *a, **k: no_space(path) if full else savefig(figure, path, *a, **k))
    monkeypatch.setattr(pathlib.Path, "write_text", unless_full(pathlib.Path.write_text))
    before = snapshot(old_output)
    argv = [a for a in census(small_checkpoints, old_output, "--overwrite") if a != "--no-report"]
    code, _, err = run(capsys, *argv)
    assert code == 1 and full
    (kept,) = tmp_path.glob(".out.partial-*")
    one_line(err, "No space left on device", f"{old_output} is unchanged", str(kept / "results.json"))
    assert json.loads((kept / ".mambascope").read_text())["status"] == "failed"
    assert json.loads((kept / "results.json").read_text())["layers"]
    assert snapshot(old_output) == before


@pytest.fixture
def reported_output(capsys, old_output):
    """An output with figures/ and report.html, as ``report`` writes them."""
    assert run(capsys, "report", old_output)[0] == 0
    assert list((old_output / "figures").glob("*.png"))
    return old_output


@pytest.mark.parametrize("what", ["file", "folder"])
def test_report_refuses_a_users_figures(tmp_path, capsys, old_output, what):
    """A file named figures, or a figures folder holding a file of the user's, is never hidden or replaced."""
    figures = old_output / "figures"
    if what == "file":
        figures.write_text("my notes")
    else:
        figures.mkdir()
        (figures / "notes.txt").write_text("my notes")
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "report", old_output)
    assert code == 2
    one_line(err, str(figures), "move it away")
    assert snapshot(tmp_path) == before


def test_report_restores_the_figures_of_a_report_killed_between_its_renames(capsys, reported_output):
    """What a kill between ``figures -> .figures-old-PID`` and ``scratch/figures -> figures`` leaves is put
    back (or cleared) by the next report: nothing hidden stays behind."""
    figures = reported_output / "figures"
    aside = reported_output / ".figures-old-999999"
    figures.rename(aside)
    (reported_output / ".report-killed").mkdir()
    code, _, err = run(capsys, "report", reported_output)
    assert code == 0 and f"restored {figures} from .figures-old-999999" in err
    assert "the scratch folder of a killed report" in err
    assert list(figures.glob("*.png"))
    assert not [p for p in reported_output.iterdir() if p.name.startswith((".report-", ".figures-old"))]


def test_report_holds_the_outputs_lock_before_it_reads_and_under_a_link(tmp_path, capsys, old_output, monkeypatch):
    """One lock file per output, whichever path names it: a run holding --out LINK keeps report TARGET and
    report LINK out; and report reads results.json only once it holds the lock."""
    import fcntl

    import mambascope.results as results
    from mambascope.results.outputs import OutputDir

    link, lock = tmp_path / "link", tmp_path / ".out.lock"  # the lock of the directory the link resolves to
    link.symlink_to(old_output)
    with OutputDir(link, overwrite=True):
        assert lock.is_file()
        for name in (link, old_output):
            code, _, err = run(capsys, "report", name)
            assert code == 2
            one_line(err, "in use by another mambascope run")
    assert not list(tmp_path.glob(".*.lock"))

    held = []

    def open_results(path, *args, **kwargs):
        with open(lock) as f:  # the output's lock, tried from another open file description
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(path)
        return opened(path, *args, **kwargs)

    opened = results.open_results
    monkeypatch.setattr(results, "open_results", open_results)
    assert run(capsys, "report", link)[0] == 0 and held == [link]


@pytest.mark.parametrize(("value", "message"), [("0", "--memory-budget must be a positive, finite number of GiB"),
                                              ("-1", "--memory-budget must be a positive, finite number of GiB"),
                                              ("nan", "--memory-budget: 'nan' is not a finite number"),
                                              ("inf", "--memory-budget: 'inf' is not a finite number")])
def test_a_memory_budget_that_is_not_a_positive_finite_number_is_refused_first(tmp_path, capsys, value, message):
    code, _, err = run(capsys, "census", "--memory-budget", value, "--out", tmp_path / "out")
    assert code == 2
    one_line(err, message)
    assert list(tmp_path.iterdir()) == []


# -- weak messages made exact (issue 18): each names what is wrong -------------------------------------------

def test_a_directory_named_like_a_corpus_file_is_not_reported_missing(tmp_path, capsys, small_checkpoints):
    (tmp_path / "x.txt").mkdir()
    code, _, err = run(capsys, *census(small_checkpoints, tmp_path / "o"), "--corpus", tmp_path / "x.txt")
    assert code == 2
    assert "not found" not in one_line(err, f"{tmp_path / 'x.txt'} is a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


def test_out_under_a_file_names_the_file(tmp_path, capsys, small_checkpoints):
    (tmp_path / "afile").write_text("mine")
    code, _, err = run(capsys, *census(small_checkpoints, tmp_path / "afile" / "sub"))
    assert code == 2
    one_line(err, f"{tmp_path / 'afile'} is a file, not a directory")
    assert (tmp_path / "afile").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_manifest_missing_a_key_names_the_file_and_the_key(old_output, capsys):
    manifest = old_output / "store" / "manifest.json"
    manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items() if k != "n_neurons"}))
    code, _, err = run(capsys, "report", old_output)
    assert code == 2
    one_line(err, str(manifest), "n_neurons")


def test_resume_on_a_complete_output_says_there_is_nothing_to_resume(old_output, capsys, small_checkpoints):
    before = snapshot(old_output)
    code, _, err = run(capsys, *census(small_checkpoints, old_output, "--resume"))
    assert code == 2
    line = one_line(err, "--resume", "complete output", "nothing to resume")
    assert "--overwrite" not in line
    assert snapshot(old_output) == before


def test_ctrl_c_during_the_census_keeps_nothing_and_points_to_resume(tmp_path, capsys, monkeypatch,
                                                                     small_checkpoints):
    """No stage had finished: nothing is kept and nothing is said to be; the census checkpoint is, and the
    message says how to continue from it."""
    import mambascope.scale as scale

    traced, trace_stream = [], scale.trace_stream

    def interrupted_second_batch(*args, **kwargs):
        traced.append(1)
        if len(traced) == 2:
            raise KeyboardInterrupt
        return trace_stream(*args, **kwargs)

    monkeypatch.setattr(scale, "trace_stream", interrupted_second_batch)
    out = tmp_path / "out"
    argv = ["census", "--model", small_checkpoints["gpt2"], "--window", "32", "--max-tokens", "512",
            "--batch-size", "2", "--no-report", "--quiet", "--checkpoint-every", "1", "--out", out]
    code, _, err = run(capsys, *argv)
    assert code == 130 and "finished stages kept" not in err
    assert "no stage had finished" in err and "rerun with --resume" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.checkpoint-0-of-1"]
    monkeypatch.setattr(scale, "trace_stream", trace_stream)
    code, _, err = run(capsys, *argv, "--resume")
    assert code == 0, err
    assert json.loads((out / "results.json").read_text())["incomplete"] == []


@pytest.mark.parametrize("threshold,shown", [(1, True), (10**9, False)], ids=["long", "short"])
def test_patch_estimates_a_long_run_before_it_starts_even_when_quiet(tmp_path, capsys, monkeypatch, threshold,
                                                                     shown):
    import mambascope.cli as cli
    import mambascope.interventions.prompts as prompts

    seen = []

    def stop(*args, **kwargs):  # what the user had been told when the patching would have started
        seen.append(capsys.readouterr().err)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "LONG_PATCH_RUN", threshold)
    monkeypatch.setattr(prompts, "patch_prompts", stop)
    code, _, _ = run(capsys, "patch", "--model", "tiny-mamba", "--quiet", "--clean", "The function returns the value",
                     "--corrupt", "The class returns the value", "--target", " of", "--units", "resid_pre",
                     "--batch-size", "5", "--out", tmp_path / "p")
    assert code == 130 and seen
    if shown:  # 4 layers x 5 positions, in batches of 5
        assert "20 patches (4 units x 5 positions) in 4 forward passes of up to 5: about" in seen[0], seen[0]
    else:
        assert seen[0] == ""


def test_report_does_not_call_a_census_it_cannot_read_absent(old_output, capsys):
    """A results file whose layers lack every census field (hand-edited, or another version's): the report
    says that, not that the file has no census."""
    results = json.loads((old_output / "results.json").read_text())
    results.pop("store")
    results["layers"] = {"0": {"pct_dead": 50.0, "n_dead": 3}}
    (old_output / "results.json").write_text(json.dumps(results))
    code, _, _ = run(capsys, "report", old_output)
    assert code == 0
    page = (old_output / "report.html").read_text()
    assert "has no &#39;census&#39;" not in page and "no layer with the census fields" in page
