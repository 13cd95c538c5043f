"""Tokens/s of the Hugging Face forward vs the traced forward (every internal unit collected), side by side.

    python benchmarks/bench_forward.py [--device cpu|cuda] [--quick]

Configs: the bundled models' size, and a 130m-scale random config (d_model 768, 24 layers) at L 512 and
1024.  Each row times both forwards on the same inputs in the same process, best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from mambascope.trace import trace_stream

CONFIGS = {
    "mamba-tiny": lambda: MambaConfig(vocab_size=4096, hidden_size=128, num_hidden_layers=4, state_size=16),
    "mamba2-tiny": lambda: Mamba2Config(vocab_size=4096, hidden_size=128, num_hidden_layers=4, state_size=32,
                                        head_dim=32, num_heads=8, n_groups=1, chunk_size=64),
    "mamba-130m": lambda: MambaConfig(vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16),
    "mamba2-130m": lambda: Mamba2Config(vocab_size=50288, hidden_size=768, num_hidden_layers=24, state_size=128,
                                        head_dim=64, num_heads=24, n_groups=1, chunk_size=256),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (allocations, kernel selection)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def run(name: str, batch: int, length: int, device: torch.device, repeats: int) -> dict:
    torch.manual_seed(0)
    model = (MambaForCausalLM if "mamba-" in name else Mamba2ForCausalLM)(CONFIGS[name]()).to(device).eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device=device)
    kept = []

    def hf() -> None:
        with torch.no_grad():
            model(ids)

    def traced() -> None:
        kept.clear()
        trace_stream(model, ids, lambda layer, units: kept.append(units))  # every unit of every layer

    t_hf, t_ours = best_time(hf, device, repeats), best_time(traced, device, repeats)
    tokens = batch * length
    return {"config": name, "batch": batch, "L": length, "hf_tok_s": tokens / t_hf, "traced_tok_s": tokens / t_ours,
            "hf_s": t_hf, "traced_s": t_ours, "speedup": t_hf / t_ours}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="bundled size only")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = [("mamba-tiny", 1, 512), ("mamba2-tiny", 1, 512), ("mamba-tiny", 8, 256), ("mamba2-tiny", 8, 256)]
    if not args.quick:
        rows += [("mamba-130m", 1, 512), ("mamba2-130m", 1, 512), ("mamba-130m", 1, 1024), ("mamba2-130m", 1, 1024)]
        if device.type == "cuda":
            rows += [("mamba-130m", 4, 1024), ("mamba2-130m", 4, 1024)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; traced = every unit of every layer collected")
    print(f"{'config':<12} {'batch':>5} {'L':>5} {'HF tok/s':>10} {'traced tok/s':>13} {'HF s':>8} {'traced s':>9} "
          f"{'speedup':>8}")
    for config, batch, length in rows:
        r = run(config, batch, length, device, args.repeats)
        print(f"{r['config']:<12} {r['batch']:>5} {r['L']:>5} {r['hf_tok_s']:>10.0f} {r['traced_tok_s']:>13.0f} "
              f"{r['hf_s']:>8.3f} {r['traced_s']:>9.3f} {r['speedup']:>7.2f}x")


if __name__ == "__main__":
    main()
