"""Cost of the full neuron census relative to the traced forward alone, and against a per-neuron loop.

    python benchmarks/bench_census.py [--model tiny-mamba | --model random-130m] [--tokens 16384] [--window 128]
                                      [--threads N] [--repeats 3] [--seed-layers N] [--device cpu]

``random-130m``: a randomly initialised Mamba-1 at 130m scale (MambaConfig hidden 768, expand 2 → 1536 channels,
24 layers, d_state 16, vocabulary 50280), fed tiny-mamba's tokenizer's ids (its vocabulary is a subset).

Prints, measured in one run on the same model and windows:
1. the traced forward alone (the units the census needs, collected and dropped) vs the same pass feeding
   every accumulator (activity, positional, token detectors with n-gram coverage, Δ, top contexts and their
   hidden-attention rows), and the ratio (target: at most 1.5x); finalize separately;
2. dead neurons and the plug-in positional information of every neuron from the same activations, by our
   accumulators and by a plain per-neuron Python loop like the seed's (written here as the baseline): first
   checked to agree (same dead neurons, information within 1e-5), then timed, and the speed-up.
"""

from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from mambascope.data import load_corpus, tokenize_windows
from mambascope.models import load_model
from mambascope.neurons import (
    ATTENTION_ROW_UNITS,
    ActivityAccumulator,
    LayerCensus,
    NeuronBatch,
    PositionalAccumulator,
    TopAttentionRows,
    TopContextAccumulator,
)
from mambascope.runner import scan_corpus
from mambascope.trace import NEURON_UNIT, architecture, mixer_params, n_layers

RANDOM_130M = "random-130m"


def seed_style_dead_and_positional(posts: list[torch.Tensor], gates: list[torch.Tensor]) -> list[dict]:
    """The baseline: one neuron and one position at a time, as the seed's reference implementation did.
    Per layer: dead neurons and each neuron's plug-in positional information (nats)."""
    out = []
    for post, gate in zip(posts, gates, strict=True):  # [n, T, E] per layer
        dead, information = [], []
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
                        info += a * math.log(a / b)
            information.append(info / T)
        out.append({"dead": dead, "information": information})
    return out


def ours_dead_and_positional(posts: list[torch.Tensor], gates: list[torch.Tensor]) -> list[dict]:
    """The same from our accumulators: ``dead_neurons`` and ``positional_mi_plugin``."""
    out = []
    for post, gate in zip(posts, gates, strict=True):
        n, T, _ = post.shape
        batch = NeuronBatch(post=post, active=gate > 0, token_ids=torch.zeros(n, T, dtype=torch.long),
                            positions=torch.arange(T).expand(n, T), valid=torch.ones(n, T, dtype=torch.bool))
        a, p = ActivityAccumulator(), PositionalAccumulator()
        a.update(batch)
        p.update(batch)
        out.append({"dead": a.finalize()["dead_neurons"], "information": p.finalize()["positional_mi_plugin"]})
    return out


def check_same(ours: list[dict], seed: list[dict]) -> float:
    """Raise unless both give the same dead neurons and information within 1e-5; the largest difference."""
    worst = 0.0
    for layer, (mine, theirs) in enumerate(zip(ours, seed, strict=True)):
        if mine["dead"] != theirs["dead"]:
            raise SystemExit(f"layer {layer}: dead neurons differ: ours {mine['dead']} seed {theirs['dead']}")
        diff = max(abs(x - y) for x, y in zip(mine["information"], theirs["information"], strict=True))
        if diff > 1e-5:
            raise SystemExit(f"layer {layer}: positional information differs by {diff:.3g} from the seed loop")
        worst = max(worst, diff)
    return worst


