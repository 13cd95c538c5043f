"""Mamba-1 training step time: the old per-position autograd scan vs the fused scan, side by side.

    python benchmarks/bench_train.py [--steps 3] [--threads 1 2] [--d-model 64 128] [--seq-len 64 256]

One training step = forward + backward + gradient clipping + AdamW step of ``MambaForCausalLM`` with the
task models' shape (2 layers, expand 2, d_state 16, the 35-token task vocabulary), batch 64, through
``mambascope.models.train.optimizer_step`` with the scan swapped in as ``train-tiny`` does.

- ``unbind``: the training scan before issue 19 (``selective_scan_unbind`` below, kept here as the
  baseline only): transformers' reference loop, reading each position with ``unbind``, one autograd
  node per position and op.
- ``fused``: ``mambascope.models.train.hf_selective_scan`` (``ssm/s6_scan.py``: one sequential loop
  forward, one reverse loop backward, gradients in closed form).

Time: for each (d_model, L, threads) one subprocess builds two identical models and steps them in
turn, one with each scan, so that both see the same load on a shared machine; the median of ``--steps``
steps after one warm-up step.  Memory: one subprocess per scan, the **peak RSS delta**: the process's peak
resident set size (``ru_maxrss``) over the first step minus its RSS just before the first (model, optimiser
and inputs already built), so it counts the step's temporaries, autograd's saved tensors and AdamW's state.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from torch import nn


def selective_scan_unbind(hidden_states: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                          C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                          delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                          return_last_state: bool = False, **kwargs: Any) -> Any:
    """The baseline: the training scan of mambascope before issue 19 (transformers' loop, read by ``unbind``)."""
    batch_size, intermediate_size, _ = hidden_states.shape
    input_dtype = hidden_states.dtype
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = nn.functional.softplus(dt)
    B = B.transpose(1, 2)
    C = C.transpose(1, 2)
    discrete_A = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
    discrete_B = dt[:, :, :, None] * B[:, None, :, :].float()
    deltaB_u = discrete_B * hidden_states[:, :, :, None].float()
    ssm_state = torch.zeros(batch_size, intermediate_size, A.shape[-1], dtype=input_dtype,
                            device=hidden_states.device)
    scan_outputs = []
    for dA, dBu, c in zip(discrete_A.unbind(2), deltaB_u.unbind(2), C.unbind(1), strict=True):
        ssm_state = dA * ssm_state + dBu
        scan_outputs.append(torch.matmul(ssm_state.to(input_dtype), c.unsqueeze(-1))[:, :, 0])
    scan_output = torch.stack(scan_outputs, dim=-1)
    if D is not None:
        scan_output = scan_output + hidden_states * D[None, :, None]
    if z is not None:
        scan_output = scan_output * nn.functional.silu(z)
    if return_last_state:
        return scan_output, ssm_state
    return scan_output


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _setup(d_model: int, seq_len: int, batch: int) -> tuple[Any, Any, Any, torch.Tensor]:
    from transformers import MambaConfig, MambaForCausalLM

    from mambascope.models.train import _param_groups

    torch.manual_seed(0)
    config = MambaConfig(vocab_size=35, hidden_size=d_model, num_hidden_layers=2, expand=2, state_size=16,
                         conv_kernel=4, tie_word_embeddings=True)
    model = MambaForCausalLM(config).train()
    opt = torch.optim.AdamW(_param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ids = torch.randint(0, 35, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    return model, opt, sched, ids


def _use(scan: str) -> None:
    from transformers.models.mamba import modeling_mamba

    from mambascope.models.train import hf_selective_scan

    modeling_mamba.mamba_selective_scan = selective_scan_unbind if scan == "unbind" else hf_selective_scan


def child_time(d_model: int, seq_len: int, threads: int, steps: int, batch: int) -> dict[str, float]:
    """Both scans in one process, their steps alternating, so that both see the same machine load."""
    import time

    from mambascope.models.train import optimizer_step

    torch.set_num_threads(threads)
    runs = {scan: _setup(d_model, seq_len, batch) for scan in SCANS}
    times: dict[str, list[float]] = {scan: [] for scan in SCANS}
    for step in range(steps + 1):
        for scan in SCANS:
            _use(scan)
            t0 = time.perf_counter()
            optimizer_step(*runs[scan][:3], runs[scan][3], runs[scan][3])
            if step:  # the first step is a warm-up (allocator, AdamW state)
                times[scan].append(time.perf_counter() - t0)
    return {scan: statistics.median(ts) for scan, ts in times.items()}


def child_memory(scan: str, d_model: int, seq_len: int, threads: int, batch: int) -> float:
    """Peak RSS (MiB) of one training step above the RSS with model, optimiser and inputs built."""
    import resource

    from mambascope.models.train import optimizer_step

    torch.set_num_threads(threads)
    model, opt, sched, ids = _setup(d_model, seq_len, batch)
    _use(scan)
    rss0 = _rss_kib()
    optimizer_step(model, opt, sched, ids, ids)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024  # ru_maxrss: KiB on Linux


SCANS = ("unbind", "fused")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per scan (after one warm-up)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--d-model", type=int, nargs="+", default=[64, 128])
    p.add_argument("--seq-len", type=int, nargs="+", default=[64, 256])
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        what, d, L, t, scan = args.child
        if what == "time":
            print(json.dumps(child_time(int(d), int(L), int(t), args.steps, args.batch)))
        else:
            print(json.dumps(child_memory(scan, int(d), int(L), int(t), args.batch)))
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; MambaForCausalLM 2 layers, expand 2, d_state 16, "
          f"batch {args.batch}; s/step: median of {args.steps} alternating steps after 1 warm-up; "
          f"memory: peak RSS delta (MiB)", flush=True)
    print(f"{'threads':>7} {'d_model':>7} {'L':>5} | {'unbind s/step':>13} {'fused s/step':>12} {'speed-up':>8} | "
          f"{'unbind MiB':>10} {'fused MiB':>9}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torch.set_num_threads in the child decides

    def run(*child: object) -> Any:
        cmd = [sys.executable, __file__, "--steps", str(args.steps), "--batch", str(args.batch),
               "--child", *map(str, child)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    for threads in args.threads:
        for d in args.d_model:
            for L in args.seq_len:
                t = run("time", d, L, threads, "-")
                mem = {scan: run("memory", d, L, threads, scan) for scan in SCANS}
                print(f"{threads:>7} {d:>7} {L:>5} | {t['unbind']:>13.3f} {t['fused']:>12.3f} "
                      f"{t['unbind'] / t['fused']:>7.1f}x | {mem['unbind']:>10.0f} {mem['fused']:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
