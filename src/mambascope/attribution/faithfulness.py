"""Faithfulness of the attention-neuron methods, by perturbation (docs/methods.md, "Faithfulness").

(a) Token level (Samek et al. 2017 MoRF/LeRF perturbation curves; the protocol Ali et al. 2024 use for
Mamba attributions, with masking instead of deletion): on held-out windows of T tokens, each window's
query q is a position where the context matters (:func:`context_queries`: log p(next token) with the full
context exceeds that with the whole context masked by at least ``query_margin`` nats; windows without
such a position are left out) and the target is the actual next token (q + 1).  Each method ranks the
context positions 0..q−1 by its relevance at layer ℓ; the top (MoRF) or bottom (LeRF) round(f·q) of
them are removed by setting attention_mask to 0 there (Mamba zeroes those positions' inputs as Hugging
Face does for padding; GPT-2 drops them as keys), for f = 0, 1/steps, …, 1, and log p(target | perturbed
context) at q is recorded.  Areas are trapezoids over f ∈ [0, 1]; difference = LeRF area − MoRF area
(larger = more faithful), per window, with a 95 % bootstrap interval over windows.  A ``random`` ranking
(``random_seeds`` seeds, averaged per window) is always a row; a method is *above random* when the
bootstrap interval of its paired per-window difference minus random's lies above 0.  Every perturbed
input of a batch (all methods, layers, directions, fractions, random seeds) is built first and each
distinct one runs once (:func:`masked_logprob`).  Whole-model token attributions (MambaLRP, gradient ×
input, …; :mod:`mambascope.attribution.input_attribution`, for the target's logit at q) rank the same
context once per window, not per layer, and are scored by the same curves against the same random rows.

(b) Neuron level: each layer's units are ranked by each method's importance, summed over the selection
windows (same query/target rule); the top k are zero-ablated (Mamba: channels of ``mixer.hook_post``
via ``ablation_edits``; GPT-2: heads, by zeroing their attention pattern so the head writes nothing) and
the change of mean next-token loss on the (disjoint) evaluation windows is measured against k random
units (``draws`` ≥ 3 draws, mean and std; the Monte Carlo p-value of the method against them,
:func:`monte_carlo_p`, whose floor 1/(draws + 1) says what so few draws can show).  ``random`` is always a row.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from torch import Tensor, nn

from mambascope.arch import is_transformer
from mambascope.attribution.bootstrap import bootstrap_mean
from mambascope.attribution.extract import METHODS, check_layers, check_method, extract
from mambascope.attribution.input_attribution import WHOLE_MODEL_METHODS, batch_relevance, unavailable
from mambascope.attribution.methods import method_records
from mambascope.interventions.ablation import ablation_edits, heldout_loss, random_groups
from mambascope.trace import architecture, trace_stream
from mambascope.trace.forward import Edit

# 4 steps (f = 0, ¼, ½, ¾, 1) and 64 windows: tighter intervals for the same forwards as 10 steps on 26 windows.
FRACTIONS_DEFAULT_STEPS = 4
QUERY_MARGIN = 1.0  # nats: the context must raise log p(next token) at least this much over no context
TOKEN_WINDOWS = 64
WHOLE = "whole model"  # the layer of a whole-model method's curves
# one forward and backward per batch of windows; integrated gradients (64 per window), occlusion and knockout
# (one forward per context token) cost 10-60x more and are named to be run
DEFAULT_WHOLE_MODEL = ("lrp", "gradient_x_input")

__all__ = ["DEFAULT_WHOLE_MODEL", "FRACTIONS_DEFAULT_STEPS", "QUERY_MARGIN", "TOKEN_WINDOWS", "WHOLE",
           "context_queries", "context_ranking", "evaluate_faithfulness", "faithfulness_table", "masked_logprob",
           "monte_carlo_p", "perturbed_logprob", "removal_masks", "token_ranking"]


def _check_windows(windows: Tensor, what: str, min_len: int) -> Tensor:
    if not isinstance(windows, Tensor) or windows.dim() != 2 or windows.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty LongTensor [n, T]")
    if windows.shape[1] < min_len:
        raise ValueError(f"{what} need at least {min_len} tokens per window, got {windows.shape[1]}")
    return windows.long()


def token_ranking(relevance: Tensor, generator: torch.Generator, method: str = "relevance") -> Tensor:
    """[b, n] positions ordered most relevant first; ties are broken by a seeded random permutation
    (a fixed tie order, e.g. by position, would bias MoRF and LeRF in opposite directions).

    −inf marks positions to rank last (outside the context); NaN or +inf is refused with a ValueError
    naming ``method``: a descending sort puts NaN first, as if those positions mattered most."""
    bad = torch.isnan(relevance) | torch.isposinf(relevance)
    if bool(bad.any()):
        raise ValueError(f"{method}: non-finite relevance (NaN or +inf) at {int(bad.sum())} of {relevance.numel()} "
                         "positions; it cannot rank tokens")
    perm = _random_orders(*relevance.shape, generator).to(relevance.device)
    order = torch.sort(relevance.gather(1, perm), dim=1, descending=True, stable=True).indices
    return perm.gather(1, order)


def context_ranking(relevance: Tensor, context: Tensor, generator: torch.Generator, method: str) -> Tensor:
    """:func:`token_ranking` of ``relevance`` [b, n] over the ``context`` [b, n] (bool) positions, the others
    last; a method's relevance must be finite on its context (NaN, ±inf: ValueError naming ``method``)."""
    bad = context & ~torch.isfinite(relevance)
    if bool(bad.any()):
        raise ValueError(f"{method}: non-finite relevance (NaN or ±inf) at {int(bad.sum())} of {int(context.sum())} "
                         "context positions; it cannot rank tokens")
    return token_ranking(torch.where(context, relevance.double(), -torch.inf), generator, method)


