"""``mambascope leaderboard``: one figure, ``leaderboard.png``: per task model, each method's value hit@1 (bars,
95 % intervals) beside its knockout effect (dots, right axis), the random baseline's interval as a band.
Reads the results only."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

DPI = 100  # as the other figures (report/figures.py registers this module's plot, so cannot be imported)


def _label(row: Mapping[str, Any]) -> str:
    return str(row.get("method")) + ("" if row.get("layer") is None else f" L{row['layer']}")


def _err(entries: list[Mapping[str, Any]]) -> np.ndarray:
    low = [e["mean"] - (e["low"] if e.get("low") is not None else e["mean"]) for e in entries]
    high = [(e["high"] if e.get("high") is not None else e["mean"]) - e["mean"] for e in entries]
    return np.array([low, high])


def plot_leaderboard(results: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """``leaderboard.png``; [] when the results hold no leaderboard rows."""
    board = results.get("leaderboard")
    models = {k: v for k, v in ((board or {}).get("models") or {}).items() if isinstance(v, dict) and v.get("rows")}
    if not models:
        return []
    n_rows = max(len(m["rows"]) for m in models.values())
    fig = Figure(figsize=(max(7.0, 4.6 * len(models)), 1.6 + 0.24 * n_rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(models), squeeze=False)[0])
    for ax, (name, model) in zip(axes, models.items(), strict=True):
        rows = model["rows"]
        ys = np.arange(len(rows))
        hits = [r["value"]["hit_rate"] for r in rows]
        rand = next((r for r in rows if r["method"] == "random"), None)
        if rand and rand["value"]["hit_rate"].get("high") is not None:
            ax.axvspan(rand["value"]["hit_rate"]["low"], rand["value"]["hit_rate"]["high"], color="0.85")
        ax.barh(ys, [h["mean"] for h in hits], xerr=_err(hits), color="tab:blue", capsize=2, label="value hit@1")
        ax.set_yticks(ys, [_label(r) for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set(xlim=(0, 1.02), xlabel="value hit@1 (95% CI)", title=f"{name} ({model.get('task')})")
        twin = ax.twiny()
        effects = [r["knockout_effect"] for r in rows]
        twin.errorbar([e["mean"] for e in effects], ys, xerr=_err(effects), fmt="o", color="tab:red", ms=3,
                      capsize=2, label="knockout effect")
        twin.set_xlabel("knockout effect of the top token: Δ log p(answer)", color="tab:red", fontsize=8)
    fig.suptitle("attribution leaderboard (grey band: random's hit@1 interval)", fontsize=11)
    path = Path(out_dir) / "leaderboard.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return [path]


__all__ = ["plot_leaderboard"]
