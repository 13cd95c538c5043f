"""Tokens per second of training and of encoding a sparse dictionary (``mambascope sae``), on CPU threads.

    python benchmarks/bench_sae.py [--model tiny-mamba] [--hook mixer.hook_post] [--tokens 8192] [--threads 2]
                                   [--expansion 8] [--k 32] [--batch-tokens 512]

Prints, measured in one run on the same windows:
1. the activations alone: the traced forward up to the dictionary's layer (what streaming training pays per
   token before the dictionary sees it);
2. dictionary optimizer steps alone (sparsify's SparseCoder forward + AuxK + backward + Adam, decoder
   normalisation), on rows already in memory;
3. training end to end (``train_dictionary``: forward, shuffle buffer, steps);
4. encoding: the TopK codes of rows already in memory, and with the forward.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from mambascope.data import load_corpus, tokenize_windows
from mambascope.features.activations import unit_rows
from mambascope.features.dictionary import codes
from mambascope.features.run import make_spec
from mambascope.features.train import TrainConfig, new_state, train_dictionary, train_step
from mambascope.models import load_model


def _rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:10.0f} tok/s  ({tokens} tokens in {seconds:.2f} s)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-mamba")
    ap.add_argument("--hook", default=None)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--expansion", type=float, default=8.0)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-tokens", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device="cpu")
    spec = make_spec(model, args.model, "topk", args.hook, None, None, args.expansion, args.k)
    texts = load_corpus("builtin", "train").texts
    windows = tokenize_windows(texts, tokenizer, args.window, max_tokens=args.tokens).ids
    n = windows.numel()
    print(f"{args.model} {spec.hook_out}: d_in {spec.d_in}, d_sae {spec.d_sae}, k {spec.k}; {n} tokens, "
          f"{args.threads} threads")

    start = time.perf_counter()
    rows = [torch.cat(unit_rows(model, windows[i:i + 8], spec), dim=1) for i in range(0, windows.shape[0], 8)]
    forward = time.perf_counter() - start
    rows = torch.cat(rows)
    print(f"activations (forward to layer {spec.layer}):  {_rate(n, forward)}")

    cfg = TrainConfig(tokens=n, batch_tokens=args.batch_tokens, buffer_tokens=min(16_384, n))
    state = new_state(spec, cfg)
    order = torch.randperm(n)
    start = time.perf_counter()
    for s in range(cfg.steps):
        train_step(state, spec, cfg, rows[order[s * cfg.batch_tokens:(s + 1) * cfg.batch_tokens]])
    steps = time.perf_counter() - start
    print(f"dictionary steps alone:              {_rate(cfg.steps * cfg.batch_tokens, steps)}")

    start = time.perf_counter()
    listed = windows.tolist()
    train_dictionary(model, spec, cfg, lambda: iter(listed), progress=False)
    whole = time.perf_counter() - start
    print(f"training end to end:                 {_rate(cfg.steps * cfg.batch_tokens, whole)}  "
          f"(forwards {cfg.buffer_tokens + cfg.tokens} tokens: the buffer is topped up before every step)")

    coder = state.coder
    x = rows[:, :spec.d_in]
    start = time.perf_counter()
    for i in range(0, n, 4096):
        codes(coder, x[i:i + 4096])
    encode = time.perf_counter() - start
    print(f"encoding alone:                      {_rate(n, encode)}")
    print(f"encoding with the forward:           {_rate(n, encode + forward)}")


if __name__ == "__main__":
    main()
