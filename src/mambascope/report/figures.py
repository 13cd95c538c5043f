"""Matplotlib figures of a results dict (docs/design.md §5, §8): PNG files, Agg rendering, nothing shown.

Every ``plot_*`` function takes the results dict (``results.json`` as loaded by ``load_results``) and an
output directory, writes one PNG (a few write one per layer) and returns its path(s).  A figure whose
data is absent raises :class:`FigureSkipped` with the reason (the recorded error from
``results["errors"]`` where there is one); nothing is ever drawn from placeholder data.
:func:`create_comprehensive_report` draws every figure the results support and returns the paths, with
the reasons for the others in ``.skipped``.

Figures are drawn on :class:`matplotlib.figure.Figure` objects directly (no pyplot state, no display),
each titled with the model and the layer(s) it shows.
"""

from __future__ import annotations

import logging
import math
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from mambascope.report._access import (
    arch,
    attention_part,
    detector_tokens_by_layer,
    faithfulness_part,
    finite,
    layer_items,
    missing_reason,
    num,
    part,
    title,
)

log = logging.getLogger(__name__)

__all__ = [
    "FIGURES",
    "FigureSet",
    "FigureSkipped",
    "create_comprehensive_report",
    "plot_ablation",
    "plot_attention_diversity",
    "plot_attention_neurons",
    "plot_dead_neurons",
    "plot_dead_sensitivity",
    "plot_delta_selectivity",
    "plot_faithfulness_curves",
    "plot_faithfulness_neurons",
    "plot_ground_truth",
    "plot_hidden_attention",
    "plot_ngram_coverage",
    "plot_overlap",
    "plot_positional_frequency",
    "plot_positional_mi",
    "plot_pruning",
    "plot_token_detectors",
]

DPI = 100
GROUP_LABELS = {"dead": "dead", "rarely_active": "rarely active", "positional": "positional",
                "token_detector": "token detector", "delta_sensitive": "Δ-sensitive"}


class FigureSkipped(Exception):
    """A figure that cannot be drawn from these results; ``str(exc)`` is the reason."""


class FigureSet(list):
    """The paths of the figures written (a ``list[Path]``), plus ``skipped`` {figure name: reason}."""

    def __init__(self, paths: list[Path] | None = None, skipped: dict[str, str] | None = None) -> None:
        super().__init__(paths or [])
        self.skipped: dict[str, str] = dict(skipped or {})


# ----------------------------------------------------------------------------------------------- helpers

def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (11.0, 4.5)) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _suptitle(fig: Figure, text: str) -> None:
    """The figure title, wrapped to the figure's width so it is never cut off."""
    fig.suptitle(textwrap.fill(text, width=max(40, int(fig.get_figwidth() * 9.5))), fontsize=12)


