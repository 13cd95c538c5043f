"""Batched activation patching vs one forward per patch vs attribution patching, side by side.

    python benchmarks/bench_patching.py [--model tiny-mamba] [--length 64] [--batch-size 16 64] [--repeats 3]

A full layer × position grid of each unit type (resid_pre, mixer_out, the SSM state, then all three in
one call) on a prompt of ``--length`` random tokens whose corrupted copy differs at a quarter of the way
in.  Columns: seconds of ``activation_patching`` with ``batch`` patches per forward, the same with
one patch per forward (``batch_size=1``: a loop of single forwards through the same edits), and
``attribution_patching`` (the grid's first-order estimate from one forward and one backward); each the
best of ``--repeats`` runs in this process, the clean and corrupted runs included in every method.  The
last column checks that the loop and the batched grid agree (max |Δ metric|).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from mambascope.interventions import activation_patching, attribution_patching
from mambascope.models import load_model
from mambascope.trace import trace


def best_time(fn, device: torch.device, repeats: int):
    """(best seconds, the last result) of ``repeats`` calls."""
    times, result = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-mamba")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[16, 64], help="patches per forward")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    model, _ = load_model(args.model, device=device)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, model.config.vocab_size, (1, args.length), generator=g)
    corrupt = clean.clone()
    corrupt[0, args.length // 4] = (clean[0, args.length // 4] + 1) % model.config.vocab_size
    target = int(trace(model, clean, names=[]).logits[0, -1].argmax())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; {args.model}, L {args.length}, best of {args.repeats}")
    print(f"{'units':<26} {'cells':>6} {'batch':>5} {'batched s':>10} {'loop s':>9} {'attrib. s':>10} "
          f"{'loop/batched':>13} {'batched/attrib.':>16} {'loop/attrib.':>13} {'max |Δm|':>9}")
    for units in (["resid_pre"], ["mixer_out"], ["state"], ["resid_pre", "mixer_out", "state"]):
        kw = {"target": target, "unit_types": units}

        def patch(batch_size: int, kw=kw):
            return activation_patching(model, clean, corrupt, batch_size=batch_size, **kw)

        t_loop, loop = best_time(lambda: patch(1), device, args.repeats)
        t_attr, _ = best_time(lambda kw=kw: attribution_patching(model, clean, corrupt, **kw), device, args.repeats)
        for batch_size in args.batch_size:
            t_batch, batched = best_time(lambda b=batch_size: patch(b), device, args.repeats)
            cells = sum(g.metric.numel() for g in batched.grids.values())
            diff = max(float((batched.grids[u].metric - loop.grids[u].metric).abs().max()) for u in batched.grids)
            print(f"{','.join(units):<26} {cells:>6} {batch_size:>5} {t_batch:>10.3f} {t_loop:>9.3f} {t_attr:>10.3f} "
                  f"{t_loop / t_batch:>12.1f}x {t_batch / t_attr:>15.1f}x {t_loop / t_attr:>12.1f}x {diff:>9.1e}")


if __name__ == "__main__":
    main()
