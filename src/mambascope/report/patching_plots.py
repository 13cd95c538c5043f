"""Heatmaps of ``results["patching"]`` (``mambascope patch``, docs/patching.md), one per unit type.

In the style of the causal-tracing figures of Meng et al. 2022 (Fig. 1): the fraction of the clean
metric restored by patching one unit at one position, layers down the side, the prompt's tokens along
the bottom (tokens where the two runs differ, or the noised subject, starred), one hue per kind of unit
(purple: residual stream; green: MLP and mixer outputs, neurons; red: attention; blue: the SSM state),
white at 0 and grey below it (a patch that moves the metric away from the clean run).  Reads the results
only.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import Colormap, LinearSegmentedColormap, TwoSlopeNorm
from matplotlib.figure import Figure

from mambascope.report._access import title

DPI = 100  # as the other figures (report/figures.py, which registers this module's plot and so cannot be imported)

# unit type -> (label, colormap)
UNIT_STYLE: dict[str, tuple[str, str]] = {
    "resid_pre": ("residual stream entering the layer (hook_resid_pre)", "Purples"),
    "resid_post": ("residual stream leaving the layer (hook_resid_post)", "Purples"),
    "mixer_out": ("SSM mixer output (hook_mixer_out)", "Greens"),
    "attn_out": ("attention output (hook_attn_out)", "Reds"),
    "mlp_out": ("MLP output (hook_mlp_out)", "Greens"),
    "post": ("all neurons of the layer (hook_post)", "Greens"),
    "heads": ("one head (attention hook_z, Mamba-2 hook_y)", "Reds"),
    "channels": ("a chosen set of neurons (hook_post)", "Greens"),
    "state": ("SSM state (mixer.hook_ssm_state)", "Blues"),
    "knockout": ("token knocked out of the scan (mixer.hook_y)", "Oranges"),
}
PATCHING_FIGURES = tuple(f"patching_{unit}" for unit in UNIT_STYLE)
"""The PNG stems :func:`plot_patching` may write."""


def _colormap(hue: str) -> Colormap:
    """White at 0, the unit kind's hue (a matplotlib sequential map) up to the largest effect, grey below 0."""
    from matplotlib import colormaps

    dark = colormaps[hue](0.9)
    return LinearSegmentedColormap.from_list(f"patching_{hue}", ["0.35", "white", dark])


def _marked_tokens(prompts: Mapping[str, Any], noise: Mapping[str, Any] | None) -> list[str]:
    """Clean tokens, starred where the corrupted run differs (or noise was added)."""
    clean = [str(t) for t in prompts.get("clean_tokens") or []]
    corrupt = prompts.get("corrupt_tokens") or clean
    marked = set(noise.get("subject_positions") or []) if noise else set()
    marked |= {i for i, (a, b) in enumerate(zip(clean, corrupt, strict=False)) if a != b}
    return [f"{t!r}*" if i in marked else repr(t) for i, t in enumerate(clean)]


def _row_labels(grid: Mapping[str, Any]) -> list[str]:
    heads = grid.get("heads")
    if heads:
        return [f"L{layer} h{head}" for layer, head in zip(grid["layers"], heads, strict=True)]
    return [str(layer) for layer in grid["layers"]]


def _plot_grid(results: Mapping[str, Any], unit: str, grid: Mapping[str, Any], out_dir: str | Path) -> Path:
    patching = results["patching"]
    effect = np.array([[np.nan if v is None else v for v in row] for row in grid["effect"]], dtype=float)
    rows, cols = effect.shape
    tokens = _marked_tokens(patching.get("prompts") or {}, patching.get("noise"))
    labels = [tokens[p] if p < len(tokens) else str(p) for p in grid["positions"]]
    label, hue = UNIT_STYLE.get(unit, (unit, "Purples"))
    fig = Figure(figsize=(max(8.0, 1.5 + 0.5 * cols), max(3.0, 1.8 + 0.3 * rows)), layout="constrained")
    ax = fig.subplots()
    finite = effect[np.isfinite(effect)]
    low = min(-0.05, float(finite.min())) if finite.size else -0.05
    high = max(1.0, float(finite.max())) if finite.size else 1.0
    image = ax.imshow(effect, cmap=_colormap(hue), norm=TwoSlopeNorm(0.0, low, high), aspect="auto",
                      interpolation="nearest")
    ax.set_xticks(range(cols), labels, rotation=60, ha="right", fontsize=8)
    step = max(1, rows // 40)
    ax.set_yticks(range(0, rows, step), _row_labels(grid)[::step], fontsize=7 if rows > 12 else 9)
    ax.set(xlabel="position (token; * = corrupted)", ylabel="layer, head" if grid.get("heads") else "layer")
    fig.colorbar(image, ax=ax, label="fraction of clean metric restored")
    metric = patching.get("metric") or {}
    text = title(results, f"patching ({patching.get('direction', 'denoise')}) the {label}; "
                 f"{metric.get('kind', '?')}: clean {patching.get('clean_metric', float('nan')):.3g}, "
                 f"corrupted {patching.get('corrupt_metric', float('nan')):.3g}")
    fig.suptitle(textwrap.fill(text, width=max(40, int(fig.get_figwidth() * 9.5))), fontsize=12)
    path = Path(out_dir) / f"patching_{unit}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def plot_patching(results: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """One heatmap per unit type of ``results["patching"]["grids"]``: ``patching_<unit>.png``; [] when the
    results hold no patching grid."""
    patching = results.get("patching")
    if not isinstance(patching, dict) or not isinstance(patching.get("grids"), dict):
        return []
    return [_plot_grid(results, unit, grid, out_dir) for unit, grid in patching["grids"].items()
            if isinstance(grid, dict) and grid.get("effect")]


def top_cells(patching: Mapping[str, Any], unit: str, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` cells of largest |effect| of one grid: ("L<layer>[ h<head>] @<position> <token>", effect)."""
    grid = patching["grids"][unit]
    tokens = (patching.get("prompts") or {}).get("clean_tokens") or []
    heads = grid.get("heads")
    cells = sorted(((abs(v), v, i, j) for i, row in enumerate(grid.get("effect") or [])
                    for j, v in enumerate(row) if v is not None), reverse=True)[:k]
    out = []
    for _, value, i, j in cells:
        position = grid["positions"][j]
        token = repr(tokens[position]) if position < len(tokens) else ""
        out.append((f"L{grid['layers'][i]}{f' h{heads[i]}' if heads else ''} @{position} {token}", value))
    return out


def print_patching(patching: Mapping[str, Any], k: int = 5) -> None:
    """The metrics, each grid's ``k`` strongest cells and the attribution agreement, as text."""
    metric = patching["metric"]
    print(f"metric {metric['kind']}: {metric['formula']}; clean {patching['clean_metric']:.4g}, corrupted "
          f"{patching['corrupt_metric']:.4g} ({patching['direction']}; effect = fraction of the clean metric restored)")
    attribution = patching.get("attribution") or {}
    for unit in patching["grids"]:
        shown = ", ".join(f"{label}: {value:+.3f}" for label, value in top_cells(patching, unit, k))
        agree = attribution.get(unit)
        corr = "" if agree is None else (f"  [attribution: Pearson {_fmt(agree.get('pearson'))}, Spearman "
                                         f"{_fmt(agree.get('spearman'))} over {agree.get('cells')} cells]")
        print(f"{unit:>10}: {shown}{corr}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


__all__ = ["PATCHING_FIGURES", "UNIT_STYLE", "plot_patching", "print_patching", "top_cells"]
