"""The census at scale: speed with 1 and 2 processes, checkpoint overhead, peak memory against corpus size.

    python benchmarks/bench_scale.py [--model tiny-mamba] [--tokens 32768] [--rss-sizes 16384 65536 262144]
                                     [--window 128] [--skip speed checkpoint rss]

Prints, measured in this run:
1. census tokens/s (the census stage's own time in results.json: traced pass, merge, finalize) of
   ``mambascope census --no-ablation`` with 1 process and with ``torchrun --nproc_per_node 2`` (Gloo, CPU) on
   the same windows, and their ratio; runs alternate 1, 2, 1, 2 ... so that drift of a shared machine hits both;
2. checkpoint overhead: the census pass with no checkpoint against the same pass checkpointing after every
   batch (the worst case), the seconds per checkpoint write and its size, and the overhead that cost
   gives at the default interval (one write per 10 minutes of scan);
3. the peak RSS of a streamed census (``--stream``) of N tokens, for each N and each ``--memory-budget`` in
   ``--rss-budgets`` (each in a fresh process; the operating system's accounting of the finished child,
   ``wait4``), beside the census's own printed estimate of its peak.

``--model random-130m``: a randomly initialised Mamba-1 at 130m scale (24 layers, hidden 768, expand 2, d_state
16, vocabulary 50280) saved with tiny-mamba's tokenizer into the work directory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SRC = Path(__file__).resolve().parents[1] / "src"
if (SRC / "mambascope").is_dir():
    ENV["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), ENV.get("PYTHONPATH")) if p)


def corpus_file(directory: Path, tokens: int, model: str, window: int) -> Path:
    """The built-in corpus (both splits), repeated until its windows hold at least ``tokens`` tokens (windows are
    cut per document, so short documents give none: the copies are counted in windowed tokens)."""
    from mambascope.data import builtin_texts, tokenize_windows
    from mambascope.models import load_model

    texts = builtin_texts()
    key = (model, window)
    if key not in _WINDOWED:
        _WINDOWED[key] = tokenize_windows(texts, load_model(model, device="cpu")[1], window).n_tokens
    copies = -(-tokens // _WINDOWED[key])
    path = directory / f"corpus-{copies}.jsonl"  # one document a line: documents stay whole, as in builtin_texts
    if not path.exists():
        path.write_text("\n".join(json.dumps({"text": t}) for t in texts * copies), encoding="utf-8")
    return path


_WINDOWED: dict[tuple[str, int], int] = {}


def census_argv(model: str, corpus: Path, tokens: int, window: int, out: Path, *extra: str,
                quiet: bool = True) -> list[str]:
    return ["census", "--model", model, "--corpus", str(corpus), "--split", "all", "--window", str(window),
            "--max-tokens", str(tokens), "--no-ablation", "--no-report", *(["--quiet"] if quiet else []),
            "--device", "cpu", "--checkpoint-every", "0", "--out", str(out), *extra]


def random_130m(work: Path) -> str:
    """A random 130m-scale Mamba-1 checkpoint (tiny-mamba's tokenizer) in ``work``; its directory."""
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    from mambascope.models import load_model

    path = work / "random-130m"
    if not path.exists():
        torch.manual_seed(0)
        MambaForCausalLM(MambaConfig(vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16,
                                     expand=2)).save_pretrained(path)
        load_model("tiny-mamba", device="cpu")[1].save_pretrained(path)
    return str(path)


def peak_rss(argv: list[str]) -> tuple[float, str]:
    """Peak RSS (MiB) of ``argv`` run as one child process (wait4's accounting), and its stderr."""
    child = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = child.stderr.read().decode(errors="replace") if child.stderr else ""
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} ... failed: {stderr[-2000:]}")
    return usage.ru_maxrss / 1024, stderr  # Linux reports KiB


def census_seconds(argv: list[str]) -> tuple[float, int]:
    """(the census stage's seconds, selection tokens) of one CLI run."""
    subprocess.run(argv, env=ENV, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    out = Path(argv[argv.index("--out") + 1])
    results = json.loads((out / "results.json").read_text())
    return results["timings"]["census"], results["corpus"]["selection_tokens"]


def bench_speed(args: argparse.Namespace, work: Path) -> None:
    corpus = corpus_file(work, args.tokens, args.model, args.window)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    one = [sys.executable, "-m", "mambascope"]
    two = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "mambascope"]
    times: dict[int, list[float]] = {1: [], 2: []}
    tokens = 0
    for repeat in range(args.repeats):
        for procs, launcher in ((1, one), (2, two)):
            out = work / f"speed-{procs}-{repeat}"
            seconds, tokens = census_seconds([*launcher, *census_argv(args.model, corpus, args.tokens, args.window,
                                                                       out)])
            times[procs].append(seconds)
    print(f"\n1. census speed, {args.model}, {tokens} selection tokens, window {args.window}, "
          f"{args.repeats} runs each (median)")
    print(f"{'processes':>9} {'census s':>9} {'tokens/s':>9}")
    for procs in (1, 2):
        median = statistics.median(times[procs])
        print(f"{procs:>9} {median:>9.2f} {tokens / median:>9.0f}   runs: {[round(t, 2) for t in times[procs]]}")
    ratios = [a / b for a, b in zip(times[1], times[2], strict=True)]
    print(f"speed-up of 2 processes over 1 (pairwise median): {statistics.median(ratios):.2f}x")


