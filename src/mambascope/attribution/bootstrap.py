"""Percentile bootstrap intervals for means of independent per-item values (Efron & Tibshirani 1993, §13.3).

Items (queries, windows) are resampled with replacement ``n_boot`` times; the interval is the
(α/2, 1 − α/2) quantiles of the resampled means.  A paired comparison resamples the per-item
differences, so both sides see the same items in every resample.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

N_BOOT = 2000

__all__ = ["N_BOOT", "bootstrap_mean"]


def bootstrap_mean(values: Sequence[float] | np.ndarray, *, n_boot: int = N_BOOT, level: float = 0.95,
                   seed: int = 0) -> dict[str, float | int | None]:
    """``{"mean", "low", "high", "n"}``: the mean of ``values`` [n] and its percentile bootstrap interval.

    With one value there is no spread to resample: ``low`` and ``high`` are None (not the mean).
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("bootstrap_mean needs at least one value")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if not np.isfinite(x).all():
        raise ValueError("bootstrap_mean got a non-finite value")
    out: dict[str, float | int | None] = {"mean": float(x.mean()), "low": None, "high": None, "n": int(x.size)}
    if x.size > 1:
        rng = np.random.default_rng(seed)
        means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(1)
        low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
        out["low"], out["high"] = float(low), float(high)
    return out
