"""Where along its path integrated gradients is made, on a copy model: why IG misses the copied source.

    python benchmarks/ig_path_profile.py [--model tiny-gpt-copy] [--queries 64]

IG_j = Σ_k w_k (e − b)_j · ∂f/∂e_j (b + α_k (e − b)) over the 64 Gauss–Legendre nodes α_k that
``mambascope attribute`` uses (b the mean input embedding, f the answer's logit at the query), in fp64, on
the seed-0 held-out queries of the leaderboard.  Prints the median share of f(e) − f(b) reached along the path,
and per α segment: hit@1 of the source for that segment's partial sum, the source's attribution and the
context's total |attribution|; then where IG's top token lies when it misses (docs/methods.md, tiny-gpt-copy).
"""

from __future__ import annotations

import argparse
import os
from itertools import pairwise

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from mambascope.attribution.input_attribution import baseline_embedding, target_logit
from mambascope.attribution.leaderboard import model_task, task_queries
from mambascope.models.train_task import heldout_task_batch

EDGES = (0.0, 0.5, 0.8, 0.95, 1.0 + 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-gpt-copy")
    parser.add_argument("--queries", type=int, default=64)
    args = parser.parse_args()
    model, task = model_task(args.model)
    model.double()
    batch = heldout_task_batch(task["task"], args.queries, task["seq_len"], task["num_pairs"], task["seed"])
    tq = task_queries(batch, 0)
    nodes, weights = np.polynomial.legendre.leggauss(64)
    alphas = torch.tensor((nodes + 1) / 2, dtype=torch.float64)
    w = torch.tensor(weights / 2, dtype=torch.float64)
    segments = [(alphas >= lo) & (alphas < hi) for lo, hi in pairwise(EDGES)]
    hits = torch.zeros(len(segments) + 1)
    source, total = torch.zeros(len(segments)), torch.zeros(len(segments))
    profiles, offsets, gaps = [], [], []
    n = tq.ids.shape[0]
    for i in range(n):
        P, src, answer = int(tq.query[i]), int(tq.value_pos[i]), int(tq.answer[i])
        ids = tq.ids[i:i + 1, :P + 1]
        emb = model.get_input_embeddings()(ids).detach()
        base = baseline_embedding(model, emb, "mean")
        path = (base + alphas[:, None, None] * (emb - base)).requires_grad_(True)  # [K, L, D]
        f = target_logit(model, ids, P, answer)(path)  # [K]
        (grad,) = torch.autograd.grad(f.sum(), path)
        density = w[:, None] * (grad * (emb - base)).sum(-1)  # [K, L]: each node's share of IG_j
        ig = density.sum(0)
        hits[-1] += int(ig[:P].argmax() == src)
        for s, mask in enumerate(segments):
            part = density[mask].sum(0)
            hits[s] += int(part[:P].argmax() == src)
            source[s] += part[src]
            total[s] += part[:P].abs().sum()
        profiles.append(f.detach())
        gaps.append(float(f[-1].detach() - f[0].detach()))
        if int(ig.argmax()) != src:
            offsets.append(int(ig.argmax()) - src)
    prof = torch.stack(profiles)
    reached = (prof - prof[:, :1]) / (prof[:, -1:] - prof[:, :1])
    print(f"{args.model}: {n} queries; mean f(e) - f(b) = {sum(gaps) / n:.2f} (answer logit)")
    for a in (0.25, 0.5, 0.8, 0.9, 0.99):
        k = int((alphas - a).abs().argmin())
        print(f"  alpha {float(alphas[k]):.3f}: median share of the rise reached {float(reached[:, k].median()):.3f}")
    print(f"IG hit@1 of the source: {float(hits[-1]) / n:.3f}")
    for s in range(len(segments)):
        print(f"  alpha in [{EDGES[s]:.2f}, {min(EDGES[s + 1], 1.0):.2f}]: hit@1 {float(hits[s]) / n:.3f}, source "
              f"{float(source[s]) / n:.2f}, context sum |IG| {float(total[s]) / n:.2f}")
    print(f"misses (top token over the whole prefix): {len(offsets)}; top - source: {sorted(offsets)}")


if __name__ == "__main__":
    main()
