"""The seed's 6-panel attention-neuron figure (docs/design.md §6, ``plot_attention_neurons_analysis``).

Panels: (1) activation histogram, (2) top-10 units by importance, (3) activation vs importance,
(4) attention heatmap (the layer's channel-mean hidden attention of window 0 when available, otherwise
the token relevance of window 0 per method), (5) neuron diversity per method, (6) statistics table.
The figure is a ``matplotlib.figure.Figure`` saved to a file (no pyplot: no global figure state, no display,
nothing that blocks a headless run); ``show=True`` also displays the saved image in a notebook (IPython).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

__all__ = ["plot_attention_neurons_analysis"]


def _arr(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=float)


def _normalise(obj: Mapping, layer: int, method: str | None) -> tuple[dict[str, dict], np.ndarray | None, str]:
    """Bring the accepted inputs to {method: {activation, importance, analysis, relevance}} + heatmap."""
    from mambascope.attention_neurons import analyze_neurons

    methods: dict[str, dict] = {}
    heat, heat_title = None, ""
    if "mamba_neurons" in obj:  # integrate_mamba_attention_neurons result
        for m, recs in obj["mamba_neurons"].items():
            if layer in recs:
                rec = recs[layer]
                analysis = obj.get("analysis_results", {}).get(m, {}).get(layer) or analyze_neurons(rec)
                methods[m] = {"activation": _arr(rec["activation"]), "importance": _arr(rec["importance"]),
                              "analysis": analysis, "relevance": _arr(rec["relevance"][0])}
        data = obj.get("attention_data")
        if data is not None and layer in data and "attention_vectors" in data[layer]:
            heat, heat_title = _arr(data[layer]["attention_vectors"][0]), "channel-mean attention (row 0)"
    elif "results" in obj and "layers" in obj:  # run_attention_analysis summary (JSON)
        for m, per in obj["results"].items():
            entry = per.get(str(layer))
            if entry is not None:
                methods[m] = {"activation": _arr(entry["activation"]), "importance": _arr(entry["importance"]),
                              "analysis": entry, "relevance": _arr(entry["relevance_first_window"])}
    elif layer in obj and isinstance(obj[layer], Mapping) and "activation" in obj[layer]:  # {layer: record}
        rec = obj[layer]
        m = rec.get("method") or "method"
        methods[m] = {"activation": _arr(rec["activation"]), "importance": _arr(rec["importance"]),
                      "analysis": analyze_neurons(rec), "relevance": _arr(rec["relevance"][0])}
    else:
        raise ValueError("plot_attention_neurons_analysis needs an integrate_mamba_attention_neurons result, a "
                         "run_attention_analysis summary, or create_mamba_neurons records {layer: record}")
    if not methods:
        raise ValueError(f"no method has results for layer {layer}")
    if method is not None and method not in methods:
        raise ValueError(f"method {method!r} has no results for layer {layer} (have: {', '.join(methods)})")
    if heat is None:
        # one row per method; methods differ in scale and sign, so each row is divided by its max |value|
        rows = [methods[m]["relevance"] for m in methods]
        heat = np.stack([r / (np.abs(r).max() or 1.0) for r in rows])
        heat_title = "token relevance at the query, window 0 (row / max|row|)"
    return methods, heat, heat_title


def plot_attention_neurons_analysis(
    result_or_neurons: Mapping,
    layer_idx: int,
    path: str | Path,
    *,
    method: str | None = None,
    attention: Any | None = None,
    show: bool = False,
) -> Path:
    """Save the 6-panel figure for ``layer_idx`` to ``path`` and return the path.

    ``result_or_neurons``: an ``integrate_mamba_attention_neurons`` result, a ``run_attention_analysis``
    summary (JSON dict), or ``create_mamba_neurons`` records ``{layer: record}``.  Panels 1–3 show
    ``method`` (default: the first available); ``attention`` [L, L] overrides the heatmap.
    """
    methods, heat, heat_title = _normalise(result_or_neurons, layer_idx, method)
    if attention is not None:
        heat, heat_title = _arr(attention), "channel-mean attention (row 0)"
    is_matrix = heat_title.startswith("channel-mean attention")
    primary = method or next(iter(methods))
    m = methods[primary]
    act, imp, analysis = m["activation"], m["importance"], m["analysis"]
    unit = analysis.get("unit") or "unit"

    fig = Figure(figsize=(17, 10), layout="tight")
    axes = fig.subplots(2, 3)
    fig.suptitle(f"Attention neurons, layer {layer_idx} — {primary}")
    ax = axes[0, 0]
    ax.hist(act, bins=min(50, max(5, act.size // 4)), color="tab:blue", alpha=0.8)
    ax.set(title="activation distribution", xlabel="activation", ylabel=f"{unit}s")

    ax = axes[0, 1]
    top = analysis["top_neurons"]
    ax.bar(range(len(top["indices"])), top["importance"], color="tab:orange")
    ax.set_xticks(range(len(top["indices"])), [str(i) for i in top["indices"]], rotation=45)
    ax.set(title=f"top {len(top['indices'])} {unit}s by importance", xlabel=unit, ylabel="importance")

    ax = axes[0, 2]
    ax.scatter(act, imp, s=8, alpha=0.6)
    ax.set(title="activation vs importance", xlabel="activation", ylabel="importance")

    ax = axes[1, 0]
    im = ax.imshow(heat, aspect="auto", cmap="viridis" if is_matrix else "coolwarm", interpolation="nearest",
                   **({} if is_matrix else {"vmin": -1, "vmax": 1}))
    fig.colorbar(im, ax=ax)
    ax.set_title(heat_title, fontsize=9)
    ax.set(xlabel="key position", ylabel="query position" if is_matrix else "")
    if not is_matrix:
        ax.set_yticks(range(len(methods)), list(methods), fontsize=8)

    ax = axes[1, 1]
    names = list(methods)
    div = [methods[n]["analysis"].get("neuron_diversity") for n in names]
    ax.bar(names, [np.nan if d is None else d for d in div], color="tab:green")
    ax.set_ylim(0, 1.05)
    ax.set(title="neuron diversity (normalised importance entropy)", ylabel="diversity")
    ax.tick_params(axis="x", rotation=30)

    ax = axes[1, 2]
    ax.axis("off")
    cells = []
    for n in names:
        a = methods[n]["analysis"]
        d = a.get("neuron_diversity")
        cells.append([n, str(a["num_neurons"]), f"{a['mean_activation']:.3g}", f"{a['activation_std']:.3g}",
                      "n/a" if d is None else f"{d:.3f}", str(a["top_neurons"]["indices"][0])])
    table = ax.table(cellText=cells, colLabels=["method", unit + "s", "mean act.", "std act.", "diversity", "top"],
                     loc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.4)
    ax.set_title("statistics")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    if show:
        _display(path)
    return path


def _display(path: Path) -> None:
    """The saved figure shown inline in a notebook; elsewhere a warning naming the file (never a blocking window)."""
    try:
        from IPython.display import Image, display
    except ImportError:
        warnings.warn(f"show=True displays the figure in a notebook (IPython), which is not installed; the figure "
                      f"is at {path}", stacklevel=3)
        return
    display(Image(filename=str(path)))