def _random_orders(b: int, n: int, generator: torch.Generator) -> Tensor:
    """[b, n]: an independent uniformly random permutation of 0..n-1 per row."""
    return torch.rand(b, n, generator=generator).argsort(dim=1)


def perturbed_logprob(model: nn.Module, ids: Tensor, order: Tensor, counts: Sequence[int] | Tensor,
                      query: int | Tensor, target: Tensor, *, chunk: int = 64) -> Tensor:
    """log p(target | context with the first counts[i] positions of ``order`` masked) at ``query``.

    ids [b, T]; query: one position for every row or [b] per row; order [b, n]: removal order, each row's
    context positions (< its query) first; counts: removed counts, the same for every row or [F, b];
    target [b].  Returns [b, F].  Positions after a query cannot affect it (causal models).
    """
    masks, q = removal_masks(order, counts, query, ids.shape[0])
    F, b = masks.shape[:2]
    rows = torch.arange(b, device=ids.device).expand(F, b).reshape(-1)
    lp = masked_logprob(model, ids, rows, masks.reshape(F * b, -1), q.expand(F, b).reshape(-1),
                        target.expand(F, b).reshape(-1), chunk=chunk)
    return lp.reshape(F, b).T


def removal_masks(order: Tensor, counts: Sequence[int] | Tensor, query: int | Tensor, b: int) -> tuple[Tensor, Tensor]:
    """([F, b, max q + 1] attention masks with the first counts[f] positions of ``order`` zeroed, [b] queries)."""
    device = order.device
    q = torch.as_tensor(query, device=device).long().expand(b)
    n = order.shape[1]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=device).expand(b, n))  # rank of each context position
    c = torch.as_tensor(counts if isinstance(counts, Tensor) else list(counts), device=device).long()
    c = c[:, None].expand(-1, b) if c.dim() == 1 else c  # [F, b]
    if bool((c > q).any()):
        raise ValueError("a removed count exceeds its row's context")
    masks = torch.ones(c.shape[0], b, int(q.max()) + 1, dtype=torch.long, device=device)
    masks[:, :, :n] = (rank[None] >= c[:, :, None]).long()
    return masks, q


