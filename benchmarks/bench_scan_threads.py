"""The Mamba-1 scan's loops on one intra-op thread for small slices vs on every thread, side by side.

    python benchmarks/bench_scan_threads.py [--repeats 9] [--batch 1 4 8 16 32 64]

``ssm/s6_scan.py`` runs its per-position loops on one thread when a position's [b, N, E] slice has at most
``SMALL_SLICE`` elements.  For each batch size (E 256, N 16, L 128: the bundled ``tiny-mamba``'s layer
with ``--batch-size 8``'s windows) this times the no-grad scan and forward + backward with the rule
(``rule``) and with the loops on ``torch.get_num_threads()`` threads (``all``), alternating the two,
median of ``--repeats``.  ``all/rule`` > 1 means the rule is faster.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from mambascope.ssm import s6_scan as scan_module
from mambascope.ssm.s6_scan import s6_scan

E, N, L = 256, 16, 128


def _inputs(b: int, grad: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    u, dt = torch.randn(b, L, E, generator=g), torch.rand(b, L, E, generator=g) * 0.1
    A, B, C = -torch.rand(E, N, generator=g), torch.randn(b, L, N, generator=g), torch.randn(b, L, N, generator=g)
    return [t.requires_grad_(grad) for t in (u, dt, A, B, C)]


def _step(inputs: list[torch.Tensor], grad: bool) -> Callable[[], None]:
    def run() -> None:
        with torch.set_grad_enabled(grad):
            y, _ = s6_scan(*inputs)
            if grad:
                y.sum().backward()
    return run


def _time(run: Callable[[], None], small_slice: int) -> float:
    scan_module.SMALL_SLICE = small_slice
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    args = parser.parse_args()
    rule = scan_module.SMALL_SLICE
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; E {E}, N {N}, L {L}; SMALL_SLICE {rule}; "
          f"median of {args.repeats}")
    print(f"{'batch':>5} {'slice':>7} {'pass':>8} | {'rule ms':>8} {'all ms':>8} {'all/rule':>8}")
    for b in args.batch:
        for grad in (False, True):
            run = _step(_inputs(b, grad), grad)
            run()  # warm-up
            times: dict[int, list[float]] = {rule: [], 0: []}
            for _ in range(args.repeats):
                for small_slice in times:  # alternating, so both see the same load
                    times[small_slice].append(_time(run, small_slice))
            ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            print(f"{b:>5} {b * N * E:>7} {'fwd+bwd' if grad else 'no-grad':>8} | {ms[rule]:>8.2f} {ms[0]:>8.2f} "
                  f"{ms[0] / ms[rule]:>7.2f}x")
    scan_module.SMALL_SLICE = rule


if __name__ == "__main__":
    main()