def build(name: str, device: str):
    """(model, tokenizer, label) for a bundled/hub model or the random 130m-scale Mamba."""
    if name != RANDOM_130M:
        model, tokenizer = load_model(name, device=device)
        return model, tokenizer, name
    from transformers import MambaConfig, MambaForCausalLM

    _, tokenizer = load_model("tiny-mamba", device=device)
    torch.manual_seed(0)
    config = MambaConfig(vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16, expand=2)
    model = MambaForCausalLM(config).to(device).eval()
    return model, tokenizer, f"{name} (random weights, tiny-mamba's token ids)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-mamba")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed-layers", type=int, default=None,
                        help="layers for the seed-loop comparison (default: all; its loop is slow at 130m)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating forward / census runs (default 3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, label = build(args.model, args.device)
    arch, layers = architecture(model), range(n_layers(model))
    texts = load_corpus("builtin", "validation").texts
    windows = tokenize_windows(texts, tokenizer, args.window, max_tokens=args.tokens).ids
    unit = NEURON_UNIT[arch]
    ssm = arch in ("mamba", "mamba2")
    units = [f"blocks.{layer}.{u}" for layer in layers  # what the census traces
             for u in ([unit] if not ssm else dict.fromkeys([unit, "mixer.hook_gate_pre", *ATTENTION_ROW_UNITS]))]
    vocab = model.get_input_embeddings().num_embeddings
    sync = torch.cuda.synchronize if windows.is_cuda or args.device.startswith("cuda") else (lambda: None)

    def timed(fn) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process): on a shared machine the CPU time is what the work
        cost, the wall time also what the other processes took."""
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        return time.perf_counter() - start, time.process_time() - cpu

    scan = lambda consume: scan_corpus(model, windows, consume, names=units,  # noqa: E731
                                       batch_size=args.batch_size, progress=False)
    scan(lambda *a: None)  # warm-up

    def census_pass() -> tuple[float, float]:
        census = {layer: LayerCensus(arch, vocab, layer=layer) for layer in layers}
        tops = {layer: TopContextAccumulator(layer=layer) for layer in layers}
        attention = {layer: TopAttentionRows(mixer_params(model, layer), tops[layer].width, layer)
                     for layer in layers if ssm}

        def feed(layer, tensors, ids, rows):
            batch = NeuronBatch.from_layer(tensors, arch, ids.to(tensors[unit].device), label=layer,
                                           bos_token_id=tokenizer.bos_token_id, window_ids=rows)
            census[layer].update(batch)
            tops[layer].update(batch)
            if ssm:
                attention[layer].update(tensors, tops[layer], rows)

        def finalize(layer):
            census[layer].finalize()
            top = tops[layer].finalize()
            if ssm:  # the token ids stand for the decoded strings the pipeline gives
                attention[layer].finalize({**top, "tokens": top["context_tokens"]})

        times.append(timed(lambda: scan(feed)))
        return timed(lambda: [finalize(layer) for layer in layers])

    # forward alone and forward + census alternate, so that a change of the machine's load hits both; the
    # fastest of each is compared
    forwards, times, finals = [], [], []
    for _ in range(args.repeats):
        forwards.append(timed(lambda: scan(lambda *a: None)))
        finals.append(census_pass())
    best = {name: tuple(min(t[i] for t in ts) for i in (0, 1))
            for name, ts in (("forward", forwards), ("census", times), ("finalize", finals))}

    seed_layers = list(layers)[:args.seed_layers] if args.seed_layers else list(layers)
    posts, gates = {layer: [] for layer in seed_layers}, {layer: [] for layer in seed_layers}

    def collect(layer, tensors, ids, rows):
        if layer in posts:
            posts[layer].append(tensors[unit].cpu())
            gates[layer].append((tensors["mixer.hook_gate_pre"] if arch != "gpt2" else tensors[unit]).cpu())

    scan(collect)
    P = [torch.cat(posts[layer]) for layer in seed_layers]
    G = [torch.cat(gates[layer]) for layer in seed_layers]
    mine, theirs = ours_dead_and_positional(P, G), seed_style_dead_and_positional(P, G)
    worst = check_same(mine, theirs)
    t_ours = timed(lambda: ours_dead_and_positional(P, G))[0]
    t_loop = timed(lambda: seed_style_dead_and_positional(P, G))[0]

    cuda = args.device.startswith("cuda")
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"model {label} ({arch}, {len(layers)} layers, {P[0].shape[-1]} neurons/layer); "
          f"{windows.numel()} tokens in {windows.shape[0]} windows of {args.window}; {device}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; fastest of {args.repeats} alternating runs")
    (fw, fc), (cw, cc), (zw, zc) = best["forward"], best["census"], best["finalize"]
    print(f"{'':31}{'wall s':>9}{'ratio':>8}{'CPU s':>9}{'ratio':>8}")
    print(f"{'traced forward alone':31}{fw:9.3f}{'':8}{fc:9.3f}")
    print(f"{'forward + every accumulator':31}{cw:9.3f}{cw / fw:7.2f}x{cc:9.3f}{cc / fc:7.2f}x   (target <= 1.5x)")
    print(f"{'finalize (all layers)':31}{zw:9.3f}{'':8}{zc:9.3f}")
    print(f"{'  incl. finalize':31}{cw + zw:9.3f}{(cw + zw) / fw:7.2f}x{cc + zc:9.3f}{(cc + zc) / fc:7.2f}x")
    print(f"dead + positional information, {len(seed_layers)} layer(s): ours and the seed loop agree (same dead "
          f"neurons, information within {worst:.1g})")
    print(f"dead + positional, ours        {t_ours:8.3f} s")
    print(f"dead + positional, seed loop   {t_loop:8.3f} s   speed-up {t_loop / t_ours:7.1f}x (target >= 100x)")


if __name__ == "__main__":
    main()