def masked_logprob(model: nn.Module, ids: Tensor, rows: Tensor, masks: Tensor, query: Tensor, target: Tensor, *,
                   chunk: int = 64) -> Tensor:
    """[R] log p(target[r] | ids[rows[r]] under masks[r]) at position query[r].

    Identical (row, mask) pairs are run once (methods and layers often mask the same positions, and every
    curve shares its f = 0 and f = 1 points); the unique inputs run in chunks of similar query position,
    each cut after its last query.
    """
    cut = masks.shape[1]
    masks = masks.clone()
    after = torch.arange(cut, device=masks.device)[None, :] > query[:, None]
    masks[after] = 1  # positions after the query cannot change it; unify them for the de-duplication
    key = torch.cat([rows[:, None], query[:, None], target[:, None], masks], 1)
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    by_query = torch.argsort(uniq[:, 1], stable=True)
    out = torch.empty(uniq.shape[0], dtype=torch.float32, device=masks.device)
    for start in range(0, uniq.shape[0], chunk):  # a loop over chunks of unique inputs (memory)
        sel = by_query[start:start + chunk]
        u = uniq[sel]
        end = int(u[:, 1].max()) + 1
        with torch.no_grad():  # the unembedding runs at the query positions only
            at = trace_stream(model, ids[u[:, 0], :end], None, attention_mask=u[:, 3:3 + end], logits_at=u[:, 1])
        out[sel] = torch.log_softmax(at.float(), -1).gather(1, u[:, 2:3])[:, 0]
    return out[inverse]


def _area(curve: Sequence[float], fractions: Sequence[float]) -> float:
    y, x = torch.tensor(curve, dtype=torch.float64), torch.tensor(fractions, dtype=torch.float64)
    return float(torch.trapezoid(y, x))


def _curve_entry(morf: Tensor, lerf: Tensor, fractions: list[float]) -> dict:
    m, l = morf.tolist(), lerf.tolist()
    ma, la = _area(m, fractions), _area(l, fractions)
    return {"morf": m, "lerf": l, "morf_area": ma, "lerf_area": la, "difference": la - ma}


def _resolve_k(k: int | float, n_units: int) -> int:
    if isinstance(k, bool) or k <= 0:
        raise ValueError(f"k must be a positive count or a fraction in (0, 1), got {k!r}")
    kk = max(1, round(k * n_units)) if isinstance(k, float) and k < 1 else int(k)
    if kk > n_units:
        raise ValueError(f"k = {kk} exceeds the layer's {n_units} units")
    return kk


def _head_edits(layer: int, heads: Tensor) -> dict[str, Edit]:
    """Zero-ablate GPT-2 heads: a zero pattern row makes the head write nothing (z_h = 0·v)."""

    def edit(pattern: Tensor, heads: Tensor = heads) -> Tensor:
        pattern = pattern.clone()
        pattern[:, heads.to(pattern.device)] = 0
        return pattern

    return {f"blocks.{layer}.attn.hook_pattern": edit}


def _unit_edits(model: nn.Module, layer: int, index: Tensor) -> dict[str, Edit]:
    if is_transformer(architecture(model)):
        return _head_edits(layer, index)
    return ablation_edits(model, {layer: index})


