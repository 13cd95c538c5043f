"""Output sizes and neuron-page latency: the neuron store against everything inline in results.json.

    python benchmarks/bench_outputs.py [--tokens 4096] [--window 128] [--stages census,interventions]
                                       [--models tiny-mamba,random-130m] [--lookups 20]

For each model (``tiny-mamba``, bundled; ``random-130m``: a random MambaForCausalLM of mamba-130m's shape,
24 layers x d_model 768, expand 2 = 1536 channels per layer, 36,864 neurons, with the bundled tokenizer's
vocabulary) it runs ``run_analysis`` on ``--tokens`` tokens of the built-in corpus, writes the output
directory as ``mambascope analyze`` does (``save_results``: ``store/`` + slim ``results.json``), renders
``report.html`` with ``render_report`` as it is on this branch (every neuron embedded), and measures:

- the store's size, the slim ``results.json``, the same results written inline (the old format), and
  ``report.html``;
- opening a neuron page from the store: ``NeuronStore(dir).neuron(l, n)`` + ``layer_payload(l)`` with a
  fresh reader each time (cold: what a server does on its first request), and with one reader kept
  (warm), median and max over ``--lookups`` random neurons.  (The HTTP round trip of ``mambascope serve``
  is measured by its own benchmark.)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from mambascope.data import load_corpus, tokenize_windows
from mambascope.models import load_model
from mambascope.pipeline import model_info, run_analysis
from mambascope.report import create_comprehensive_report, render_report
from mambascope.results import save_results, to_jsonable
from mambascope.results.store import NeuronStore

MB = 2**20


def _model(name: str) -> tuple[torch.nn.Module, object]:
    model, tok = load_model("tiny-mamba", device="cpu")
    if name == "tiny-mamba":
        return model, tok
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    config = MambaConfig(vocab_size=model.get_input_embeddings().num_embeddings, hidden_size=768,
                         num_hidden_layers=24, expand=2, state_size=16, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    return MambaForCausalLM(config).eval(), tok


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _lookups(directory: Path, sizes: dict[int, int], n: int) -> dict[str, list[float]]:
    """Seconds to open a neuron page from the store, per random neuron: ``cold`` a fresh reader (a
    server's first request), ``warm`` one kept reader; ``neuron(l, n)`` + ``layer_payload(l, [n])`` (the
    layer's statistics, this neuron's detail); ``layer`` the whole layer's payload, fresh reader."""
    rng = random.Random(0)
    picks = [(layer, rng.randrange(sizes[layer])) for layer in (rng.choice(sorted(sizes)) for _ in range(n))]
    times: dict[str, list[float]] = {"cold": [], "warm": [], "layer": []}
    kept = NeuronStore(directory)
    for layer, neuron in picks:
        for key, store in (("cold", None), ("warm", kept)):
            start = time.perf_counter()
            store = store or NeuronStore(directory)
            store.neuron(layer, neuron)
            store.layer_payload(layer, [neuron])
            times[key].append(time.perf_counter() - start)
        start = time.perf_counter()
        NeuronStore(directory).layer_payload(layer)
        times["layer"].append(time.perf_counter() - start)
    return times


def bench(name: str, args: argparse.Namespace, root: Path) -> dict:
    model, tok = _model(name)
    texts = load_corpus("builtin", "validation").texts
    windows = tokenize_windows(texts, tok, args.window, max_tokens=args.tokens).ids
    info = {"model": model_info(model, name), "corpus": {"name": "builtin", "split": "validation",
                                                         "tokens": int(windows.numel()), "window": args.window}}
    start = time.perf_counter()
    results = run_analysis(model, tok, windows, info=info, stages=args.stages, progress=False,
                           attention_windows=4, draws=3)
    analysis = time.perf_counter() - start
    directory = root / name
    directory.mkdir()
    start = time.perf_counter()
    save_results(directory, results)
    write = time.perf_counter() - start
    inline = len(json.dumps(to_jsonable(results), indent=1, allow_nan=False).encode())
    start = time.perf_counter()
    figures = create_comprehensive_report(results, directory / "figures")
    report = render_report(results, directory, figures)
    render = time.perf_counter() - start
    store = NeuronStore(directory)
    counts = store.table(["layer"])["layer"].value_counts()
    times = _lookups(directory, {layer: int(counts[layer]) for layer in store.layers}, args.lookups)
    return {"model": name, "neurons": store.n_neurons, "tokens": int(windows.numel()), "analysis_s": analysis,
            "errors": results["errors"], "write_s": write, "store_MB": _size(directory / "store") / MB,
            "results_MB": _size(directory / "results.json") / MB, "inline_MB": inline / MB,
            "report_MB": _size(report) / MB, "render_s": render,
            **{f"{key}_ms": (statistics.median(t) * 1e3, max(t) * 1e3) for key, t in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--stages", default="census,interventions",
                        help="run_analysis stages (attention_neurons is slow on the 130m shape on a CPU)")
    parser.add_argument("--models", default="tiny-mamba,random-130m")
    parser.add_argument("--lookups", type=int, default=20)
    args = parser.parse_args()
    args.stages = tuple(args.stages.split(","))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-outputs-") as root:
        for name in args.models.split(","):
            rows.append(bench(name, args, Path(root)))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.tokens} tokens, window {args.window}, stages {','.join(args.stages)}")
    print("neuron page = NeuronStore(dir).neuron(l, n) + layer_payload(l, [n]); times median / max over "
          f"{args.lookups} random neurons")
    print("| model | neurons | analysis s | store MB | results.json MB | inline results.json MB | report.html MB "
          "| render s | page, fresh reader ms | page, kept reader ms | whole-layer payload, fresh reader ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ms = {key: f"{r[key][0]:.0f} / {r[key][1]:.0f}" for key in ("cold_ms", "warm_ms", "layer_ms")}
        print(f"| {r['model']} | {r['neurons']} | {r['analysis_s']:.1f} | {r['store_MB']:.2f} | {r['results_MB']:.3f} "
              f"| {r['inline_MB']:.1f} | {r['report_MB']:.1f} | {r['render_s']:.1f} | {ms['cold_ms']} "
              f"| {ms['warm_ms']} | {ms['layer_ms']} |")


if __name__ == "__main__":
    main()
