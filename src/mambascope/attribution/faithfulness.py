"""Faithfulness of the attention-neuron methods, by perturbation (docs/methods.md, "Faithfulness").

(a) Token level (Samek et al. 2017 MoRF/LeRF perturbation curves; the protocol Ali et al. 2024 use for
Mamba attributions, with masking instead of deletion): on held-out windows of T tokens, the query is
q = T−2 and the target the actual next token (position T−1).  Each method ranks the context positions
0..q−1 by its relevance at layer ℓ; the top (MoRF) or bottom (LeRF) ⌊f·q⌉ of them are removed by setting
attention_mask to 0 there (Mamba zeroes those positions' inputs as Hugging Face does for padding; GPT-2
drops them as keys), for f = 0, 1/steps, …, 1, and log p(target | perturbed context) at q is recorded.
Areas are trapezoids over f ∈ [0, 1]; difference = LeRF area − MoRF area (larger = more faithful).
A ``random`` ranking (several seeds, mean) is always a row.

(b) Neuron level: each layer's units are ranked by each method's importance, summed over the selection
windows (same query/target rule); the top k are zero-ablated (Mamba: channels of ``mixer.hook_post``
via ``ablation_edits``; GPT-2: heads, by zeroing their attention pattern so the head writes nothing) and
the change of mean next-token loss on the (disjoint) evaluation windows is measured against k random
units (``draws`` ≥ 3 draws, mean and std).  ``random`` is always a row.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from torch import Tensor, nn

from mambascope.arch import is_transformer
from mambascope.attribution.extract import METHODS, check_layers, check_method, extract
from mambascope.attribution.methods import method_records
from mambascope.interventions.ablation import ablation_edits, heldout_loss, random_groups
from mambascope.trace import architecture, trace_stream
from mambascope.trace.forward import Edit

FRACTIONS_DEFAULT_STEPS = 10

__all__ = ["FRACTIONS_DEFAULT_STEPS", "evaluate_faithfulness", "faithfulness_table", "perturbed_logprob",
           "token_ranking"]


def _check_windows(windows: Tensor, what: str, min_len: int) -> Tensor:
    if not isinstance(windows, Tensor) or windows.dim() != 2 or windows.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty LongTensor [n, T]")
    if windows.shape[1] < min_len:
        raise ValueError(f"{what} need at least {min_len} tokens per window, got {windows.shape[1]}")
    return windows.long()


def token_ranking(relevance: Tensor, generator: torch.Generator) -> Tensor:
    """[b, n] positions ordered most relevant first; ties are broken by a seeded random permutation
    (a fixed tie order, e.g. by position, would bias MoRF and LeRF in opposite directions)."""
    perm = _random_orders(*relevance.shape, generator).to(relevance.device)
    order = torch.sort(relevance.gather(1, perm), dim=1, descending=True, stable=True).indices
    return perm.gather(1, order)


def _random_orders(b: int, n: int, generator: torch.Generator) -> Tensor:
    """[b, n]: an independent uniformly random permutation of 0..n-1 per row."""
    return torch.rand(b, n, generator=generator).argsort(dim=1)


def perturbed_logprob(model: nn.Module, ids: Tensor, order: Tensor, counts: Sequence[int], query: int,
                      target: Tensor, *, chunk: int = 64) -> Tensor:
    """log p(target | context with the first counts[i] positions of ``order`` masked) at ``query``.

    ids [b, T]; order [b, n] context positions (< query), removal order; target [b].  Returns [b, F].
    Positions after the query cannot affect it (causal models), so the input is cut at query + 1.
    """
    b = ids.shape[0]
    n = order.shape[1]
    device = ids.device
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=device).expand(b, n))  # rank of each context position
    c = torch.as_tensor(list(counts), device=device)
    F = c.numel()
    keep = (rank[None] >= c[:, None, None]).long()  # [F, b, n]
    mask = torch.ones(F, b, query + 1, dtype=torch.long, device=device)
    mask[:, :, :n] = keep
    inp = ids[:, : query + 1].expand(F, b, query + 1).reshape(F * b, query + 1)
    mask = mask.reshape(F * b, query + 1)
    tgt = target.expand(F, b).reshape(-1)
    out = []
    for start in range(0, F * b, chunk):  # a loop over row chunks (memory), not over tokens
        sl = slice(start, start + chunk)
        with torch.no_grad():
            logits = trace_stream(model, inp[sl], None, attention_mask=mask[sl])[:, query].float()
        out.append(torch.log_softmax(logits, -1).gather(1, tgt[sl, None])[:, 0])
    return torch.cat(out).reshape(F, b).T


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
) -> dict:
    """Token- and neuron-level faithfulness of ``methods`` at ``layers`` (module docstring).

    select_windows [n_s, T_s]: rank neurons (importance summed over these); eval_windows [n_e, T_e]:
    held-out windows for both the token curves and the ablation loss; they must not share a window.
    k: units ablated per layer (an int, or a fraction of the layer's units if in (0, 1)).  steps: the
    fraction axis is 0, 1/steps, …, 1.  random_seeds: random token rankings; draws: random unit sets.
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
    result: dict = {"arch": arch, "layers": layers, "methods": methods, "seed": seed, "errors": errors}
    fractions = [i / steps for i in range(steps + 1)]

    if token_level:
        result["token"] = _token_level(model, eval_windows, layers, valid, fractions, seed, random_seeds,
                                       batch_size, errors)
    if neuron_level:
        select_windows = _check_windows(select_windows, "select_windows", 3).to(device)
        if select_windows.shape[1] == eval_windows.shape[1]:
            same = (select_windows[:, None, :] == eval_windows[None, :, :]).all(-1)
            if bool(same.any()):
                raise ValueError(f"{int(same.any(0).sum())} eval window(s) also appear in select_windows: "
                                 "neuron ranking and its test must use disjoint windows")
        result["neuron"] = _neuron_level(model, select_windows, eval_windows, layers,
                                         [m for m in valid if m not in errors], k, seed, draws, batch_size, errors)
    return result


def _token_level(model: nn.Module, windows: Tensor, layers: list[int], methods: list[str], fractions: list[float],
                 seed: int, random_seeds: int, batch_size: int, errors: dict[str, str]) -> dict:
    T = windows.shape[1]
    q = T - 2
    counts = [round(f * q) for f in fractions]
    gen = torch.Generator().manual_seed(seed)
    F = len(fractions)
    sums: dict[str, dict[int, dict[str, Tensor]]] = {}
    rand_sum = {"morf": torch.zeros(random_seeds, F, dtype=torch.float64),
                "lerf": torch.zeros(random_seeds, F, dtype=torch.float64)}
    # one generator per random seed, kept across batches so every window gets its own permutation
    rand_gens = [torch.Generator().manual_seed(seed * 1000 + 1 + s) for s in range(random_seeds)]
    base_sum, n = 0.0, 0
    for batch, data, records in method_records(model, windows, layers, methods, query=q, batch_size=batch_size,
                                               errors=errors):
        target = data.target_token
        base_sum += float(data.target_logprob.double().sum())
        n += batch.shape[0]
        for method, recs in records.items():
            for layer in layers:
                order = token_ranking(recs[layer]["relevance"][:, :q].double(), gen)
                acc = sums.setdefault(method, {}).setdefault(
                    layer, {"morf": torch.zeros(F, dtype=torch.float64), "lerf": torch.zeros(F, dtype=torch.float64)})
                acc["morf"] += perturbed_logprob(model, batch, order, counts, q, target).double().sum(0).cpu()
                acc["lerf"] += perturbed_logprob(model, batch, order.flip(1), counts, q, target).double().sum(0).cpu()
        for s in range(random_seeds):  # a loop over random seeds
            order = _random_orders(batch.shape[0], q, rand_gens[s]).to(batch.device)
            for name, o in (("morf", order), ("lerf", order.flip(1))):
                rand_sum[name][s] += perturbed_logprob(model, batch, o, counts, q, target).double().sum(0).cpu()
    out_methods = {m: {str(layer): _curve_entry(acc["morf"] / n, acc["lerf"] / n, fractions)
                       for layer, acc in per.items()} for m, per in sums.items() if m not in errors}
    per_seed = [_curve_entry(rand_sum["morf"][s] / n, rand_sum["lerf"][s] / n, fractions) for s in range(random_seeds)]
    random = _curve_entry(rand_sum["morf"].mean(0) / n, rand_sum["lerf"].mean(0) / n, fractions)
    diffs = torch.tensor([p["difference"] for p in per_seed], dtype=torch.float64)
    random |= {"seeds": random_seeds, "difference_std": float(diffs.std()) if random_seeds > 1 else 0.0,
               "per_seed_difference": diffs.tolist()}
    return {"fractions": fractions, "removed_counts": counts, "query_position": q,
            "target": f"actual next token (position {T - 1})", "n_windows": n, "window": T,
            "baseline_logprob": base_sum / n, "methods": out_methods, "random": random}


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
                              "delta_mean": float(deltas.mean()), "delta_std": float(deltas.std())}
    out_methods: dict[str, dict] = {}
    for method, per in imp.items():
        if method in errors:
            continue
        out_methods[method] = {}
        for layer in layers:
            top = torch.topk(per[layer], ks[layer]).indices.sort().values
            loss = heldout_loss(model, evalw, edits=_unit_edits(model, layer, top), batch_size=batch_size).loss
            r = random[str(layer)]
            # z is undefined when the random draws do not spread (JSON null, not a made-up number)
            z = (loss - base.loss - r["delta_mean"]) / r["delta_std"] if r["delta_std"] > 0 else None
            out_methods[method][str(layer)] = {"k": ks[layer], "units": top.tolist(), "loss": loss,
                                               "delta": loss - base.loss, "z_vs_random": z}
    return {"baseline_loss": base.loss, "tokens": base.tokens, "n_select_windows": int(select.shape[0]),
            "n_eval_windows": int(evalw.shape[0]), "unit": "head" if is_transformer(architecture(model)) else "channel",
            "query_position": q, "methods": out_methods, "random": random}


