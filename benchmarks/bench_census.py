"""Cost of the full neuron census relative to the traced forward alone, and against a per-neuron loop.

    python benchmarks/bench_census.py [--model tiny-mamba] [--tokens 16384] [--window 128] [--device cpu]

Prints, measured in one run on the same model and windows:
1. the traced forward alone (the units the census needs, collected and dropped) vs the same pass feeding
   every accumulator (activity, positional, token detectors with n-gram coverage, Δ, top contexts), and
   the ratio (target: at most 1.5x);
2. dead + positional statistics from the same activations by our accumulators vs a plain per-neuron
   Python loop like the seed's (written here as the baseline), and the speed-up (target: at least 100x).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from mambascope.data import load_corpus, tokenize_windows
from mambascope.models import load_model
from mambascope.neurons import (
    ActivityAccumulator,
    LayerCensus,
    NeuronBatch,
    PositionalAccumulator,
    TopContextAccumulator,
)
from mambascope.runner import scan_corpus
from mambascope.trace import NEURON_UNIT, architecture, n_layers


def seed_style_dead_and_positional(posts: list[torch.Tensor], gates: list[torch.Tensor]) -> list[dict]:
    """The baseline: one neuron and one position at a time, as the seed's reference implementation did."""
    out = []
    for post, gate in zip(posts, gates, strict=True):  # [n, T, E] per layer
        dead, positional = [], []
        T, E = post.shape[1:]
        for e in range(E):
            active = gate[:, :, e] > 0
            if int(active.sum()) == 0:
                dead.append(e)
            fr = float(active.float().mean())
            info = 0.0
            for p in range(T):
                f = float(active[:, p].float().mean())
                for a, b in ((f, fr), (1 - f, 1 - fr)):
                    if a > 0 and b > 0:
                        info += a * torch.log(torch.tensor(a / b)).item()
            if info / T > 0.05:
                positional.append(e)
        out.append({"dead": dead, "positional": positional})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-mamba")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, device=args.device)
    arch, layers = architecture(model), range(n_layers(model))
    texts = load_corpus("builtin", "validation").texts
    windows = tokenize_windows(texts, tokenizer, args.window, max_tokens=args.tokens).ids
    unit = NEURON_UNIT[arch]
    units = [f"blocks.{layer}.{u}" for layer in layers
             for u in ([unit] if arch == "gpt2" else [unit, "mixer.hook_gate_pre", "mixer.hook_dt"])]
    vocab = model.get_input_embeddings().num_embeddings
    sync = torch.cuda.synchronize if windows.is_cuda or args.device.startswith("cuda") else (lambda: None)

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    scan = lambda consume: scan_corpus(model, windows, consume, names=units,  # noqa: E731
                                       batch_size=args.batch_size, progress=False)
    scan(lambda *a: None)  # warm-up
    t_forward = timed(lambda: scan(lambda *a: None))

    census = {layer: LayerCensus(arch, vocab, layer=layer) for layer in layers}
    tops = {layer: TopContextAccumulator(layer=layer) for layer in layers}

    def feed(layer, tensors, ids, rows):
        batch = NeuronBatch.from_layer(tensors, arch, ids.to(tensors[unit].device), label=layer,
                                       bos_token_id=tokenizer.bos_token_id, window_ids=rows)
        census[layer].update(batch)
        tops[layer].update(batch)

    t_census = timed(lambda: scan(feed))
    t_finalize = timed(lambda: [(census[layer].finalize(), tops[layer].finalize()) for layer in layers])

    posts, gates = {layer: [] for layer in layers}, {layer: [] for layer in layers}

    def collect(layer, tensors, ids, rows):
        posts[layer].append(tensors[unit].cpu())
        gates[layer].append((tensors["mixer.hook_gate_pre"] if arch != "gpt2" else tensors[unit]).cpu())

    scan(collect)
    P = [torch.cat(posts[layer]) for layer in layers]
    G = [torch.cat(gates[layer]) for layer in layers]

    def ours():
        for post, gate in zip(P, G, strict=True):
            n, T, _ = post.shape
            batch = NeuronBatch(post=post, active=gate > 0, token_ids=torch.zeros(n, T, dtype=torch.long),
                                positions=torch.arange(T).expand(n, T), valid=torch.ones(n, T, dtype=torch.bool))
            a, p = ActivityAccumulator(), PositionalAccumulator()
            a.update(batch)
            p.update(batch)
            a.finalize()
            p.finalize()

    t_ours = timed(ours)
    t_loop = timed(lambda: seed_style_dead_and_positional(P, G))

    cuda = args.device.startswith("cuda")
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"model {args.model} ({arch}, {len(layers)} layers, {P[0].shape[-1]} neurons/layer); "
          f"{windows.numel()} tokens in {windows.shape[0]} windows of {args.window}; {device}")
    print(f"traced forward alone           {t_forward:8.3f} s")
    print(f"forward + every accumulator    {t_census:8.3f} s   ratio {t_census / t_forward:5.2f}x (target <= 1.5x)")
    print(f"finalize (all layers)          {t_finalize:8.3f} s   ratio incl. finalize "
          f"{(t_census + t_finalize) / t_forward:5.2f}x")
    print(f"dead + positional, ours        {t_ours:8.3f} s")
    print(f"dead + positional, seed loop   {t_loop:8.3f} s   speed-up {t_loop / t_ours:7.1f}x (target >= 100x)")


if __name__ == "__main__":
    main()
