"""How well attribution patching tracks true activation patching on the bundled models (docs/patching.md).

    python benchmarks/patching_agreement.py [--models tiny-mamba tiny-mamba2 tiny-gpt tiny-hybrid]

For each model, unit type and direction: the Pearson and Spearman correlation between the true effect
grid (``activation_patching``) and its first-order estimate (``attribution_patching``), pooled over the
cells of a few prompt pairs where the patch changes something (``PatchGrid.changed``).  The target is
the clean run's top token, the metric its logit difference against the corrupted run's top other token.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from mambascope.interventions import activation_patching, attribution_patching, correlation
from mambascope.interventions.patching import UNIT_TYPES, grid_rows
from mambascope.models import load_model
from mambascope.trace import trace

PAIRS = [
    ("The function returns the value of the", "The class returns the value of the"),
    ("Return a list of the", "Return a dict of the"),
    ("The default value is None. If the value is", "The default value is True. If the value is"),
    ("If the file does not exist, an exception is", "If the file does not exist, an error is"),
]
UNITS = [u for u in UNIT_TYPES if u != "channels"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-mamba", "tiny-mamba2", "tiny-gpt", "tiny-hybrid"])
    args = parser.parse_args()
    print("| model | unit type | denoise Pearson | denoise Spearman | noise Pearson | noise Spearman | cells |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        model, tokenizer = load_model(name, device="cpu")
        units = []
        for u in UNITS:
            try:
                grid_rows(model, [u])
            except ValueError:
                continue
            units.append(u)
        pooled = {(u, d): ([], []) for u in units for d in ("denoise", "noise")}
        for clean_text, corrupt_text in PAIRS:
            clean = tokenizer(clean_text, return_tensors="pt").input_ids
            corrupt = tokenizer(corrupt_text, return_tensors="pt").input_ids
            if clean.shape != corrupt.shape:
                raise ValueError(f"{name}: {clean_text!r} and {corrupt_text!r} differ in length")
            target = int(trace(model, clean, names=[]).logits[0, -1].argmax())
            for direction in ("denoise", "noise"):
                kw = {"target": target, "unit_types": units, "direction": direction}
                true = activation_patching(model, clean, corrupt, **kw)
                estimate = attribution_patching(model, clean, corrupt, **kw)
                for u in units:
                    keep = true.grids[u].changed.flatten()
                    pooled[u, direction][0].append(true.grids[u].effect.flatten()[keep])
                    pooled[u, direction][1].append(estimate.grids[u].effect.flatten()[keep])
        for u in units:
            row = [correlation(torch.cat(pooled[u, d][0]), torch.cat(pooled[u, d][1])) for d in ("denoise", "noise")]
            cells = " ".join(f"{r['pearson']:.3f} | {r['spearman']:.3f} |" for r in row)
            print(f"| {name} | {u} | {cells} {row[0]['cells']} |")


if __name__ == "__main__":
    main()
