"""Input-perturbation faithfulness ΔA^F = A(LeRF) − A(MoRF) (Jafari et al. 2024, after Blücher et al. 2024;
docs/methods.md, "ΔA^F: token flipping").

For one prediction (ids, position P, the model's own top prediction y there) and a relevance row over the
context 0..P−1, the context tokens are **flipped** one more at a time, in the order of the relevance: most
relevant first (MoRF) or least relevant first (LeRF), ties broken by a seeded random permutation.  Flipping
token j replaces its input embedding (the output of ``get_input_embeddings()``) by the mean input embedding
over the vocabulary, the reference input of IG and occlusion; the token at P is never flipped.  After k of the
C = P flips (k = 0..C) the model gives m_k: the logit of y at P (``logit``) and whether y is still the argmax
(``accuracy``).  A = the area under m against the flipped fraction k/C (trapezoid rule),
A = (1/C)·Σ_{k<C} (m_k + m_{k+1})/2, and ΔA^F = A(LeRF) − A(MoRF): large when the tokens a method calls
relevant are the ones the prediction needs.

**Context-dependent positions**: P (the last position of a window) counts when flipping its whole context
changes the top prediction (the argmax with every context token flipped is not y), so that the prediction
depends on the context at all and both curves start and end at different values.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mambascope.attribution.bootstrap import bootstrap_mean
from mambascope.attribution.faithfulness import token_ranking
from mambascope.attribution.input_attribution import (
    BASELINES,
    IG_METHOD,
    TOKEN_METHODS,
    WHOLE_MODEL_METHODS,
    Settings,
    baseline_embedding,
    unavailable,
)
from mambascope.trace import trace

FLIP_METHODS = (*WHOLE_MODEL_METHODS, "random")
METRICS = ("logit", "accuracy")
DEFAULT_POSITIONS = 16
WINDOW = 32
DEFAULT = Settings()  # IG steps and the IG/occlusion baseline (input_attribution's defaults)

__all__ = ["DEFAULT_POSITIONS", "FLIP_METHODS", "METRICS", "WINDOW", "context_dependent", "curve_area",
           "flip_orders", "flipping_curves", "flipping_faithfulness"]


def flip_orders(relevance: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(MoRF, LeRF) orders [C] of the C context positions, from ``relevance`` [C]; ties broken at random."""
    r = relevance.double()[None]
    return token_ranking(r, generator)[0], token_ranking(-r, generator)[0]


def _flipped_logits(model: nn.Module, ids: Tensor, position: int, flips: Tensor) -> Tensor:
    """logits [F, V] at ``position`` of ids [1, L] with the embedding rows where flips [F, L] is True replaced by
    the mean input embedding (one batched, traced forward; the embedding module's output replaced by a hook)."""
    embedding = model.get_input_embeddings()
    prefix = ids[:, :position + 1]
    mask = flips[:, :position + 1].to(prefix.device)[..., None]

    def hook(module: nn.Module, args: Any, out: Tensor) -> Tensor:
        return torch.where(mask, baseline_embedding(model, out[:1], "mean").to(out.dtype), out)

    handle = embedding.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return trace(model, prefix.expand(flips.shape[0], -1), names=[]).logits[:, position].double()
    finally:
        handle.remove()


def flipping_curves(model: nn.Module, ids: Tensor, position: int, target: int,
                    orders: Sequence[Tensor]) -> list[dict[str, Tensor]]:
    """For each flip order [C] over the context of ``position``: {"logit": [C+1], "accuracy": [C+1]} after
    0..C flips (the logit of ``target`` at ``position``; 1.0 where ``target`` is still the argmax)."""
    ids = torch.as_tensor(ids).reshape(1, -1)
    L = ids.shape[1]
    masks = []
    for order in orders:
        C = order.shape[0]
        steps = torch.zeros(C + 1, L, dtype=torch.bool)
        for k in range(1, C + 1):
            steps[k, order[:k]] = True
        masks.append(steps)
    logits = _flipped_logits(model, ids, position, torch.cat(masks))
    out, start = [], 0
    for steps in masks:
        part = logits[start:start + steps.shape[0]]
        start += steps.shape[0]
        out.append({"logit": part[:, target].cpu(), "accuracy": (part.argmax(-1) == target).double().cpu()})
    return out


