"""The census at scale (docs/design.md §9): killed at any point and resumed, or shared by torchrun processes,
it gives the results of one uninterrupted process.  Real processes, real signals, real torchrun."""

import math
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

from mambascope.cli import main
from mambascope.report import results_schema
from mambascope.results import load_results

RUNNER = Path(__file__).with_name("signal_runner.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error",
       "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
VOLATILE = ("timings", "processes")  # wall-clock times; how many processes ran


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from mambascope.data import load_corpus

    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(load_corpus("builtin", "validation").texts[:200]))
    return path


@pytest.fixture(scope="module")
def census_args(small_checkpoints, corpus):
    def args(out: Path, *extra: str, model: str = "mamba") -> list[str]:
        return ["census", "--model", small_checkpoints[model], "--corpus", str(corpus), "--window", "32",
                "--max-tokens", "640", "--batch-size", "2", "--draws", "3", "--no-report", "--quiet",
                "--checkpoint-every", "2", "--device", "cpu", "--out", str(out), *extra]
    return args


@pytest.fixture(scope="module")
def reference(tmp_path_factory, census_args) -> dict:
    """One uninterrupted process."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(census_args(out)) == 0
    return load_results(out, detail=True)


def assert_same(a, b, rel: float, where: str = "results") -> None:
    """Equal structure, strings and integers; floats within ``rel`` relative (NaN equal to NaN)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            if key not in VOLATILE:
                assert_same(a[key], b[key], rel, f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, rel, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=1e-300), \
            f"{where}: {a!r} vs {b!r}"
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} vs {b!r}"


def killed_run(signal_name: str, point: str, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), signal_name, point, "--", *argv], capture_output=True,
                          text=True, env=ENV, timeout=300)


def checkpoint(out: Path) -> dict:
    from mambascope.scale import load_checkpoint

    (path,) = out.parent.glob(f".{out.name}.checkpoint-0-of-1")
    return load_checkpoint(path)


# 15 selection windows in batches of 2 = 8 batches, a checkpoint every 2 batches and one when the scan ends.
@pytest.mark.parametrize(("signal_name", "point", "position"), [
    ("SIGKILL", "batch:3", 2),        # between checkpoints: batch 3 was counted, then lost, and is redone
    ("SIGKILL", "ckpt-write:2", 2),   # inside the second checkpoint's write: the first one stands
    ("SIGKILL", "ckpt-write:1", None),  # inside the first write: no checkpoint at all, the resume starts over
    ("SIGKILL", "save:1", 8),         # the census stage is finished and saved; killed during ablation
    ("SIGTERM", "batch:5", 4),        # a polite stop: exit 130, the checkpoint kept
])
def test_killed_and_resumed_equals_uninterrupted(tmp_path, census_args, reference, signal_name, point, position):
    out = tmp_path / "out"
    run = killed_run(signal_name, point, census_args(out))
    assert run.returncode == (-9 if signal_name == "SIGKILL" else 130), run.stderr
    if position is None:
        assert not list(tmp_path.glob(".out.checkpoint-*")) and list(tmp_path.glob("..out.checkpoint-*.tmp-*"))
    else:
        assert checkpoint(out)["position"] == position
    assert main(census_args(out, "--resume")) == 0
    assert_same(reference, load_results(out, detail=True), rel=1e-12)
    assert not list(tmp_path.glob("*checkpoint*"))  # a finished run leaves no checkpoint behind


def test_resume_refuses_a_checkpoint_of_other_inputs(tmp_path, census_args, capsys):
    out = tmp_path / "out"
    assert killed_run("SIGKILL", "batch:3", census_args(out)).returncode == -9
    for extra, model, says in [(("--max-tokens", "576"), "mamba", "different corpus: tokens 640 then, 576 now"),
                               (("--layers", "1"), "mamba", "different settings: layers None then, [1] now"),
                               ((), "gpt2", "different model: arch 'mamba' then, 'gpt2' now")]:
        assert main(census_args(out, "--resume", *extra, model=model)) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(errors) == 1 and says in errors[0], errors
    assert main(census_args(out)) == 2  # neither --resume nor --overwrite: the checkpoint is not thrown away
    assert "pass --resume to continue it or --overwrite" in capsys.readouterr().err
    assert checkpoint(out)["position"] == 2