def _save(fig: Figure, out_dir: str | Path, name: str) -> Path:
    path = Path(out_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _layers_or_skip(results: Mapping[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    layers = layer_items(results)
    if not layers:
        raise FigureSkipped(f"no neuron census: {missing_reason(results, 'census')}")
    return layers


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(max_cols, n)
    return math.ceil(n / cols), cols


def _layer_kinds(results: Mapping[str, Any]) -> dict[int, str]:
    """layer -> kind (``mamba2``, ``attention``, ...) for a hybrid whose layers differ; empty otherwise."""
    model = results.get("model")
    kinds = model.get("layer_kinds") if isinstance(model, dict) else None
    return dict(enumerate(kinds)) if kinds and len(set(kinds)) > 1 else {}


def _layer_ticks(ax: Any, layers: list[int], results: Mapping[str, Any]) -> None:
    step = max(1, math.ceil(len(layers) / 24))
    ticks = layers[::step]
    ax.set_xticks(ticks)
    kinds = _layer_kinds(results)
    if kinds:  # a hybrid: every tick says the layer's kind
        ax.set_xticklabels([f"{layer}\n{kinds.get(layer, '')}" for layer in ticks], fontsize=7)
    ax.set_xlabel("layer (kind)" if kinds else "layer")


def _hide_unused(axes: np.ndarray, used: int) -> None:
    for ax in axes.flat[used:]:
        ax.set_visible(False)


def _neuron_word(results: Mapping[str, Any]) -> str:
    a = arch(results)
    if a in ("mamba", "mamba2", "falcon_mamba"):
        return "mixer neurons (hook_post)"
    return "MLP neurons" if a in ("gpt2", "gpt_neox", "llama") else "neurons (mixer or MLP hook_post, by layer kind)"


# --------------------------------------------------------------------------------------- census figures

def plot_dead_neurons(results: Mapping[str, Any], out_dir: str | Path) -> Path:
    """% dead and % rarely active neurons by layer, and the mean activation frequency of the alive
    neurons by layer (Voita et al. 2023, Fig. 1a/1b)."""
    layers = _layers_or_skip(results)
    xs = [layer for layer, _ in layers]
    pct_dead = [num(r.get("pct_dead")) for _, r in layers]
    if all(v is None for v in pct_dead):
        raise FigureSkipped("the census layers carry no pct_dead")
    pct_rare = []
    for _, r in layers:
        n = r.get("n_neurons")
        pct_rare.append(100.0 * len(r.get("rarely_active") or []) / n if n else None)
    alive = [num(r.get("mean_frequency_alive")) for _, r in layers]
    tokens = layers[0][1].get("tokens")
    rare = (layers[0][1].get("activity") or {}).get("rare_threshold")
    fig, axes = _figure(1, 2)
    ax = axes[0, 0]
    if all(not v for v in [*pct_dead, *pct_rare]):  # bars of height 0 would draw empty axes, y from −0.05
        ax.set_axis_off()
        where = f"layer {xs[0]}" if len(xs) == 1 else f"layers {xs[0]}–{xs[-1]}"
        ax.text(0.5, 0.5, f"no dead neurons (active on 0 of {tokens} tokens)\nand no rarely active neurons "
                f"(frequency < {_pct(rare)})\nin {where}", ha="center", va="center", fontsize=11,
                transform=ax.transAxes)
    else:
        width = 0.4
        ax.bar(np.array(xs) - width / 2, [np.nan if v is None else v for v in pct_dead], width, label="dead",
               color="tab:red")
        ax.bar(np.array(xs) + width / 2, [np.nan if v is None else v for v in pct_rare], width,
               label="rarely active", color="tab:orange")
        ax.set_ylim(bottom=0)
        ax.set_ylabel("% of neurons")
        ax.set_title(f"dead (never active on {tokens} tokens) and rarely active")
        ax.legend()
        _layer_ticks(ax, xs, results)
    ax = axes[0, 1]
    ax.plot(xs, [np.nan if v is None else v for v in alive], marker="o", color="tab:blue")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("mean activation frequency")
    ax.set_title("mean frequency of the alive neurons")
    _layer_ticks(ax, xs, results)
    _suptitle(fig, title(results, f"dead and rarely active {_neuron_word(results)} by layer"))
    return _save(fig, out_dir, "dead_neurons")


def plot_dead_sensitivity(results: Mapping[str, Any], out_dir: str | Path) -> Path:
    """% dead neurons as a function of the |post| threshold of the magnitude rule, one line per layer."""
    layers = _layers_or_skip(results)
    curves = [(layer, (r.get("activity") or {}).get("dead_sensitivity")) for layer, r in layers]
    curves = [(layer, c) for layer, c in curves if isinstance(c, dict) and c.get("thresholds")]
    if not curves:
        raise FigureSkipped("the census has no dead-neuron sensitivity curve (activity.dead_sensitivity)")
    fig, axes = _figure(1, 1, (9.0, 5.0))
    ax = axes[0, 0]
    cmap = _cmap("viridis")
    for i, (layer, c) in enumerate(curves):
        ax.plot(c["thresholds"], [np.nan if v is None else v for v in c["pct_dead"]], marker=".",
                color=cmap(i / max(1, len(curves) - 1)), label=f"layer {layer}")
    ax.set_xscale("log")
    ax.set_xlabel("threshold θ on |post| (dead = |post| ≤ θ on every token)")
    ax.set_ylabel("% dead neurons")
    ax.legend(ncol=max(1, math.ceil(len(curves) / 12)), fontsize=8)
    _suptitle(fig, title(results, "dead-neuron sensitivity to the activity threshold, layers "
                       f"{curves[0][0]}–{curves[-1][0]}"))
    return _save(fig, out_dir, "dead_sensitivity")


def plot_positional_mi(results: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Positional neurons by layer: the count above the MI threshold and the distribution of the MI."""
    layers = _layers_or_skip(results)
    xs = [layer for layer, _ in layers]
    dists = [finite(r.get("positional_mi")) for _, r in layers]
    if not any(dists):
        raise FigureSkipped("the census layers carry no positional_mi")
    pos = layers[0][1].get("positional") or {}
    threshold, alpha = num(pos.get("positional_threshold")), num(pos.get("positional_alpha"))
    counts = [len(r.get("positional_neurons") or []) for _, r in layers]
    fig, axes = _figure(1, 2)
    ax = axes[0, 0]
    ax.bar(xs, counts, color="tab:purple")
    ax.set_ylabel("positional neurons")
    rule = f"I > {threshold if threshold is not None else 'threshold'}"
    if alpha is not None:  # results with the bias-corrected I and the permutation test
        rule = f"corrected {rule}, p < {alpha:g}; {pos.get('median_tokens_per_position')} tokens/position"
    ax.set_title(f"neurons with {rule}", fontsize=9)
    ax.set_ylim(0, max(1, max(counts)) * 1.05)  # a row of zero counts still reads as zero
    _layer_ticks(ax, xs, results)
    ax = axes[0, 1]
    present = [(x, d) for x, d in zip(xs, dists, strict=True) if d]
    ax.boxplot([d for _, d in present], positions=[x for x, _ in present], widths=0.6, showfliers=True,
               flierprops={"markersize": 2})
    if threshold is not None:
        ax.axhline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold}")
        ax.legend()
    ax.set_ylabel(("bias-corrected " if alpha is not None else "") + "I(active; position) [nats]")
    ax.set_title("distribution over neurons")
    _layer_ticks(ax, xs, results)
    _suptitle(fig, title(results, "positional information by layer"))
    return _save(fig, out_dir, "positional_mi")


def plot_positional_frequency(results: Mapping[str, Any], out_dir: str | Path, top: int = 5) -> Path:
    """Per-position activation frequency of each layer's ``top`` highest-MI neurons (one panel per layer)."""
    layers = _layers_or_skip(results)
    panels = []
    for layer, r in layers:
        pt = (r.get("positional") or {}).get("positional_top")
        if isinstance(pt, dict) and pt.get("neurons") and pt.get("frequency_by_position"):
            panels.append((layer, r, pt))
    if not panels:
        raise FigureSkipped("the census has no per-position frequencies (positional.positional_top)")
    rows, cols = _grid(len(panels))
    fig, axes = _figure(rows, cols, (max(8.0, 4.2 * cols), 3.0 * rows + 0.8))
    for ax, (layer, r, pt) in zip(axes.flat, panels, strict=False):
        positions = pt.get("positions") or list(range(len(pt["frequency_by_position"][0])))
        flagged = set(r.get("positional_neurons") or [])
        for neuron, mi, freq in list(zip(pt["neurons"], pt.get("mi") or [None] * len(pt["neurons"]),
                                         pt["frequency_by_position"], strict=False))[:top]:
            flag = "*" if neuron in flagged else ""  # the census's decision (threshold and, now, the test)
            ax.plot(positions, [np.nan if v is None else v for v in freq], linewidth=1.2,
                    label=f"N{neuron}{flag} I={mi:.3g}" if mi is not None else f"N{neuron}")
        ax.set_title(f"layer {layer}", fontsize=10)
        ax.set_xlabel("position in window")
        ax.set_ylabel("activation frequency")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    _hide_unused(axes, len(panels))
    _suptitle(fig, title(results, f"per-position frequency of the top-{top} positional neurons "
                       "(* = positional)"))
    return _save(fig, out_dir, "positional_frequency")


def plot_token_detectors(results: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Token detectors by layer, and the tokens they cover: per layer, new vs earlier layers, cumulative."""
    layers = _layers_or_skip(results)
    xs = [layer for layer, _ in layers]
    counts = [len(r.get("token_detectors") or []) for _, r in layers]
    cover = [entry for _, entry in detector_tokens_by_layer(results)]
    fig, axes = _figure(1, 2)
    ax = axes[0, 0]
    ax.bar(xs, counts, color="tab:green")
    ax.set_ylabel("token-detector neurons")
    crit = (layers[0][1].get("detectors") or {}).get("criteria") or {}
    ax.set_title(f"token detectors (≤ {crit.get('max_types', 5)} types cover ≥ {_pct(crit.get('coverage', 0.95))} "
                 "of activations)", fontsize=10)
    _layer_ticks(ax, xs, results)
    ax = axes[0, 1]
    width = 0.4
    ax.bar(np.array(xs) - width / 2, [c["covered"] for c in cover], width, label="covered in layer",
           color="tab:olive")
    ax.bar(np.array(xs) + width / 2, [c["n_new"] for c in cover], width, label="new vs earlier layers",
           color="tab:cyan")
    ax.plot(xs, [c["cumulative"] for c in cover], marker="o", color="black", label="cumulative")
    ax.set_ylabel("token types")
    ax.set_title("tokens covered by detectors")
    ax.legend()
    _layer_ticks(ax, xs, results)
    _suptitle(fig, title(results, "token-detector neurons by layer"))
    return _save(fig, out_dir, "token_detectors")


def plot_ngram_coverage(results: Mapping[str, Any], out_dir: str | Path) -> Path:
    """n-grams (n = 1, 2, 3) needed to cover 95% of a neuron's activations: median and quartiles by layer."""
    layers = _layers_or_skip(results)
    series: dict[str, list[tuple[int, float, float, float]]] = {}
    for layer, r in layers:
        cov = (r.get("detectors") or {}).get("ngram_coverage")
        if not isinstance(cov, dict):
            continue
        for n, entry in cov.items():
            if isinstance(entry, dict) and num(entry.get("median")) is not None:
                q = entry.get("quantiles") or {}
                lo, hi = num(q.get("0.25")), num(q.get("0.75"))
                med = float(entry["median"])
                series.setdefault(str(n), []).append((layer, med, med if lo is None else lo, med if hi is None else hi))
    if not series:
        raise FigureSkipped("the census has no n-gram coverage curves (detectors.ngram_coverage)")
    fig, axes = _figure(1, 1, (9.0, 4.8))
    ax = axes[0, 0]
    for n in sorted(series, key=int):
        pts = series[n]
        x = [p[0] for p in pts]
        ax.plot(x, [p[1] for p in pts], marker="o", label=f"n = {n} (median)")
        ax.fill_between(x, [p[2] for p in pts], [p[3] for p in pts], alpha=0.2)
    crit = (layers[0][1].get("detectors") or {}).get("criteria") or {}
    ax.set_ylabel(f"distinct n-grams for {_pct(crit.get('coverage', 0.95))} of activations")
    ax.legend()
    _layer_ticks(ax, [layer for layer, _ in layers], results)
    _suptitle(fig, title(results, "n-gram coverage of neuron activations by layer (band: quartiles)"))
    return _save(fig, out_dir, "ngram_coverage")


def plot_delta_selectivity(results: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Mamba only: Δ selectivity (std of ln Δ over tokens) per channel/head by layer, and mean ln Δ."""
    a = arch(results)
    if a == "gpt2":
        raise FigureSkipped("not applicable: GPT-2 has no Δ (selective-scan step size)")
    layers = _layers_or_skip(results)
    present = [(layer, r["delta"]) for layer, r in layers if isinstance(r.get("delta"), dict)
               and finite(r["delta"].get("selectivity"))]
    if not present:
        raise FigureSkipped("the census layers carry no Δ statistics (delta is null)")
    unit = present[0][1].get("unit") or "channel"
    xs = [layer for layer, _ in present]
    fig, axes = _figure(1, 2)
    ax = axes[0, 0]
    ax.boxplot([finite(d["selectivity"]) for _, d in present], positions=xs, widths=0.6,
               flierprops={"markersize": 2})
    for layer, r in layers:
        top = [num(t.get("selectivity")) for t in r.get("delta_sensitive") or []]
        top = [t for t in top if t is not None]
        if top:
            ax.scatter([layer] * len(top), top, s=10, color="tab:red", zorder=3)
    ax.set_ylabel("selectivity = std of ln Δ over tokens")
    ax.set_title(f"per {unit} (red: the top-k Δ-sensitive)")
    _layer_ticks(ax, xs, results)
    ax = axes[0, 1]
    logs = [(layer, finite(d.get("mean_log"))) for layer, d in present]
    logs = [(layer, v) for layer, v in logs if v]
    if logs:
        ax.boxplot([v for _, v in logs], positions=[layer for layer, _ in logs], widths=0.6,
                   flierprops={"markersize": 2})
        ax.set_ylabel("mean ln Δ")
        ax.set_title(f"typical step size per {unit}")
        _layer_ticks(ax, [layer for layer, _ in logs], results)
    else:
        ax.set_visible(False)
    _suptitle(fig, title(results, "Δ selectivity by layer"))
    return _save(fig, out_dir, "delta_selectivity")


def plot_overlap(results: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Jaccard index between the neuron groups, pooled over the layers (intersections and unions summed)."""
    layers = _layers_or_skip(results)
    overlaps = [(layer, r["overlap"]) for layer, r in layers if isinstance(r.get("overlap"), dict)
                and r["overlap"].get("groups") and r["overlap"].get("intersection")]
    if not overlaps:
        raise FigureSkipped("the census layers carry no group overlap")
    names = list(overlaps[0][1]["groups"])
    G = len(names)
    inter = np.zeros((G, G))
    for _, ov in overlaps:
        if list(ov["groups"]) != names:
            raise FigureSkipped("the layers' overlap tables name different groups")
        inter += np.array(ov["intersection"], dtype=float)
    size = np.diag(inter)
    union = size[:, None] + size[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        jac = np.where(union > 0, inter / np.where(union > 0, union, 1), np.nan)
    fig, axes = _figure(1, 1, (7.5, 6.2))
    ax = axes[0, 0]
    im = ax.imshow(np.ma.masked_invalid(jac), vmin=0, vmax=1, cmap="Blues")
    labels = [f"{GROUP_LABELS.get(n, n)}\n({int(s)})" for n, s in zip(names, size, strict=True)]
    ax.set_xticks(range(G), labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(G), labels, fontsize=8)
    for i in range(G):
        for j in range(G):
            text = "n/a" if np.isnan(jac[i, j]) else f"{jac[i, j]:.2f}\n{int(inter[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if not np.isnan(jac[i, j]) and jac[i, j] > 0.6 else "black")
    fig.colorbar(im, ax=ax, label="Jaccard |a∩b| / |a∪b|")
    span = (f"layer {overlaps[0][0]}" if len(overlaps) == 1
            else f"layers {overlaps[0][0]}–{overlaps[-1][0]} pooled")
    ax.set_title("cells: Jaccard and shared neurons (n/a: both groups empty)", fontsize=9)
    _suptitle(fig, title(results, f"overlap of neuron groups, {span}"))
    return _save(fig, out_dir, "overlap")


# ----------------------------------------------------------------------------------- interventions

def plot_ablation(results: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Held-out Δloss when each group is zero- or mean-ablated, next to random groups of the same size
    (bar: the random draws' mean, error bar: their std)."""
    ab = part(results, "ablation")
    if not ab or not isinstance(ab.get("groups"), dict):
        raise FigureSkipped(f"no ablation results: {missing_reason(results, 'ablation')}")
    names = list(ab["groups"])
    base = num(ab.get("baseline_loss"))
    fig, axes = _figure(1, 1, (11.0, 5.0))
    ax = axes[0, 0]
    width = 0.2
    colors = {"zero": "tab:red", "mean": "tab:blue"}
    drawn = False
    for i, name in enumerate(names):
        g = ab["groups"][name]
        if "skipped" in g and not any(m in g for m in ("zero", "mean")):
            ax.text(i, 0, f"not ablated:\n{g['skipped']}", ha="center", va="bottom", fontsize=8, color="dimgray")
            continue
        for j, mode in enumerate(("zero", "mean")):
            entry = g.get(mode)
            if not isinstance(entry, dict):
                continue
            x = i + (j - 0.5) * 2 * width
            delta = num(entry.get("delta"))
            rnd = entry.get("random") or {}
            rmean, rstd = num(rnd.get("mean")), num(rnd.get("std"))
            ax.bar(x - width / 2, np.nan if delta is None else delta, width, color=colors[mode],
                   label=f"{mode}-ablated group" if not drawn else None)
            if rmean is not None and base is not None:
                # a null std (undefined spread) gets no error bar, never a zero-length one
                ax.bar(x + width / 2, rmean - base, width, color=colors[mode], alpha=0.35, hatch="//",
                       yerr=rstd, capsize=3, label=f"{mode}: random, same size (±std)" if not drawn else None)
        drawn = True
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)),
                  [f"{GROUP_LABELS.get(n, n)}\n({ab['groups'][n].get('neurons', '?')} neurons)" for n in names],
                  fontsize=9)
    ax.set_ylabel("Δ held-out loss [nats/token]")
    ax.legend(fontsize=8)
    draws = ab.get("draws")
    ax.set_title(f"baseline {base:.4f} nats/token on {ab.get('tokens')} held-out tokens; random control: "
                 f"{draws} draws" if base is not None else "", fontsize=9)
    _suptitle(fig, title(results, "ablation of neuron groups, all census layers"))
    return _save(fig, out_dir, "ablation")


def plot_pruning(results: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Held-out loss against the pruned ratio: priority pruning vs random pruning (mean ± std)."""
    pr = part(results, "pruning")
    if not pr or not isinstance(pr.get("ratios"), dict) or not pr["ratios"]:
        raise FigureSkipped(f"no pruning results: {missing_reason(results, 'pruning')}")
    items = sorted(((float(k), v) for k, v in pr["ratios"].items()), key=lambda kv: kv[0])
    ratios = [r for r, _ in items]
    fig, axes = _figure(1, 1, (8.5, 5.0))
    ax = axes[0, 0]
    ax.plot(ratios, [np.nan if num(v.get("loss")) is None else v["loss"] for _, v in items], marker="o",
            color="tab:red", label="pruned by priority")
    rmean = [num((v.get("random") or {}).get("mean")) for _, v in items]
    rstd = [num((v.get("random") or {}).get("std")) for _, v in items]
    ax.errorbar(ratios, [np.nan if m is None else m for m in rmean], yerr=_nan(rstd), marker="s", capsize=4,
                color="tab:gray", label="pruned at random (mean ± std)")  # NaN: no bar where the std is null
    base = num(pr.get("baseline_loss"))
    if base is not None:
        ax.axhline(base, color="black", linestyle="--", linewidth=1, label=f"unpruned {base:.4f}")
    ax.set_xlabel("fraction of each layer's neurons pruned (zeroed)")
    ax.set_ylabel("held-out loss [nats/token]")
    ax.legend(fontsize=8)
    if pr.get("priority"):
        ax.set_title(f"priority: {pr['priority']}", fontsize=8)
    _suptitle(fig, title(results, "pruning, all census layers"))
    return _save(fig, out_dir, "pruning")


# ------------------------------------------------------------------------- attention neurons, faithfulness

def _attention_or_skip(results: Mapping[str, Any]) -> dict[str, Any]:
    att = attention_part(results)
    if not att:
        raise FigureSkipped(f"no attention-neuron results: {missing_reason(results, 'attention_neurons')}")
    per_method = att.get("results")
    if not isinstance(per_method, dict) or not any(isinstance(v, dict) and v for v in per_method.values()):
        errs = att.get("errors") or {}
        why = "; ".join(f"{k}: {v}" for k, v in errs.items()) if errs else "no method has results"
        raise FigureSkipped(f"attention-neuron analysis has no per-method results ({why})")
    return att


def plot_attention_neurons(results: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """The seed's 6-panel attention-neuron figure for every analysed layer (``attention_plots``, another
    module's ``plot_attention_neurons_analysis``), one PNG per layer."""
    att = _attention_or_skip(results)
    try:
        from mambascope.report.attention_plots import plot_attention_neurons_analysis
    except ImportError as exc:
        raise FigureSkipped(f"plot_attention_neurons_analysis is not available: {exc}") from exc
    layers = sorted({int(layer) for per in att["results"].values() if isinstance(per, dict) for layer in per})
    paths = []
    for layer in layers:
        path = Path(out_dir) / f"attention_neurons_L{layer}.png"
        paths.append(Path(plot_attention_neurons_analysis(att, layer, path)))
    return paths


def plot_attention_diversity(results: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Neuron diversity (normalised importance entropy) and mean activation per method by layer."""
    att = _attention_or_skip(results)
    fig, axes = _figure(1, 2)
    unit = "unit"
    for method, per in att["results"].items():
        if not isinstance(per, dict) or not per:
            continue
        pts = sorted((int(layer), e) for layer, e in per.items() if isinstance(e, dict))
        unit = pts[0][1].get("unit") or unit
        axes[0, 0].plot([p[0] for p in pts], [np.nan if num(e.get("neuron_diversity")) is None
                                               else e["neuron_diversity"] for _, e in pts], marker="o", label=method)
        axes[0, 1].plot([p[0] for p in pts], [np.nan if num(e.get("mean_activation")) is None
                                               else e["mean_activation"] for _, e in pts], marker="o", label=method)
    axes[0, 0].set_ylim(0, 1.05)
    axes[0, 0].set_ylabel("neuron diversity H(p)/ln U")
    axes[0, 1].set_ylabel(f"mean activation per {unit}")
    for ax in axes.flat:
        ax.set_xlabel("layer")
        ax.legend(fontsize=8)
    _suptitle(fig, title(results, f"attention neurons ({unit}s) by layer and method"))
    return _save(fig, out_dir, "attention_diversity")


def plot_hidden_attention(results: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Hidden attention as recorded: channel-mean matrices (``attention_vectors`` [L][L] per layer) when
    the results carry them, else each method's token relevance of window 0 at the query (rows: method ×
    layer, each row scaled to its max |value|)."""
    att = attention_part(results)
    if not att:
        raise FigureSkipped(f"no attention-neuron results: {missing_reason(results, 'attention_neurons')}")
    vectors = att.get("attention_vectors")
    if isinstance(vectors, dict) and vectors:
        mats = []
        for layer, m in sorted(vectors.items(), key=lambda kv: int(kv[0])):
            arr = np.array([[np.nan if v is None else v for v in row] for row in m], dtype=float)
            if arr.ndim == 3:  # [batch, L, L]: the first window
                arr = arr[0]
            if arr.ndim == 2 and arr.size:
                mats.append((int(layer), arr))
        if mats:
            rows, cols = _grid(len(mats), 3)
            fig, axes = _figure(rows, cols, (max(7.5, 4.6 * cols), 4.0 * rows + 0.8))
            for ax, (layer, arr) in zip(axes.flat, mats, strict=False):
                im = ax.imshow(arr, cmap="viridis", interpolation="nearest")
                fig.colorbar(im, ax=ax)
                ax.set(title=f"layer {layer}", xlabel="key position s", ylabel="query position t")
            _hide_unused(axes, len(mats))
            _suptitle(fig, title(results, "hidden attention α[t, s], channel mean, window 0"))
            return _save(fig, out_dir, "hidden_attention")
    per_method = att.get("results")
    rows_data, labels = [], []
    if isinstance(per_method, dict):
        for method, per in per_method.items():
            for layer, entry in sorted((per or {}).items(), key=lambda kv: int(kv[0])):
                rel = entry.get("relevance_first_window") if isinstance(entry, dict) else None
                vals = [np.nan if v is None else float(v) for v in rel or []]
                if vals and np.isfinite(vals).any():
                    peak = np.nanmax(np.abs(vals))
                    rows_data.append(np.array(vals) / peak if peak > 0 else np.array(vals))
                    labels.append(f"{method}, L{layer}")
    if not rows_data:
        raise FigureSkipped("the attention results carry neither attention_vectors nor relevance maps")
    width = max(len(r) for r in rows_data)
    mat = np.full((len(rows_data), width), np.nan)
    for i, r in enumerate(rows_data):
        mat[i, :len(r)] = r
    fig, axes = _figure(1, 1, (11.0, 1.2 + 0.35 * len(labels)))
    ax = axes[0, 0]
    im = ax.imshow(np.ma.masked_invalid(mat), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1,
                   interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("context position (window 0)")
    fig.colorbar(im, ax=ax, label="relevance / max |relevance|")
    query = att.get("query", "last token")
    _suptitle(fig, title(results, f"token relevance at the query ({query}), per method and layer"))
    return _save(fig, out_dir, "hidden_attention")


def _faith_or_skip(results: Mapping[str, Any], level: str) -> dict[str, Any]:
    faith = faithfulness_part(results)
    if not faith:
        raise FigureSkipped(f"no faithfulness results: {missing_reason(results, 'faithfulness')}")
    data = faith.get(level)
    if not isinstance(data, dict) or not isinstance(data.get("methods"), dict):
        errs = faith.get("errors") or {}
        why = errs.get(level) or "; ".join(f"{k}: {v}" for k, v in errs.items()) or f"no '{level}' entry"
        raise FigureSkipped(f"no {level}-level faithfulness results ({why})")
    return data


def plot_faithfulness_curves(results: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Token-level perturbation curves per layer: log p(target) as the most (MoRF, solid) or least (LeRF,
    dashed) relevant context tokens are masked, per method, with the random ranking in grey; the whole-model
    methods (LRP, gradient × input, …) in a panel of their own."""
    tok = _faith_or_skip(results, "token")
    fractions = tok.get("fractions")
    if not fractions:
        raise FigureSkipped("token-level faithfulness has no fractions")
    layers = sorted({int(layer) for per in tok["methods"].values() if isinstance(per, dict) for layer in per})
    panels: list[tuple[str, dict[str, Any]]] = [
        (f"layer {layer}", {m: (per or {}).get(str(layer)) for m, per in tok["methods"].items()}) for layer in layers]
    if tok.get("whole_model"):
        panels.append(("whole-model methods", tok["whole_model"]))
    if not panels:
        raise FigureSkipped("token-level faithfulness has no curves")
    rows, cols = _grid(len(panels), 3)
    fig, axes = _figure(rows, cols, (max(7.5, 5.2 * cols), 4.0 * rows + 0.8))
    cmap = _cmap("tab10")
    rnd = tok.get("random") or {}
    for ax, (name, entries) in zip(axes.flat, panels, strict=False):
        for i, (method, entry) in enumerate(entries.items()):
            if not isinstance(entry, dict):
                continue
            diff = num(entry.get("difference"))
            label = f"{method} (LeRF−MoRF area {diff:.3g})" if diff is not None else method
            ax.plot(fractions, _nan(entry.get("morf")), color=cmap(i), label=label)
            ax.plot(fractions, _nan(entry.get("lerf")), color=cmap(i), linestyle="--")
        if rnd.get("morf"):
            diff = num(rnd.get("difference"))
            ax.plot(fractions, _nan(rnd["morf"]), color="gray",
                    label=f"random ({diff:.3g})" if diff is not None else "random")
            ax.plot(fractions, _nan(rnd.get("lerf")), color="gray", linestyle="--")
        ax.set(title=name, xlabel="fraction of context masked", ylabel="log p(target)")
        ax.legend(fontsize=7)
    _hide_unused(axes, len(panels))
    _suptitle(fig, title(results, "faithfulness: MoRF (solid) / LeRF (dashed) token perturbation"))
    return _save(fig, out_dir, "faithfulness_curves")


def plot_faithfulness_neurons(results: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Neuron-level faithfulness: held-out Δloss when each method's top-k units are zero-ablated, against
    k random units (mean ± std of the draws), per layer."""
    neu = _faith_or_skip(results, "neuron")
    layers = sorted({int(layer) for per in neu["methods"].values() if isinstance(per, dict) for layer in per})
    if not layers:
        raise FigureSkipped("neuron-level faithfulness has no per-layer rows")
    rows, cols = _grid(len(layers), 3)
    fig, axes = _figure(rows, cols, (max(7.5, 5.2 * cols), 4.0 * rows + 0.8))
    methods = list(neu["methods"])
    cmap = _cmap("tab10")
    for ax, layer in zip(axes.flat, layers, strict=False):
        labels, values, colors = [], [], []
        k = None
        for i, method in enumerate(methods):
            entry = (neu["methods"].get(method) or {}).get(str(layer))
            if isinstance(entry, dict):
                labels.append(method)
                values.append(np.nan if num(entry.get("delta")) is None else entry["delta"])
                colors.append(cmap(i))
                k = entry.get("k", k)
        ax.bar(range(len(labels)), values, color=colors)
        rnd = (neu.get("random") or {}).get(str(layer))
        if isinstance(rnd, dict) and num(rnd.get("delta_mean")) is not None:
            ax.bar(len(labels), rnd["delta_mean"], color="gray", yerr=num(rnd.get("delta_std")), capsize=4)
            labels.append("random")
            k = rnd.get("k", k)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=8)
        ax.set(title=f"layer {layer}: top-{k} {neu.get('unit', 'unit')}s ablated", ylabel="Δ held-out loss")
    _hide_unused(axes, len(layers))
    _suptitle(fig, title(results, "faithfulness: ablating each method's most important units"))
    return _save(fig, out_dir, "faithfulness_neurons")


def plot_ground_truth(results: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Attribution accuracy against a task's ground truth: per source position (value, key), each method's
    MRR by layer with its 95 % bootstrap interval; the random and recency baselines as shaded bands."""
    truth = part(results, "ground_truth")
    if not truth or not isinstance(truth.get("rows"), list):
        raise FigureSkipped(f"no ground-truth results: {missing_reason(results, 'ground_truth')}")
    rows = [r for r in truth["rows"] if isinstance(r, dict) and isinstance(r.get("mrr"), dict)]
    sources = list(dict.fromkeys(r["source"] for r in rows))
    if not sources:
        raise FigureSkipped("ground-truth results have no rows")
    layers = sorted({int(r["layer"]) for r in rows if r.get("layer") is not None})
    fig, axes = _figure(1, len(sources), (6.0 * len(sources), 4.4))
    cmap = _cmap("tab10")
    methods = list(dict.fromkeys(r["method"] for r in rows if r.get("layer") is not None))
    for ax, source in zip(axes.flat, sources, strict=False):
        for j, base in enumerate(("random", "recency")):
            b = next((r for r in rows if r["source"] == source and r["method"] == base), None)
            if b and b["mrr"].get("low") is not None:
                ax.axhspan(b["mrr"]["low"], b["mrr"]["high"], color=("gray", "tan")[j], alpha=0.35,
                           label=f"{base} ({b['mrr']['mean']:.3f})")
        width = 0.8 / max(1, len(methods))
        for i, method in enumerate(methods):
            got = {int(r["layer"]): r["mrr"] for r in rows
                   if r["source"] == source and r["method"] == method and r.get("layer") is not None}
            xs = [layers.index(layer) + (i - (len(methods) - 1) / 2) * width for layer in got]
            means = [m["mean"] for m in got.values()]
            err = np.array([[m["mean"] - (m["low"] if m["low"] is not None else m["mean"]) for m in got.values()],
                            [(m["high"] if m["high"] is not None else m["mean"]) - m["mean"] for m in got.values()]])
            ax.bar(xs, means, width=width, color=cmap(i), label=method, yerr=err, capsize=2)
        ax.set_xticks(range(len(layers)), [f"layer {layer}" for layer in layers])
        ax.set(title=f"true source: {source} position", ylabel="mean reciprocal rank (95% CI)", ylim=(0, 1.02))
        ax.legend(fontsize=7)
    acc_txt = num(truth.get("task_accuracy"))
    what = f"ground truth ({truth.get('task')}, {truth.get('n_queries')} held-out queries" + (
        f", model accuracy {acc_txt:.3f})" if acc_txt is not None else ")")
    _suptitle(fig, title(results, what))
    return _save(fig, out_dir, "ground_truth")


def _plot_patching(results: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """The heatmaps of ``mambascope patch`` (report/patching_plots.py)."""
    from mambascope.report.patching_plots import plot_patching

    paths = plot_patching(results, out_dir)
    if not paths:
        raise FigureSkipped("no patching results (mambascope patch)")
    return paths


def _plot_attribution(results: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """The token heat strip of ``mambascope attribute`` (report/attribute_plots.py)."""
    from mambascope.report.attribute_plots import plot_attribution

    paths = plot_attribution(results, out_dir)
    if not paths:
        raise FigureSkipped("no attribution results (mambascope attribute)")
    return paths


def _plot_leaderboard(results: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """The leaderboard's hit@1 and knockout effects (report/leaderboard_plots.py)."""
    from mambascope.report.leaderboard_plots import plot_leaderboard

    paths = plot_leaderboard(results, out_dir)
    if not paths:
        raise FigureSkipped("no leaderboard results (mambascope leaderboard)")
    return paths


# ----------------------------------------------------------------------------------------------- driver

def _pct(fraction: Any) -> str:
    value = num(fraction)
    return "?" if value is None else f"{100 * value:g}%"


def _nan(values: Any) -> list[float]:
    return [np.nan if v is None else float(v) for v in values or []]


def _cmap(name: str) -> Any:
    from matplotlib import colormaps

    return colormaps[name]


PlotFunction = Callable[[Mapping[str, Any], Path], "Path | list[Path]"]

FIGURES: dict[str, PlotFunction] = {
    "dead_neurons": plot_dead_neurons,
    "dead_sensitivity": plot_dead_sensitivity,
    "positional_mi": plot_positional_mi,
    "positional_frequency": plot_positional_frequency,
    "token_detectors": plot_token_detectors,
    "ngram_coverage": plot_ngram_coverage,
    "delta_selectivity": plot_delta_selectivity,
    "overlap": plot_overlap,
    "ablation": plot_ablation,
    "pruning": plot_pruning,
    "attention_neurons": plot_attention_neurons,
    "attention_diversity": plot_attention_diversity,
    "hidden_attention": plot_hidden_attention,
    "faithfulness_curves": plot_faithfulness_curves,
    "faithfulness_neurons": plot_faithfulness_neurons,
    "ground_truth": plot_ground_truth,
    "patching": _plot_patching,
    "attribution": _plot_attribution,
    "leaderboard": _plot_leaderboard,
}
"""Every figure of the report by name (the PNG stem; ``attention_neurons`` writes one per layer)."""


def create_comprehensive_report(results: Mapping[str, Any], out_dir: str | Path) -> FigureSet:
    """Draw every figure the results support into ``out_dir``; return their paths.

    The return value is a ``list[Path]`` (a :class:`FigureSet`) whose ``skipped`` maps each figure not
    drawn to the reason: the data it needs is absent (with the recorded error where there is one), or
    drawing failed (the exception, also logged).  No figure is drawn from placeholder data.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = FigureSet()
    for name, plot in FIGURES.items():
        try:
            result = plot(results, out_dir)
        except FigureSkipped as exc:
            made.skipped[name] = str(exc)
            log.info("figure %s skipped: %s", name, exc)
            continue
        except Exception as exc:  # one broken figure must not take the report down; it is reported
            made.skipped[name] = f"drawing failed: {type(exc).__name__}: {exc}"
            log.warning("figure %s failed", name, exc_info=True)
            continue
        made.extend(result if isinstance(result, list) else [result])
    return made

