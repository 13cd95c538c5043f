"""``mambascope attribute``: the token heat strip of ``results["attribution"]`` and its ranked list as text.

One row per method (per layer for the attention-neuron methods), one column per token up to the target
position; each row is divided by its largest |relevance| (methods explain different quantities, so only
the pattern within a row is comparable), red for positive, blue for negative.  Reads the results only.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from matplotlib.figure import Figure

from mambascope.report._access import title

DPI = 100  # as the other figures (report/figures.py registers this module's plot, so cannot be imported)


def row_label(row: Mapping[str, Any]) -> str:
    """``method`` or ``method L<layer>``."""
    return str(row.get("method")) + ("" if row.get("layer") is None else f" L{row['layer']}")


def ranked(attribution: Mapping[str, Any], row: Mapping[str, Any], k: int) -> list[tuple[int, str, float]]:
    """The ``k`` positions up to the target with the largest relevance: (position, token, relevance)."""
    tokens = attribution.get("tokens") or []
    last = int((attribution.get("target") or {}).get("position", len(tokens) - 1))
    values = [(v, p) for p, v in enumerate((row.get("relevance") or [])[:last + 1]) if v is not None]
    top = sorted(values, key=lambda vp: (-vp[0], vp[1]))[:k]
    return [(p, tokens[p] if p < len(tokens) else "", v) for v, p in top]


def plot_attribution(results: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """``attribution.png``: the heat strip; [] when the results hold no attribution rows."""
    attribution = results.get("attribution")
    if not isinstance(attribution, dict) or not attribution.get("rows"):
        return []
    rows = [r for r in attribution["rows"] if isinstance(r, dict) and r.get("relevance")]
    target = attribution.get("target") or {}
    last = int(target.get("position", len(attribution.get("tokens") or []) - 1))
    values = np.array([[np.nan if v is None else float(v) for v in r["relevance"][:last + 1]] for r in rows])
    scale = np.nanmax(np.abs(values), axis=1, keepdims=True)
    shown = np.divide(values, scale, out=np.zeros_like(values), where=scale > 0)
    n_rows, n_cols = shown.shape
    fig = Figure(figsize=(max(8.0, 2.5 + 0.32 * n_cols), max(3.0, 1.9 + 0.26 * n_rows)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shown, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    tokens = [repr(t) for t in (attribution.get("tokens") or [])[:n_cols]]
    step = max(1, n_cols // 80)
    ax.set_xticks(range(0, n_cols, step), tokens[::step], rotation=70, ha="right", fontsize=8)
    ax.set_yticks(range(n_rows), [row_label(r) for r in rows], fontsize=8)
    ax.axvline(last + 0.5, color="0.3", linewidth=1)
    ax.set_xlabel(f"token (the prediction at position {last}, after {tokens[-1] if tokens else '?'})")
    fig.colorbar(image, ax=ax, label="relevance / max |relevance| of the row", shrink=0.8)
    text = title(results, f"token relevance for predicting {target.get('token')!r} "
                 f"({target.get('chosen', '?')}, p = {np.exp(target.get('logprob', np.nan)):.3g})")
    fig.suptitle(textwrap.fill(text, width=max(40, int(fig.get_figwidth() * 9.5))), fontsize=11)
    path = Path(out_dir) / "attribution.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return [path]


def print_attribution(attribution: Mapping[str, Any], k: int = 5, file: TextIO | None = None) -> None:
    """The target and, per row, its ``k`` most relevant tokens, as text."""
    target = attribution["target"]
    lines = [f"explaining {target['token']!r} ({target['chosen']}, log p = {target['logprob']:.4f}) after position "
             f"{target['position']} of {len(attribution['tokens'])} tokens"]
    width = max((len(row_label(r)) for r in attribution["rows"]), default=0)
    for row in attribution["rows"]:
        top = ", ".join(f"{tok!r}@{p} {v:+.3g}" for p, tok, v in ranked(attribution, row, k))
        lines.append(f"  {row_label(row):<{width}}  {top}")
    for method, reason in (attribution.get("errors") or {}).items():
        lines.append(f"FAILED {method}: {reason}")
    print("\n".join(lines), file=file)


__all__ = ["plot_attribution", "print_attribution", "ranked", "row_label"]