def torchrun(argv: list[str], processes: int) -> subprocess.CompletedProcess:
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", str(processes), "-m", "mambascope",
                           *argv], capture_output=True, text=True, env=ENV, timeout=600)


def test_two_gloo_processes_equal_one(tmp_path, census_args, reference):
    out = tmp_path / "out"
    run = torchrun(census_args(out), 2)
    assert run.returncode == 0, run.stderr[-3000:]
    results = load_results(out, detail=True)
    assert (reference["processes"], results["processes"]) == (1, 2)
    jsonschema.Draft202012Validator(results_schema()).validate(results)
    assert_same(reference, results, rel=1e-9)
    assert not list(tmp_path.glob("*checkpoint*"))


def test_two_processes_killed_and_resumed(tmp_path, census_args, reference):
    """Rank 0 killed mid-scan (torchrun then stops rank 1); each rank resumes its own checkpoint."""
    out = tmp_path / "out"
    argv = census_args(out)
    run = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "--no-python", sys.executable,
                          str(RUNNER), "SIGKILL", "batch:3", "--", *argv], capture_output=True, text=True, env=ENV,
                         timeout=600)
    assert run.returncode != 0
    assert {p.name for p in tmp_path.glob(".out.checkpoint-*")} <= {".out.checkpoint-0-of-2", ".out.checkpoint-1-of-2"}
    assert (tmp_path / ".out.checkpoint-0-of-2").is_file()
    assert main(census_args(out, "--resume")) == 2  # one process cannot continue the share of two
    run = torchrun(census_args(out, "--resume"), 2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same(reference, load_results(out, detail=True), rel=1e-9)


def test_a_streamed_census_killed_and_resumed(tmp_path, census_args):
    """--stream: the resume re-reads the corpus up to its checkpoint, checking it is the same, and continues."""
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert main(census_args(whole, "--stream", "--no-ablation")) == 0
    run = killed_run("SIGKILL", "batch:5", census_args(out, "--stream", "--no-ablation"))
    assert run.returncode == -9, run.stderr
    assert checkpoint(out)["position"] == 4
    assert main(census_args(out, "--stream", "--no-ablation", "--resume")) == 0
    expected, resumed = (load_results(p, detail=True) for p in (whole, out))
    assert expected["corpus"]["streamed"] and expected["corpus"]["tokens"] == 640
    jsonschema.Draft202012Validator(results_schema()).validate(resumed)
    assert_same(expected, resumed, rel=1e-12)


def fixed_resident(monkeypatch) -> None:
    """The plans of a test and of the census it runs see the same resident memory (the live one grows)."""
    monkeypatch.setattr("mambascope.scale.resident_bytes", lambda model: float(2**28))


def test_a_memory_budget_below_the_exact_tables_counts_ngrams_in_bounded_summaries(tmp_path, census_args,
                                                                                    small_checkpoints, reference,
                                                                                    capsys, monkeypatch):
    from mambascope.models import load_model
    from mambascope.scale import plan_memory

    fixed_resident(monkeypatch)

    model, _ = load_model(small_checkpoints["mamba"], device="cpu")
    exact = plan_memory(model, 2, 64, 64, tokens=640, window=32, batch_size=2, budget=2**40)
    assert exact.counters is None
    budget = (exact.peak - exact.parts["ngram_tables"] / 2) / 2**30  # half of what exact tables would take
    out = tmp_path / "out"
    assert main([*census_args(out, "--memory-budget", f"{budget:.6f}")]) == 0
    results = load_results(out, detail=True)
    assert results["census"]["approximate"] == ["layers.*.detectors.ngram_coverage.2",
                                                "layers.*.detectors.ngram_coverage.3"]
    jsonschema.Draft202012Validator(results_schema()).validate(results)
    for layer, exact_layer in reference["layers"].items():
        assert results["layers"][layer]["token_detectors"] == exact_layer["token_detectors"]
        for n in ("2", "3"):
            approx, truth = (r["layers"][layer]["detectors"]["ngram_coverage"][n] for r in (results, reference))
            assert approx["approximate"]["counters_per_neuron"] >= 16
            for t, lo, hi in zip(truth["needed"], approx["needed_lower"], approx["needed"], strict=True):
                assert t is None or (lo <= t and (hi is None or t <= hi))
    assert main(census_args(tmp_path / "small", "--memory-budget", "0.0001")) == 2
    assert "--memory-budget 0.0001 GiB is too small" in capsys.readouterr().err


def test_checkpoint_every_takes_batches_or_a_time(capsys):
    from mambascope.scale import parse_every

    assert parse_every("500") == (500, None) and parse_every("10m") == (None, 600.0)
    assert parse_every("90s") == (None, 90.0) and parse_every("1h") == (None, 3600.0)
    assert parse_every("0") == (None, None)
    for bad in ("ten", "-3", "0m", "5d"):
        with pytest.raises(ValueError, match="--checkpoint-every"):
            parse_every(bad)
    assert main(["census", "--checkpoint-every", "soon", "--out", "unused"]) == 2
    assert "--checkpoint-every 'soon'" in capsys.readouterr().err


def test_device_map_auto_traces_like_a_plain_load(small_checkpoints, capsys):
    """device_map="auto" (accelerate; on a CPU-only machine it places every module on the CPU): the traced
    logits equal those of a plain load and the model's own forward; a bad map fails in one line first."""
    pytest.importorskip("accelerate")
    from mambascope.models import load_model
    from mambascope.trace import trace_stream

    plain, _ = load_model(small_checkpoints["mamba"], device="cpu")
    mapped, _ = load_model(small_checkpoints["mamba"], device_map="auto")
    assert {p.device.type for p in mapped.parameters()} == {"cpu"}
    ids = torch.randint(0, plain.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    logits = trace_stream(mapped, ids, None)
    with torch.no_grad():
        assert torch.equal(logits, trace_stream(plain, ids, None))
        torch.testing.assert_close(logits, mapped(ids).logits, rtol=1e-5, atol=1e-5)
    for argv, says in [(("--device-map", "everywhere"), "device_map 'everywhere' is not one of auto"),
                       (("--device-map", "auto", "--device", "cpu"), "drop --device cpu")]:
        assert main(["census", *argv, "--out", "unused"]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(errors) == 1 and says in errors[0], errors


def test_the_memory_plan_gives_up_exact_tables_in_order(small_checkpoints):
    """Shrinking budgets: all exact; n >= 2 summarized; no per-token Δ table; unigrams summarized; refused."""
    from mambascope.models import load_model
    from mambascope.scale import plan_memory

    model, _ = load_model(small_checkpoints["mamba"], device="cpu")
    plan = lambda budget: plan_memory(model, 2, 64, 64, tokens=math.inf, window=32, batch_size=2,  # noqa: E731
                                      budget=budget, resident=2**20)
    exact = plan(2**40)
    assert exact.summaries is None
    fixed = sum(v for k, v in exact.parts.items() if k in ("process", "batch", "accumulators"))
    seen = []
    budget = exact.peak
    while True:
        budget *= 0.9
        try:
            p = plan(budget)
        except ValueError as exc:
            assert "too small" in str(exc) and budget < fixed + 2 * 3 * 64 * 48 * 16
            break
        assert p.peak <= budget
        seen.append((p.summaries.orders, p.summaries.delta_tokens))
    assert [s for i, s in enumerate(seen) if s not in seen[:i]] == [((2, 3), True), ((2, 3), False),
                                                                      ((1, 2, 3), False)]


def test_a_budget_below_the_exact_unigram_tables_marks_the_detectors_approximate(tmp_path, census_args,
                                                                                 small_checkpoints, reference,
                                                                                 monkeypatch):
    from mambascope.models import load_model
    from mambascope.scale import plan_memory

    fixed_resident(monkeypatch)

    model, _ = load_model(small_checkpoints["mamba"], device="cpu")
    def orders(budget: float) -> tuple[int, ...] | None:  # the summarized orders; None: refused
        try:
            p = plan_memory(model, 2, 64, 64, tokens=640, window=32, batch_size=2, budget=budget)
        except ValueError:
            return None
        return () if p.summaries is None else p.summaries.orders

    def lowest(accepted) -> float:  # the smallest budget with accepted(orders(budget)), by bisection
        lo, hi = 1.0, 2.0**40
        for _ in range(80):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if accepted(orders(mid)) else (mid, hi)
        return hi

    low = lowest(lambda o: o is not None)  # below: refused
    high = lowest(lambda o: o is not None and 1 not in o)  # from here the unigrams stay exact
    budget = (low + high) / 2  # where only summarized unigrams fit
    assert low < high and 1 in orders(budget)
    out = tmp_path / "out"
    assert main([*census_args(out, "--memory-budget", f"{budget / 2**30:.9f}")]) == 0
    results = load_results(out, detail=True)
    assert results["census"]["approximate"][:3] == ["layers.*.token_detectors", "layers.*.tokens_covered",
                                                    "detector_tokens_by_layer"]
    assert "layers.*.delta_sensitive.*.top_tokens" in results["census"]["approximate"]
    jsonschema.Draft202012Validator(results_schema()).validate(results)
    for layer, exact_layer in reference["layers"].items():
        found = {d["neuron"] for d in results["layers"][layer]["token_detectors"]}
        assert found <= {d["neuron"] for d in exact_layer["token_detectors"]}
        assert results["layers"][layer]["detectors"]["approximate"]["counters_per_neuron"] >= 16
        assert all(d["top_tokens"] is None for d in results["layers"][layer]["delta_sensitive"])


# -- the memory plan, made once (issue 18) ----------------------------------------------------------------------
RESIDENT = float(2**28)  # the resident memory the plans of these tests see (the live one differs by process)


@pytest.fixture(scope="module")
def summarized(small_checkpoints):
    """(--memory-budget in GiB as passed, a plan(resident) of the test census at that budget): a budget where
    the n >= 2 tables are summarized at RESIDENT bytes of process; plan(...) is None where it is refused."""
    from mambascope.models import load_model
    from mambascope.scale import plan_memory

    model, _ = load_model(small_checkpoints["mamba"], device="cpu")

    def plan(resident: float, budget: float):
        try:
            return plan_memory(model, 2, 64, 64, tokens=640, window=32, batch_size=2, budget=budget,
                               resident=resident)
        except ValueError:
            return None

    exact = plan(RESIDENT, 2**40)
    gib = f"{(exact.peak - exact.parts['ngram_tables'] / 2) / 2**30:.9f}"  # half of the exact tables' room
    return gib, lambda resident: plan(resident, float(gib) * 2**30)


def interrupted_at_batch(monkeypatch, n: int) -> None:
    """Ctrl-C (KeyboardInterrupt, what SIGINT and SIGTERM raise) just before the census traces its n-th batch."""
    import mambascope.scale as scale

    trace, calls = scale.trace_stream, []

    def trace_or_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            monkeypatch.setattr(scale, "trace_stream", trace)
            raise KeyboardInterrupt
        return trace(*args, **kwargs)

    monkeypatch.setattr(scale, "trace_stream", trace_or_stop)


@pytest.mark.parametrize("budget", ["given", "default"])
def test_a_summarized_census_resumes_with_its_checkpoints_plan_whatever_the_memory_then(
        tmp_path, census_args, summarized, monkeypatch, budget):
    """The plan depends on the process's resident memory (and the default budget on the memory available):
    a resumed process with more resident memory and less available keeps the checkpoint's tables, and its
    results equal those of the uninterrupted run."""
    import mambascope.scale as scale

    gib, plan = summarized
    first, more = plan(RESIDENT), RESIDENT + 2**20
    assert first.summaries is not None and first.summaries.orders == (2, 3)
    assert plan(more) is None or plan(more).summaries != first.summaries  # a plan made anew would differ
    # the default budget: the process's resident memory and half of what is available
    resident, available = [RESIDENT], [(float(gib) * 2**30 - RESIDENT) * 2]
    monkeypatch.setattr(scale, "resident_bytes", lambda model: resident[0])
    monkeypatch.setattr(scale, "available_bytes", lambda: available[0], raising=False)
    flag = ("--memory-budget", gib) if budget == "given" else ()

    whole, out = tmp_path / "whole", tmp_path / "out"
    assert main(census_args(whole, *flag)) == 0
    interrupted_at_batch(monkeypatch, 3)
    assert main(census_args(out, *flag)) == 130
    saved = checkpoint(out)
    assert saved["position"] == 2 and saved["memory"]["summaries"]["counters"] == first.counters
    resident[0], available[0] = more, available[0] * 0.999
    assert main(census_args(out, *flag, "--resume")) == 0
    expected, resumed = (load_results(p, detail=True) for p in (whole, out))
    assert expected["census"]["approximate"] == ["layers.*.detectors.ngram_coverage.2",
                                                 "layers.*.detectors.ngram_coverage.3"]
    assert_same(expected, resumed, rel=1e-12)


RANKED_RESIDENT = f"""
import os, sys
import mambascope.scale as scale
from mambascope.cli import main
# each rank's own resident memory: rank r holds r MiB more than rank 0
scale.resident_bytes = lambda model: {RESIDENT!r} + int(os.environ.get("RANK", "0")) * 2**20
sys.exit(main(sys.argv[1:]))
"""


def test_two_processes_that_would_plan_apart_share_rank_0s_plan(tmp_path, census_args, summarized, monkeypatch):
    """Rank 1 alone would choose other summaries (or none fit); it takes rank 0's, the ranks' accumulators
    merge, and the result equals one process's with that plan."""
    import mambascope.scale as scale

    gib, plan = summarized
    assert plan(RESIDENT + 2**20) is None or plan(RESIDENT + 2**20).summaries != plan(RESIDENT).summaries
    script = tmp_path / "ranked.py"
    script.write_text(RANKED_RESIDENT)
    out, one = tmp_path / "out", tmp_path / "one"
    run = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(script),
                          *census_args(out, "--memory-budget", gib)], capture_output=True, text=True, env=ENV,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    monkeypatch.setattr(scale, "resident_bytes", lambda model: RESIDENT)
    assert main(census_args(one, "--memory-budget", gib)) == 0
    expected, results = (load_results(p, detail=True) for p in (one, out))
    assert (expected["processes"], results["processes"]) == (1, 2)
    assert results["census"]["approximate"] == expected["census"]["approximate"] != []
    assert_same(expected, results, rel=1e-9)


def test_the_default_budget_is_the_process_and_half_the_available_memory_at_most_16_gib(monkeypatch):
    import mambascope.scale as scale

    for available, budget in ((8 * 2**30, 5 * 2**30), (64 * 2**30, 16 * 2**30)):
        monkeypatch.setattr(scale, "available_bytes", lambda available=available: float(available))
        assert scale.default_budget(2**30)[0] == budget
    assert ("this process's 1.00 GiB and 0.5 of the 64.0 GiB available now, at most 16 GiB"
            in scale.default_budget(2**30)[1])
    monkeypatch.setattr(scale, "available_bytes", lambda: None)
    assert scale.default_budget(2**30) == (16 * 2**30, "default: 16 GiB, since this machine's available memory "
                                                       "could not be read")


def test_available_memory_is_read_from_proc_meminfo():
    """Against the kernel's own line, read here independently."""
    from mambascope.scale import available_bytes

    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        pytest.skip("no /proc/meminfo here")

    def kernel() -> int:
        (line,) = [x for x in meminfo.read_text().splitlines() if x.startswith("MemAvailable:")]
        return int(line.split()[1]) * 1024

    before, value, after = kernel(), available_bytes(), kernel()
    slack = 256 * 2**20  # what other processes may take or free between the reads
    assert min(before, after) - slack <= value <= max(before, after) + slack


def test_the_estimate_line_says_how_the_default_budget_was_chosen(tmp_path, census_args, capsys, monkeypatch):
    import mambascope.scale as scale

    monkeypatch.setattr(scale, "available_bytes", lambda: 10.0 * 2**30)
    monkeypatch.setattr(scale, "resident_bytes", lambda model: 2.0**30)
    argv = [a for a in census_args(tmp_path / "out", "--no-ablation") if a != "--quiet"]
    assert main(argv) == 0
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "estimated peak memory" in x]
    assert ("within --memory-budget 6 GiB (default: this process's 1.00 GiB and 0.5 of the 10.0 GiB available "
            "now, at most 16 GiB)") in line