def evaluate_faithfulness(
    model: nn.Module,
    select_windows: Tensor,
    eval_windows: Tensor,
    layers: int | Sequence[int],
    methods: str | Sequence[str] = ("attention_weighted", "gradient_guided", "rollout"),
    *,
    k: int | float = 0.1,
    steps: int = FRACTIONS_DEFAULT_STEPS,
    seed: int = 0,
    random_seeds: int = 3,
    draws: int = 3,
    batch_size: int = 8,
    token_level: bool = True,
    neuron_level: bool = True,
    query_margin: float | None = QUERY_MARGIN,
    query_candidates: int = 8,
    token_windows: int | None = TOKEN_WINDOWS,
    neuron_windows: int | None = None,
    whole_model: Sequence[str] = (),
) -> dict:
    """Token- and neuron-level faithfulness of ``methods`` at ``layers`` (module docstring).

    select_windows [n_s, T_s]: rank neurons (importance summed over these); eval_windows [n_e, T_e]:
    held-out windows for both the token curves and the ablation loss; they must not share a window.
    k: units ablated per layer (an int, or a fraction of the layer's units if in (0, 1)).  steps: the
    fraction axis is 0, 1/steps, …, 1.  random_seeds: random token rankings; draws: random unit sets.
    query_margin, query_candidates: how each eval window's query is chosen (:func:`context_queries`; None:
    q = T−2); token_windows: the first this many qualifying eval windows are scored (None: all);
    neuron_windows: the ablation loss is measured on the first this many eval windows (None: all).
    whole_model: whole-model methods (``WHOLE_MODEL_METHODS``) scored at the token level too.
    A method that fails is reported in ``errors[method]`` and the others go on.  Returns a JSON-ready dict
    (see :func:`faithfulness_table` for the flat view).
    """
    arch = architecture(model)
    layers = check_layers(model, layers)
    if isinstance(methods, str):
        methods = [methods]
    methods = list(dict.fromkeys(methods))
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if random_seeds < 1 or draws < 3:
        raise ValueError("random_seeds must be >= 1 and draws >= 3 (the random control needs a spread)")
    device = model.get_input_embeddings().weight.device
    eval_windows = _check_windows(eval_windows, "eval_windows", 3).to(device)
    errors: dict[str, str] = {}
    valid: list[str] = []
    for m in methods:
        try:
            check_method(m, arch)
            valid.append(m)
        except ValueError as exc:
            errors[m] = str(exc)
    unknown = [m for m in whole_model if m not in WHOLE_MODEL_METHODS]
    if unknown:
        raise ValueError(f"unknown whole-model method {unknown[0]!r}; choose from {', '.join(WHOLE_MODEL_METHODS)}")
    whole_model = list(dict.fromkeys(whole_model))
    errors |= {m: reason for m in whole_model if (reason := unavailable(model, m))}
    result: dict = {"arch": arch, "layers": layers, "methods": methods, "whole_model_methods": whole_model,
                    "seed": seed, "errors": errors}
    fractions = [i / steps for i in range(steps + 1)]

    if token_level:
        result["token"] = _token_level(model, eval_windows, layers, valid, fractions, seed, random_seeds,
                                       batch_size, errors, query_margin, query_candidates, token_windows,
                                       whole_model)
    if neuron_level:
        select_windows = _check_windows(select_windows, "select_windows", 3).to(device)
        if select_windows.shape[1] == eval_windows.shape[1]:
            same = (select_windows[:, None, :] == eval_windows[None, :, :]).all(-1)
            if bool(same.any()):
                raise ValueError(f"{int(same.any(0).sum())} eval window(s) also appear in select_windows: "
                                 "neuron ranking and its test must use disjoint windows")
        result["neuron"] = _neuron_level(model, select_windows, eval_windows[:neuron_windows], layers,
                                         [m for m in valid if m not in errors], k, seed, draws, batch_size, errors)
    return result


def context_queries(model: nn.Module, windows: Tensor, *, margin: float | None, candidates: int = 8, seed: int = 0,
                    chunk: int = 64, enough: int | None = None, block: int = 16) -> dict:
    """Per window, a query position where the context matters for the actual next token.

    ``margin`` None: q = T−2 in every window.  Otherwise ``candidates`` positions per window are drawn
    (seeded, without replacement) from T//4 … T−2; for each, log p(next token) with the full context (one
    forward) and with the whole context masked (attention_mask 1 only at q, as at f = 1 of the curves);
    the candidate with the largest gap is the window's query if the gap is at least ``margin`` nats, else
    the window is left out.  Returns ``keep`` [n] bool, ``query`` [n], ``full``, ``masked`` [n] (log-probs
    at the chosen query; the T−2 ones where no candidate qualified).

    ``enough``: the windows are scored in order, ``block`` at a time, until this many qualify, and the
    result covers the windows scored (a prefix of ``windows``).  Each window's candidates are drawn for
    all windows at once and its scores depend on no other window, so the prefix is what scoring every
    window would give there.
    """
    n, T = windows.shape
    cand = _query_candidates(n, T, margin, candidates, seed, windows.device)
    step = n if enough is None else block
    parts: list[dict] = []
    for start in range(0, n, step):  # a loop over blocks of windows, until enough qualify
        parts.append(_score_queries(model, windows[start:start + step], cand[start:start + step], margin, chunk))
        if enough is not None and sum(int(p["keep"].sum()) for p in parts) >= enough:
            break
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def _query_candidates(n: int, T: int, margin: float | None, candidates: int, seed: int,
                      device: torch.device) -> Tensor:
    """[n, k] candidate query positions per window (``context_queries``)."""
    if margin is None:
        return torch.full((n, 1), T - 2, device=device)
    low = T // 4
    k = min(candidates, T - 1 - low)
    gen = torch.Generator().manual_seed(seed + 4049)
    return (torch.rand(n, T - 1 - low, generator=gen).argsort(1)[:, :k] + low).to(device)


