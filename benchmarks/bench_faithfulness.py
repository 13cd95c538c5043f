"""Token-level faithfulness: one perturbation call per curve against one shared, de-duplicated call per batch.

    python benchmarks/bench_faithfulness.py [--model tiny-mamba] [--windows 16] [--steps 4]

Both paths score the same windows, queries (``context_queries``, margin 1 nat), rankings (every method at
every layer, MoRF and LeRF, plus 3 random seeds) and fractions; the script checks that they give the same
log-probs, then prints the number of sequence forwards and the CPU time of each, side by side.
"""

from __future__ import annotations

import argparse
import time

import torch

from mambascope.attribution.faithfulness import (
    _context_reversed,
    context_queries,
    masked_logprob,
    perturbed_logprob,
    removal_masks,
    token_ranking,
)
from mambascope.attribution.methods import method_records
from mambascope.data import load_corpus, tokenize_windows
from mambascope.models import load_model
from mambascope.trace import n_layers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-mamba")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model(args.model, device="cpu")
    windows = tokenize_windows(load_corpus("builtin", "validation").texts, tok, 128, max_tokens=65536).ids[-128:]
    chosen = context_queries(model, windows, margin=1.0)
    keep = chosen["keep"].nonzero()[:, 0][: args.windows]
    keep = keep[torch.argsort(chosen["query"][keep], stable=True)]
    ids, q = windows[keep], chosen["query"][keep]
    b = ids.shape[0]
    frac = torch.tensor([i / args.steps for i in range(args.steps + 1)], dtype=torch.float64)
    counts = torch.round(frac[:, None] * q[None, :].double()).long()
    gen = torch.Generator().manual_seed(0)
    layers = list(range(n_layers(model)))
    methods = ["attention_weighted", "gradient_guided", "rollout", "block", "gradient_x_post"]
    context = torch.arange(int(q.max()))[None, :] < q[:, None]
    orders = []
    for s in range(3):
        score = torch.rand(context.shape, generator=torch.Generator().manual_seed(s)).double()
        orders.append(token_ranking(torch.where(context, score, -torch.inf), gen))
    errors: dict[str, str] = {}
    for _, _, records in method_records(model, ids, layers, methods, query=q, batch_size=b, errors=errors):
        for method in records:
            for layer in layers:
                rel = records[method][layer]["relevance"][:, : context.shape[1]].double()
                orders.append(token_ranking(torch.where(context, rel, -torch.inf), gen))
    directions = [d for o in orders for d in (o, _context_reversed(o, q))]
    target = ids[torch.arange(b), q + 1]

    t0 = time.process_time()
    per_curve = torch.stack([perturbed_logprob(model, ids, d, counts, q, target) for d in directions])
    t_per_curve = time.process_time() - t0

    t0 = time.process_time()
    masks = torch.stack([removal_masks(d, counts, q, b)[0] for d in directions])  # [K, F, b, cut]
    K, F = masks.shape[:2]
    rows = torch.arange(b).expand(K, F, b).reshape(-1)
    shared = masked_logprob(model, ids, rows, masks.reshape(K * F * b, -1), q.expand(K, F, b).reshape(-1),
                            target.expand(K, F, b).reshape(-1)).reshape(K, F, b).permute(0, 2, 1)
    t_shared = time.process_time() - t0
    assert torch.allclose(per_curve, shared, atol=1e-5), "the two paths disagree"
    key = torch.cat([rows[:, None], masks.reshape(K * F * b, -1)], 1)
    unique = torch.unique(key, dim=0).shape[0]
    # per_curve also de-duplicates inside each call (the f = 0 / f = 1 rows of one curve are distinct inputs)
    print(f"{args.model}: {b} windows, {len(directions)} curves x {F} fractions")
    print(f"{'path':<28} {'forwards':>9} {'CPU s':>8}")
    print(f"{'one call per curve':<28} {K * F * b:>9} {t_per_curve:>8.1f}")
    print(f"{'shared, de-duplicated':<28} {unique:>9} {t_shared:>8.1f}")
    print(f"ratio (per curve / shared): {t_per_curve / t_shared:.2f}x")


if __name__ == "__main__":
    main()