def faithfulness_table(result: dict) -> pd.DataFrame:
    """One row per (method, layer), ``random`` included: token-curve areas and their difference, and the
    neuron ablation's loss change against the random units' mean and std."""
    token, neuron = result.get("token", {}), result.get("neuron", {})
    rows = []
    for method in [*[m for m in result["methods"] if m in METHODS], "random"]:
        if method in result.get("errors", {}):
            continue
        for layer in result["layers"]:
            key = str(layer)
            row: dict = {"method": method, "layer": layer}
            tok = token.get("random") if method == "random" else token.get("methods", {}).get(method, {}).get(key)
            if tok is not None:
                row |= {"morf_area": tok["morf_area"], "lerf_area": tok["lerf_area"],
                        "area_difference": tok["difference"]}
            rnd = neuron.get("random", {}).get(key)
            if method == "random" and rnd is not None:
                row |= {"k": rnd["k"], "delta_loss": rnd["delta_mean"], "delta_loss_std": rnd["delta_std"]}
            elif rnd is not None and key in neuron.get("methods", {}).get(method, {}):
                ent = neuron["methods"][method][key]
                row |= {"k": ent["k"], "delta_loss": ent["delta"], "random_delta_mean": rnd["delta_mean"],
                        "random_delta_std": rnd["delta_std"], "z_vs_random": ent["z_vs_random"]}
            rows.append(row)
    columns = ["method", "layer", "morf_area", "lerf_area", "area_difference", "k", "delta_loss", "delta_loss_std",
               "random_delta_mean", "random_delta_std", "z_vs_random"]
    table = pd.DataFrame(rows)
    return table[[c for c in columns if c in table.columns]]