def bench_checkpoint(args: argparse.Namespace, work: Path) -> None:
    import torch

    from mambascope.data import load_corpus, tokenize_windows
    from mambascope.models import load_model
    from mambascope.pipeline import census_accumulate
    from mambascope.scale import Checkpointer, ScanPlan, scan_function

    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model, device="cpu")
    corpus = corpus_file(work, args.tokens, args.model, args.window)
    windows = tokenize_windows(load_corpus(str(corpus), "all").texts, tokenizer, args.window,
                               max_tokens=args.tokens).ids
    n_batches = -(-windows.shape[0] // 8)
    timings: dict[str, list[float]] = {"none": [], "every batch": []}
    writes = []
    for repeat in range(args.repeats):
        for label in timings:
            ckpt = None
            if label == "every batch":
                ckpt = Checkpointer(work / f"ckpt-{repeat}", {"model": {}, "corpus": {}, "settings": {}},
                                    every_batches=1)
            start = time.perf_counter()
            census_accumulate(model, tokenizer, windows, batch_size=8, progress=False,
                              scan=scan_function(ScanPlan(checkpoint=ckpt)))
            timings[label].append(time.perf_counter() - start)
            if ckpt is not None:
                writes.append((ckpt.seconds_writing / ckpt.writes, ckpt.path.stat().st_size))
    plain, every = statistics.median(timings["none"]), statistics.median(timings["every batch"])
    per_write = statistics.median(w for w, _ in writes)
    size = max(s for _, s in writes)
    print(f"\n2. checkpoint overhead, {args.model}, {windows.numel()} tokens in {n_batches} batches of 8, "
          f"{args.repeats} runs each (median)")
    print(f"census pass without checkpoints: {plain:.2f} s; checkpointing after every batch: {every:.2f} s "
          f"({every / plain - 1:+.1%})")
    print(f"one checkpoint write (state of the whole pass, {size / 2**20:.1f} MiB): {per_write * 1000:.0f} ms")
    print(f"at the default interval (one write per 10 min of scan, plus the final one): "
          f"{per_write / 600:.3%} of run time (target <= 5%)")


def bench_rss(args: argparse.Namespace, work: Path) -> None:
    print(f"\n3. peak RSS of a streamed census (--stream --no-ablation), {args.model}, window {args.window}")
    print(f"{'tokens':>9} {'budget GiB':>10} {'tables':>34} {'estimate MiB':>12} {'peak MiB':>9} {'wall s':>8}")
    for tokens in args.rss_sizes:
        corpus = corpus_file(work, tokens, args.model, args.window)
        for budget in args.rss_budgets:
            start = time.perf_counter()
            out = work / f"rss-{tokens}-{budget}"
            peak, stderr = peak_rss([sys.executable, "-m", "mambascope",
                                     *census_argv(args.model, corpus, tokens, args.window, out, "--stream",
                                                  "--memory-budget", str(budget), quiet=False)])
            estimate = float(re.search(r"estimated peak memory ([0-9.]+) GiB", stderr).group(1)) * 1024
            results = json.loads((out / "results.json").read_text())
            tables = ", ".join(f.split(".")[-1] if "ngram" in f else f.split(".")[1]
                               for f in results["census"].get("approximate", [])) or "exact"
            print(f"{results['corpus']['tokens']:>9} {budget:>10g} {tables[:34]:>34} {estimate:>12.0f} "
                  f"{peak:>9.0f} {time.perf_counter() - start:>8.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-mamba")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens for the speed and checkpoint parts")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rss-sizes", type=int, nargs="+", default=[16384, 65536, 262144])
    parser.add_argument("--rss-budgets", type=float, nargs="+", default=[16.0, 1.0],
                        help="--memory-budget values (GiB) to measure the peak RSS under")
    parser.add_argument("--skip", nargs="*", default=[], choices=["speed", "checkpoint", "rss"])
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs visible, torch threads 1 per process; {time.strftime('%Y-%m-%d %H:%M')}")
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        if args.model == "random-130m":
            args.model = random_130m(work)
        if "speed" not in args.skip:
            bench_speed(args, work)
        if "checkpoint" not in args.skip:
            bench_checkpoint(args, work)
        if "rss" not in args.skip:
            bench_rss(args, work)


if __name__ == "__main__":
    main()