def _score_queries(model: nn.Module, windows: Tensor, cand: Tensor, margin: float | None, chunk: int) -> dict:
    """``context_queries`` of ``windows`` [n, T] with their candidates ``cand`` [n, k]."""
    n, k = cand.shape
    device = windows.device
    with torch.no_grad():  # the unembedding at the candidates only
        at = trace_stream(model, windows, None, logits_at=cand).float()  # [n, k, V]
    full = torch.log_softmax(at, -1).gather(2, windows.gather(1, cand + 1)[..., None])[..., 0].double()
    rows = torch.arange(n, device=device).repeat_interleave(k)
    qs = cand.reshape(-1)
    masks = (torch.arange(windows.shape[1] - 1, device=device)[None, :] >= qs[:, None]).long()
    masked = masked_logprob(model, windows, rows, masks, qs, windows[rows, qs + 1], chunk=chunk).reshape(n, k).double()
    best = (full - masked).argmax(1)
    pick = torch.arange(n, device=device)
    q = cand[pick, best]
    keep = torch.ones(n, dtype=torch.bool, device=device) if margin is None else (full - masked)[pick, best] >= margin
    return {"keep": keep, "query": q, "full": full[pick, best], "masked": masked[pick, best]}


def _interval(values: Tensor, seed: int) -> dict:
    return bootstrap_mean(values.cpu().numpy(), seed=seed)


def _whole_model_orders(model: nn.Module, batch: Tensor, query: Tensor, context: Tensor, methods: Sequence[str],
                        generator: torch.Generator, errors: dict[str, str]) -> dict[tuple, Tensor]:
    """{(method, WHOLE): removal order [b, n]} of each whole-model method not yet failed, for log p(next token)
    at each row's query; a method that fails is recorded in ``errors`` (later batches skip it)."""
    targets = batch[torch.arange(batch.shape[0]), query + 1]
    cut = batch[:, :int(query.max()) + 1]
    orders = {}
    for method in [m for m in methods if m not in errors]:
        try:
            relevance = batch_relevance(model, cut, query, targets, method)
            orders[(method, WHOLE)] = context_ranking(relevance[:, :context.shape[1]].to(context.device), context,
                                                      generator, method)
        except Exception as exc:  # one failing method must not stop the others
            errors[method] = f"{type(exc).__name__}: {exc}"
    return orders