def curve_area(values: Tensor) -> float:
    """Area under m_0..m_C against the flipped fraction k/C (trapezoid rule)."""
    v = values.double()
    return float(((v[:-1] + v[1:]) / 2).mean())


def context_dependent(model: nn.Module, ids: Tensor, position: int) -> int | None:
    """The top prediction y at ``position`` when flipping the whole context changes it (None otherwise)."""
    ids = torch.as_tensor(ids).reshape(1, -1)
    flips = torch.zeros(2, ids.shape[1], dtype=torch.bool)
    flips[1, :position] = True
    top = _flipped_logits(model, ids, position, flips).argmax(-1)
    return int(top[0]) if int(top[0]) != int(top[1]) else None


def _relevance(model: nn.Module, method: str, ids: Tensor, position: int, target: int, settings: Settings,
               generator: torch.Generator) -> Tensor:
    if method == "random":
        return torch.rand(position, generator=generator, dtype=torch.float64)
    return TOKEN_METHODS[method](model, ids, position, target, settings)[0].relevance[:position]


def flipping_faithfulness(model: nn.Module, windows: Tensor, *, n_positions: int = DEFAULT_POSITIONS,
                          methods: Sequence[str] = FLIP_METHODS, settings: Settings = DEFAULT,
                          seed: int = 0) -> dict[str, Any]:
    """ΔA^F of each method at the last position of the first ``n_positions`` context-dependent windows [n, T]
    (one position per window, so positions are independent items for the bootstrap).

    Returns a JSON-ready dict: ``positions`` (window index, position, target), ``scanned`` (windows looked at),
    ``rows`` (method × metric: A(MoRF), A(LeRF), ΔA^F with 95 % intervals, seconds per position for the
    relevance), ``errors`` (method -> reason)."""
    if n_positions < 2:
        raise ValueError(f"n_positions must be at least 2 for a bootstrap interval, got {n_positions}")
    P = windows.shape[1] - 1
    chosen: list[tuple[int, int]] = []
    scanned = 0
    for w in range(windows.shape[0]):
        if len(chosen) == n_positions:
            break
        scanned += 1
        y = context_dependent(model, windows[w], P)
        if y is not None:
            chosen.append((w, y))
    if len(chosen) < 2:
        raise ValueError(f"only {len(chosen)} of {scanned} windows have a context-dependent last position")
    errors = {m: r for m in methods if m != "random" and (r := unavailable(model, m))}
    rows = []
    for method in [m for m in methods if m not in errors]:
        gen = torch.Generator().manual_seed(seed)
        areas = {(metric, kind): [] for metric in METRICS for kind in ("morf", "lerf")}
        seconds = 0.0
        try:
            for w, y in chosen:
                start = time.perf_counter()
                rel = _relevance(model, method, windows[w], P, y, settings, gen)
                seconds += time.perf_counter() - start
                morf, lerf = flipping_curves(model, windows[w], P, y, flip_orders(rel, gen))
                for metric in METRICS:
                    areas[(metric, "morf")].append(curve_area(morf[metric]))
                    areas[(metric, "lerf")].append(curve_area(lerf[metric]))
        except Exception as exc:  # one failing method must not stop the others
            errors[method] = f"{type(exc).__name__}: {exc}"
            continue
        for metric in METRICS:
            a_morf, a_lerf = (torch.tensor(areas[(metric, k)]).numpy() for k in ("morf", "lerf"))
            rows.append({"method": method, "metric": metric, "a_morf": bootstrap_mean(a_morf, seed=seed),
                         "a_lerf": bootstrap_mean(a_lerf, seed=seed + 1),
                         "delta_a_f": bootstrap_mean(a_lerf - a_morf, seed=seed + 2),
                         "seconds_per_position": seconds / len(chosen)})
    return {"n_positions": len(chosen), "scanned": scanned, "window": int(windows.shape[1]),
            "positions": [{"window": w, "position": P, "target": y} for w, y in chosen],
            "flip_to": BASELINES["mean"], "ig_steps": settings.ig_steps, "ig_integration": IG_METHOD,
            "ig_occlusion_baseline": BASELINES[settings.baseline], "rows": rows, "errors": errors}
