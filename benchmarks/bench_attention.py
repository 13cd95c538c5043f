"""Hidden-attention benchmark at 130m scale (one Mamba-1 layer: E = 1536 channels, N = 16, batch 1).

    python benchmarks/bench_attention.py [--device cpu|cuda] [--quick] [--channels N]

Cases: full per-channel s6 matrices at L = 256 and 1024, the channel-mean reduction at L = 1024 and 4096,
and the plain loop reference (mambascope.ssm.reference.hidden_attention_loops) against the kernel at L = 64.
Inputs are random (random_mixer), the timings do not depend on their values.

Peak memory: on CUDA, torch.cuda.max_memory_allocated during the call minus the memory allocated before it
(result included).  On CPU each case runs in a fresh subprocess, which resets its resident-set high-water
mark just before the call (/proc/self/clear_refs) and reports VmHWM after it minus VmRSS before it (result
included), with glibc's mmap threshold fixed at 128 KiB so that freed tensors leave the resident set;
approximate (page granularity, allocator slack; where clear_refs is unavailable, the growth of ru_maxrss).

On CPU the full 1536-channel sets are slow (and the L = 1024 result alone is 6.4 GB), so --quick (and
--channels) compute a channel subset; the table then also shows the time scaled linearly to all E channels,
marked as an estimate (the kernels' cost is linear in the channel count).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from mambascope.ssm.hidden_attention import hidden_attention
from mambascope.ssm.reference import hidden_attention_loops, random_mixer

E, N = 1536, 16

# name, L, reduce, channels (full run), channels (--quick)
CASES = [
    ("full s6", 256, None, E, 128),
    ("full s6", 1024, None, E, 16),
    ("mean s6", 1024, "mean", E, 64),
    ("mean s6", 4096, "mean", E, 4),
    ("loop reference", 64, None, E, 256),
    ("kernel (same)", 64, None, E, 256),
]


def _inputs(L: int, device: str):
    layer, params, _ = random_mixer("mamba", batch=1, length=L, d_inner=E, d_state=N, outputs=False, seed=0,
                                    device=device)
    return layer, params


def _call(name: str, layer, params, reduce: str | None, channels: int) -> torch.Tensor:
    chans = list(range(channels))
    if name == "loop reference":
        return hidden_attention_loops(layer["mixer.hook_dt"][..., :channels], params.A[:channels],
                                      layer["mixer.hook_B"], layer["mixer.hook_C"])
    return hidden_attention(layer, params, "s6", channels=chans, reduce=reduce)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> int:
    """Reset the resident-set high-water mark (Linux ≥ 4.0: '5' > clear_refs) and return the current RSS;
    where that is impossible, return ru_maxrss, so that the peak read later is a growth of the maximum."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS") * 1024
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _peak_rss() -> int:
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(name: str, L: int, reduce: str | None, channels: int, device: str, reps: int) -> dict:
    layer, params = _inputs(L, device)
    small, small_params = _inputs(16, device)
    _call(name, small, small_params, reduce, min(channels, 4))  # load kernels / warm the allocator a little
    if device == "cuda":
        _call(name, layer, params, reduce, channels)  # full-size warm-up
        torch.cuda.synchronize()
    times = []
    peak = 0
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _reset_peak_rss()
        t0 = time.perf_counter()
        out = _call(name, layer, params, reduce, channels)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        peak = max(peak, (torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss()) - base)
        result_bytes = out.numel() * out.element_size()
        ok = bool(torch.isfinite(out).all())
        del out
    return {"time": min(times), "peak": peak, "result": result_bytes, "finite": ok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="channel subsets (for CPU): see the table")
    ap.add_argument("--channels", type=int, default=None, help="channels per case (overrides --quick)")
    ap.add_argument("--run-case", help=argparse.SUPPRESS)  # internal: one case in a subprocess (CPU)
    args = ap.parse_args()
    if args.run_case:
        name, L, reduce, channels = json.loads(args.run_case)
        print(json.dumps(run_case(name, L, reduce, channels, "cpu", reps=1)))
        return
    dev = args.device
    if dev == "cuda":
        name = torch.cuda.get_device_name()
        how = "torch.cuda.max_memory_allocated − allocated before the call"
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
        how = "VmHWM after − VmRSS before the call, high-water mark reset, one subprocess per case"
    print(f"hidden attention benchmark: Mamba-1 layer E={E}, N={N}, batch 1, fp32, torch {torch.__version__}, "
          f"{name}")
    print(f"peak memory: {how}; 'est. all' scales the time linearly to all {E} channels")
    header = f"{'case':<16}{'L':>6}{'channels':>10}{'time s':>10}{'est. all s':>12}{'peak MB':>10}{'result MB':>11}"
    print(header)
    print("-" * len(header))
    timings = {}
    for case_name, L, reduce, full_ch, quick_ch in CASES:
        channels = args.channels or (quick_ch if args.quick else full_ch)
        channels = min(channels, E)
        if dev == "cpu":
            cmd = [sys.executable, __file__, "--run-case", json.dumps([case_name, L, reduce, channels])]
            # A fixed glibc mmap threshold returns every large freed block to the OS, so the RSS high-water
            # mark tracks live tensors instead of heap memory kept from building the inputs.
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            res = json.loads(out.strip().splitlines()[-1])
        else:
            res = run_case(case_name, L, reduce, channels, dev, reps=3)
        timings[(case_name, L)] = res["time"]
        est = f"{res['time'] * E / channels:.3f}" if channels < E else "-"
        flag = "" if res["finite"] else "  NON-FINITE!"
        print(f"{case_name:<16}{L:>6}{channels:>10}{res['time']:>10.3f}{est:>12}{res['peak'] / 2**20:>10.1f}"
              f"{res['result'] / 2**20:>11.1f}{flag}", flush=True)
    ratio = timings[("loop reference", 64)] / timings[("kernel (same)", 64)]
    print(f"speed-up of the kernel over the loop reference at L=64: {ratio:.0f}x")


if __name__ == "__main__":
    main()