def _token_level(model: nn.Module, windows: Tensor, layers: list[int], methods: list[str], fractions: list[float],
                 seed: int, random_seeds: int, batch_size: int, errors: dict[str, str], margin: float | None,
                 candidates: int, max_windows: int | None, whole_model: Sequence[str] = ()) -> dict | None:
    """The token-level result; None (and ``errors["token_level"]``) when no window qualifies.  ``whole_model``:
    methods of ``input_attribution.WHOLE_MODEL_METHODS`` ranked beside the per-layer ones (``whole_model``
    entries), for the target log-prob's token at each query."""
    T = windows.shape[1]
    chosen = context_queries(model, windows, margin=margin, candidates=candidates, seed=seed, enough=max_windows)
    keep = chosen["keep"].nonzero()[:, 0]
    if max_windows is not None:
        keep = keep[:max_windows]
    if keep.numel() == 0:
        errors["token_level"] = (f"no eval window has a position where the context raises log p(next token) by "
                                 f"{margin} nats over the masked context ({windows.shape[0]} windows, {candidates} "
                                 "candidates each): the token-level test has nothing to perturb")
        return None
    # sorted by query position: a batch then shares few hidden-attention query rows
    keep = keep[torch.argsort(chosen["query"][keep], stable=True)]
    ids, q = windows[keep], chosen["query"][keep]
    frac = torch.tensor(fractions, dtype=torch.float64, device=ids.device)
    counts_all = torch.round(frac[:, None] * q[None, :].double()).long()  # [F, n]
    gen = torch.Generator().manual_seed(seed)
    whole_gen = torch.Generator().manual_seed(seed + 1)  # its own ties: the per-layer rankings stay as they were
    rand_gens = [torch.Generator().manual_seed(seed * 1000 + 1 + s) for s in range(random_seeds)]
    curves: dict[tuple, list[Tensor]] = {}  # (method, layer, direction) -> per-batch [b, F]
    n = ids.shape[0]
    for start in range(0, n, batch_size):  # a loop over batches of windows
        sl = slice(start, start + batch_size)
        batch, qb, counts = ids[sl], q[sl], counts_all[:, sl]
        b = batch.shape[0]
        context = torch.arange(int(qb.max()), device=ids.device)[None, :] < qb[:, None]
        orders: dict[tuple, Tensor] = {}
        for s in range(random_seeds):  # a loop over random seeds
            score = torch.where(context, torch.rand(context.shape, generator=rand_gens[s]).to(ids.device).double(),
                                -torch.inf)
            orders[("random", s)] = token_ranking(score, gen)
        for _, _, records in method_records(model, batch, layers, methods, query=qb, batch_size=b, errors=errors):
            for method, recs in records.items():
                try:
                    ranked = {layer: context_ranking(recs[layer]["relevance"][:, : context.shape[1]], context, gen,
                                                     f"{method} at layer {layer}") for layer in layers}
                except ValueError as exc:  # later batches skip it (method_records) and the result leaves it out
                    errors[method] = str(exc)
                    continue
                orders |= {(method, layer): order for layer, order in ranked.items()}
        orders |= _whole_model_orders(model, batch, qb, context, whole_model, whole_gen, errors)
        masks, rows = [], []
        for order in orders.values():
            for direction in (order, _context_reversed(order, qb)):
                masks.append(removal_masks(direction, counts, qb, b)[0])
        stacked = torch.stack(masks)  # [K, F, b, cut]
        K, F = stacked.shape[:2]
        rows = torch.arange(b, device=ids.device).expand(K, F, b)
        lp = masked_logprob(model, batch, rows.reshape(-1), stacked.reshape(K * F * b, -1),
                            qb.expand(K, F, b).reshape(-1), batch[torch.arange(b), qb + 1].expand(K, F, b).reshape(-1))
        lp = lp.reshape(K, F, b).permute(0, 2, 1).double().cpu()  # [K, b, F]
        for i, name in enumerate(orders):
            curves.setdefault((*name, "morf"), []).append(lp[2 * i])
            curves.setdefault((*name, "lerf"), []).append(lp[2 * i + 1])
    cat = {key: torch.cat(v) for key, v in curves.items()}
    x = frac.cpu()

    def per_window(morf: Tensor, lerf: Tensor) -> Tensor:  # LeRF − MoRF area of each window
        return torch.trapezoid(lerf, x, dim=-1) - torch.trapezoid(morf, x, dim=-1)

    rand_morf = torch.stack([cat[("random", s, "morf")] for s in range(random_seeds)])  # [S, n, F]
    rand_lerf = torch.stack([cat[("random", s, "lerf")] for s in range(random_seeds)])
    rand_diff = per_window(rand_morf, rand_lerf).mean(0)  # [n]: each window's mean over the random seeds
    seed_diffs = per_window(rand_morf, rand_lerf).mean(1)  # [S]
    random = _curve_entry(rand_morf.mean((0, 1)), rand_lerf.mean((0, 1)), fractions)
    random |= {"seeds": random_seeds, "per_seed_difference": seed_diffs.tolist(),
               # a std over one seed is undefined (null), not 0
               "difference_std": float(seed_diffs.std()) if random_seeds > 1 else None,
               "difference_ci": _interval(rand_diff, seed)}
    def entry(key: tuple) -> dict:
        morf, lerf = cat[(*key, "morf")], cat[(*key, "lerf")]
        diff = per_window(morf, lerf)
        vs = _interval(diff - rand_diff, seed + 1)
        return _curve_entry(morf.mean(0), lerf.mean(0), fractions) | {
            "difference_ci": _interval(diff, seed), "vs_random": vs,
            "above_random": vs["low"] is not None and vs["low"] > 0}

    out_methods = {m: {str(layer): entry((m, layer)) for layer in layers} for m in methods if m not in errors}
    out_whole = {m: entry((m, WHOLE)) for m in whole_model if m not in errors}
    above = [f"{m}@{layer}" for m, per in out_methods.items() for layer, e in per.items() if e["above_random"]]
    above += [m for m, e in out_whole.items() if e["above_random"]]
    rule = ("q = T-2 in every window" if margin is None else
            f"per window, of {candidates} seeded candidates in {T // 4}..{T - 2}, the position where the full "
            f"context raises log p(next token) most over the fully masked context, if by >= {margin} nats")
    return {"fractions": fractions, "removed": "round(f * q) context positions", "query_rule": rule, "margin": margin,
            "query_positions": q.tolist(), "target": "actual next token (query + 1)", "n_windows": n,
            "n_candidate_windows": int(windows.shape[0]), "window": T,
            "baseline_logprob": float(chosen["full"][keep].mean()),
            "masked_context_logprob": float(chosen["masked"][keep].mean()),
            "interval": "95% percentile bootstrap over windows (2000 resamples); vs_random is paired",
            "methods": out_methods, "whole_model": out_whole, "random": random, "above_random": above}


