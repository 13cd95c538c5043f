"""Figures of a cross-model comparison: one statistic per figure, one line per model, by relative depth;
each point's marker shows its layer's kind (Mamba, Mamba-2, attention, MLP, MoE)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt
import pandas as pd

# statistic -> axis label; the attention statistics follow mambascope.compare.ATTENTION_STATS
COMPARISON_PLOTS = {
    "pct_dead": "% dead neurons",
    "mean_frequency_alive": "mean activation frequency of alive neurons",
    "pct_positional": "% positional neurons (MI > 0.05)",
    "token_detectors": "token-detector neurons",
    "tokens_covered": "token types covered by detectors",
    "mean_dt_selectivity": "mean Δ selectivity (std of ln Δ)",
    "entropy": "attention row entropy (nats)",
    "mean_distance": "mean attention distance (tokens)",
    "sink_mass": "attention mass on the first token",
    "previous_token_mass": "attention mass on the previous token",
    "local_fraction": "rows with ≥ half their mass in the last k tokens",
}
KIND_MARKERS = {"mamba": "o", "mamba2": "s", "attention": "^", "mlp": "D", "moe": "P"}


def plot_comparison(comparison: dict[str, Any], out_dir: str | Path) -> dict[str, Path | str]:
    """Write ``compare_<statistic>.png`` for every statistic present; returns {statistic: path or reason}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(comparison["layers"])
    written: dict[str, Path | str] = {}
    for stat, label in COMPARISON_PLOTS.items():
        if stat not in table or table[stat].isna().all():
            written[stat] = "no model has this statistic"
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4))
        kinds = table["layer_kind"] if "layer_kind" in table else pd.Series("mamba", index=table.index)
        for name, rows in table.groupby("model", sort=False):
            rows = rows.dropna(subset=[stat]).sort_values("depth")
            if not len(rows):
                continue
            line = ax.plot(rows["depth"], rows[stat], label=f"{name} ({rows['arch'].iloc[0]})")[0]
            for kind, points in rows.groupby(kinds.loc[rows.index], sort=False):
                ax.scatter(points["depth"], points[stat], color=line.get_color(), marker=KIND_MARKERS.get(kind, "x"))
        for kind in dict.fromkeys(kinds.dropna()):  # one legend entry per layer kind shown
            ax.scatter([], [], color="gray", marker=KIND_MARKERS.get(kind, "x"), label=f"{kind} layer")
        ax.set_xlabel("relative depth (layer / (layers − 1))")
        ax.set_ylabel(label)
        ax.set_title(f"{label} by depth")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"compare_{stat}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written[stat] = path
    return written