def _context_reversed(order: Tensor, query: Tensor) -> Tensor:
    """Each row's context positions (its first query[b] entries of ``order``) in reverse order (LeRF)."""
    n = order.shape[1]
    idx = torch.arange(n, device=order.device)[None, :]
    rev = torch.where(idx < query[:, None], query[:, None] - 1 - idx, idx)
    return order.gather(1, rev)


def _neuron_level(model: nn.Module, select: Tensor, evalw: Tensor, layers: list[int], methods: list[str],
                  k: int | float, seed: int, draws: int, batch_size: int, errors: dict[str, str]) -> dict:
    q = select.shape[1] - 2
    imp: dict[str, dict[int, Tensor]] = {}
    n_units: dict[int, int] = {}
    for _, data, records in method_records(model, select, layers, methods, query=q, batch_size=batch_size,
                                           errors=errors):
        n_units.update(data.n_units)
        for method, recs in records.items():
            for layer in layers:
                s = recs[layer]["importance_per_row"].double().sum(0).cpu()
                per = imp.setdefault(method, {})
                per[layer] = per[layer] + s if layer in per else s
    if not n_units:  # every method failed before extraction: count units from a no-method extraction
        n_units = extract(model, select[:1], layers, methods=[], store="rows").n_units
    base = heldout_loss(model, evalw, batch_size=batch_size)
    ks = {layer: _resolve_k(k, n_units[layer]) for layer in layers}
    random: dict[str, dict] = {}
    for layer in layers:
        groups = random_groups(n_units[layer], ks[layer], draws, seed + 7919 * layer)
        losses = [heldout_loss(model, evalw, edits=_unit_edits(model, layer, g), batch_size=batch_size).loss
                  for g in groups]
        deltas = torch.tensor(losses, dtype=torch.float64) - base.loss
        random[str(layer)] = {"k": ks[layer], "losses": losses, "deltas": deltas.tolist(),
                              "delta_mean": float(deltas.mean()), "delta_std": float(deltas.std()),
                              "smallest_p_value": 1.0 / (draws + 1)}
    out_methods: dict[str, dict] = {}
    for method, per in imp.items():
        if method in errors:
            continue
        out_methods[method] = {}
        for layer in layers:
            top = torch.topk(per[layer], ks[layer]).indices.sort().values
            loss = heldout_loss(model, evalw, edits=_unit_edits(model, layer, top), batch_size=batch_size).loss
            out_methods[method][str(layer)] = {"k": ks[layer], "units": top.tolist(), "loss": loss,
                                               "delta": loss - base.loss,
                                               **monte_carlo_p(loss - base.loss, random[str(layer)]["deltas"])}
    return {"baseline_loss": base.loss, "tokens": base.tokens, "n_select_windows": int(select.shape[0]),
            "n_eval_windows": int(evalw.shape[0]), "unit": "head" if is_transformer(architecture(model)) else "channel",
            "query_position": q, "methods": out_methods, "random": random}


def monte_carlo_p(delta: float, random_deltas: Sequence[float]) -> dict:
    """One-sided Monte Carlo p-value of a method's loss change against R random unit sets of the same size:
    p = (1 + #{r : Δ_r ≥ Δ}) / (R + 1) (Davison & Hinkley 1997, "Bootstrap Methods and their Application",
    §4.2; North, Curtis & Sham 2002, "A note on the calculation of empirical P values from Monte Carlo
    procedures").  Exact when the method's set is exchangeable with the random sets (no better than random);
    its smallest value is 1/(R + 1), so R draws can reject only at α ≥ 1/(R + 1): 3 draws never below 0.25."""
    at_least = sum(1 for r in random_deltas if r >= delta)
    return {"random_at_least": at_least, "p_vs_random": (1 + at_least) / (len(random_deltas) + 1)}


def _token_row(tok: dict | None) -> dict:
    if tok is None:
        return {}
    ci = tok.get("difference_ci") or {}
    row = {"morf_area": tok["morf_area"], "lerf_area": tok["lerf_area"], "area_difference": tok["difference"],
           "area_difference_low": ci.get("low"), "area_difference_high": ci.get("high")}
    return row | ({"above_random": tok["above_random"]} if "above_random" in tok else {})


def faithfulness_table(result: dict) -> pd.DataFrame:
    """One row per (method, layer), ``random`` included: token-curve areas and their difference, and the
    neuron ablation's loss change against the random units' mean and std, with its Monte Carlo p-value.
    Whole-model methods have one row, layer None, token level only."""
    token, neuron = result.get("token") or {}, result.get("neuron") or {}
    errors = result.get("errors", {})
    rows = []
    for method in [m for m in result["methods"] if m in METHODS and m not in errors]:
        for layer in result["layers"]:
            key = str(layer)
            row: dict = {"method": method, "layer": layer}
            row |= _token_row(token.get("methods", {}).get(method, {}).get(key))
            rnd = neuron.get("random", {}).get(key)
            if rnd is not None and key in neuron.get("methods", {}).get(method, {}):
                ent = neuron["methods"][method][key]
                row |= {"k": ent["k"], "delta_loss": ent["delta"], "random_delta_mean": rnd["delta_mean"],
                        "random_delta_std": rnd["delta_std"], "random_draws": len(rnd["deltas"]),
                        "p_vs_random": ent["p_vs_random"]}
            rows.append(row)
    for method in [m for m in result.get("whole_model_methods", []) if m not in errors]:
        rows.append({"method": method, "layer": None, **_token_row(token.get("whole_model", {}).get(method))})
    for layer in result["layers"]:
        row = {"method": "random", "layer": layer, **_token_row(token.get("random"))}
        rnd = neuron.get("random", {}).get(str(layer))
        if rnd is not None:
            row |= {"k": rnd["k"], "delta_loss": rnd["delta_mean"], "delta_loss_std": rnd["delta_std"]}
        rows.append(row)
    columns = ["method", "layer", "morf_area", "lerf_area", "area_difference", "area_difference_low",
               "area_difference_high", "above_random", "k", "delta_loss", "delta_loss_std",
               "random_delta_mean", "random_delta_std", "random_draws", "p_vs_random"]
    table = pd.DataFrame(rows)
    table["layer"] = pd.Series([row["layer"] for row in rows], dtype=object)  # None, not NaN, for whole-model rows
    return table[[c for c in columns if c in table.columns]]
