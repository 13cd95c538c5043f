"""The analyses end to end: the neuron census (docs/design.md §5) and the comprehensive analysis (§6, §8).

Selection and evaluation never share tokens: the analysed windows are split into a selection part,
which every accumulator sees, and a held-out tail (``heldout_fraction`` of the windows), on which
ablation and pruning measure the loss.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from mambascope.arch import adapter
from mambascope.attribution.faithfulness import TOKEN_WINDOWS
from mambascope.interventions import ablation_study, check_draws, heldout_loss, pruning_study
from mambascope.neurons import (
    ATTENTION_ROW_UNITS,
    EmptyAccumulatorError,
    LayerCensus,
    NeuronBatch,
    TopAttentionRows,
    TopContextAccumulator,
    detector_suppression,
    detector_tokens_by_layer,
    group_overlap,
    top_logit_tokens,
)
from mambascope.runner import LossResult, scan_corpus
from mambascope.trace import n_layers, neuron_write_weights, unembedding

GROUPS = ("dead", "rarely_active", "positional", "token_detector", "delta_sensitive")
# The traced units a census of each neuron kind reads (``Adapter.neuron_kind``).
CENSUS_UNITS = {"mamba": ["mixer.hook_post", "mixer.hook_gate_pre", "mixer.hook_dt"],
                "mamba2": ["mixer.hook_post", "mixer.hook_gate_pre", "mixer.hook_dt"],
                "gpt2": ["mlp.hook_post"], "gated_mlp": ["mlp.hook_post", "mlp.hook_pre"]}
# A MoE layer's experts are censused one by one with the rule of their MLP (``Adapter.moe_kind``).
EXPERT_KIND = {"moe": "gpt2", "gated_moe": "gated_mlp"}


def check_layers(model: nn.Module, layers: Sequence[int] | None) -> list[int]:
    """The requested layer indices, validated (None = every layer)."""
    count = n_layers(model)
    if layers is None:
        return list(range(count))
    bad = [layer for layer in layers if not 0 <= layer < count]
    if bad:
        raise IndexError(f"layer {bad[0]} out of range: the model has layers 0..{count - 1}")
    return sorted(set(layers))


def split_windows(windows: torch.Tensor, heldout_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(selection, held-out): the last ``heldout_fraction`` of the windows (corpus order) are held out.

    A ``data.stream.WindowStream`` is split as it streams instead (its own rule): a streamed selection
    and a held-out tensor."""
    if not isinstance(windows, torch.Tensor):
        return windows.split(heldout_fraction)
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    n_heldout = round(windows.shape[0] * heldout_fraction)
    if n_heldout < 1 or n_heldout >= windows.shape[0]:
        raise ValueError(f"{windows.shape[0]} windows cannot be split into selection and held-out parts; "
                         "give more text or a smaller --window")
    return windows[:-n_heldout], windows[-n_heldout:]


def _decode(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    return tokenizer.batch_decode([[int(i)] for i in ids])


def _decoded_contexts(top: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """Token ids of the contexts to strings ("" before the window start)."""
    ids = sorted({t for neuron in top["context_tokens"] for ctx in neuron for t in ctx if t >= 0})
    text = dict(zip(ids, _decode(tokenizer, ids), strict=True))
    top["tokens"] = [[[text.get(t, "") for t in ctx] for ctx in neuron] for neuron in top.pop("context_tokens")]
    top["activations"] = top.pop("context_post")
    return top


def activation_sign(layer_result: dict) -> torch.Tensor:
    """[E] sign of each neuron's typical activation: its mean ``post`` while active (``mean_post_active``).

    Mamba's post = y·SiLU(z) is often negative while the gate is open, and an activation a writes a·w_e,
    so the logit effect of the neuron when it fires is sign·effect.  A dead neuron (None) counts as +1.
    """
    mean_active = layer_result["activity"]["mean_post_active"]
    return torch.sign(torch.tensor([1.0 if m is None else m for m in mean_active], dtype=torch.float64))


def _logit_effects(W: torch.Tensor, norm_weight: torch.Tensor, W_U: torch.Tensor, tokenizer: Any,
                   sign: torch.Tensor, k: int = 10) -> dict[str, Any]:
    """Each neuron's most promoted and most suppressed tokens through the final norm and unembedding,
    for its typical activation's sign."""
    top = top_logit_tokens(W, norm_weight, W_U, k, activation_sign=sign)
    ids = sorted(set(top["promoted_tokens"].flatten().tolist()) | set(top["suppressed_tokens"].flatten().tolist()))
    text = dict(zip(ids, _decode(tokenizer, ids), strict=True))
    return {"promoted": [[text[t] for t in row] for row in top["promoted_tokens"].tolist()],
            "promoted_values": top["promoted_effects"].tolist(),
            "suppressed": [[text[t] for t in row] for row in top["suppressed_tokens"].tolist()],
            "suppressed_values": top["suppressed_effects"].tolist()}


def census_layers(model: nn.Module, layers: Sequence[int] | None) -> tuple[list[int], dict[int, str]]:
    """(the layers a per-layer census reads, {layer: why not} for the others): attention-only layers have
    no neurons; a MoE layer's experts are censused one by one instead (``census.moe_layers``)."""
    ad = adapter(model)
    skipped = {}
    for layer in check_layers(model, layers):
        kind = ad.neuron_kind(layer)
        if kind is None:
            skipped[layer] = f"{ad.layer_kind(layer)} layer: no neurons"
        elif kind not in CENSUS_UNITS:
            skipped[layer] = f"{ad.layer_kind(layer)} layer: its experts are censused one by one (moe_layers)"
    return [layer for layer in check_layers(model, layers) if layer not in skipped], skipped


def expert_batches(tensors: dict[str, torch.Tensor], kind: str, ids: torch.Tensor, bos: int | None, layer: int,
                   rows: torch.Tensor) -> Iterator[tuple[int, NeuronBatch]]:
    """One batch per expert of a MoE layer: expert x's neurons ``mlp.hook_post[:, :, x]``, valid only on
    the tokens routed to x (``mlp.hook_route[..., x] > 0``), so that its statistics count those tokens."""
    post, route = tensors["mlp.hook_post"], tensors["mlp.hook_route"]
    for x in range(post.shape[2]):
        units = {name: tensors[name][:, :, x] for name in ("mlp.hook_post", "mlp.hook_pre") if name in tensors}
        batch = NeuronBatch.from_layer(units, EXPERT_KIND[kind], ids, bos_token_id=bos, label=f"{layer}.expert{x}",
                                       window_ids=rows)
        yield x, dataclasses.replace(batch, valid=batch.valid & (route[:, :, x] > 0))


def _expert_results(census: dict[int, LayerCensus]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for x, c in census.items():
        try:
            results[str(x)] = c.finalize()
        except EmptyAccumulatorError:
            results[str(x)] = {"skipped": "no token of the corpus was routed to this expert"}
    return results


def _head_dim(model: nn.Module, layer: int) -> int:
    """Channels per Δ unit: Mamba-2's head dim (Δ per head), 1 elsewhere."""
    ad = adapter(model)
    return ad.mixer_params(layer).head_dim if ad.neuron_kind(layer) == "mamba2" else 1


def neuron_groups(layer_result: dict, arch: str, head_dim: int) -> dict[str, list[int]]:
    """The census groups of one layer as neuron indices.

    Δ-sensitive: the most selective Δ units (``delta_sensitive``, sorted by selectivity), at most a quarter
    of the layer's Δ units so that the group never is the whole layer (Mamba-2 has few heads); a
    Mamba-2 head counts as all of its channels.
    """
    delta = []
    if layer_result.get("delta_sensitive"):
        cap = max(1, layer_result["delta"]["n_units"] // 4)
        delta = [d["index"] for d in layer_result["delta_sensitive"][:cap]]
        delta = [h * head_dim + j for h in delta for j in range(head_dim)]  # head_dim is 1 on Mamba-1
    return {"dead": layer_result["dead_neurons"], "rarely_active": layer_result["rarely_active"],
            "positional": layer_result["positional_neurons"],
            "token_detector": [d["neuron"] for d in layer_result["token_detectors"]],
            "delta_sensitive": delta}


def pruning_priority(layer_result: dict, write_norms: torch.Tensor) -> torch.Tensor:
    """Neuron order for pruning: dead, then rarely active (rarest first), then lowest importance,
    importance = mean |post| × ‖write vector‖ (the neuron's out_proj column)."""
    freq = torch.tensor(layer_result["activation_frequency"], dtype=torch.float64)
    importance = torch.tensor(layer_result["activity"]["mean_abs_post"], dtype=torch.float64) * write_norms.double()
    category = torch.full_like(freq, 2.0)
    category[layer_result["rarely_active"]] = 1.0
    category[layer_result["dead_neurons"]] = 0.0
    secondary = torch.where(category == 1.0, freq, importance)
    order = torch.argsort(secondary, stable=True)
    return order[torch.argsort(category[order], stable=True)]


def census_accumulate(model: nn.Module, tokenizer: Any, windows: torch.Tensor, *,
                      layers: Sequence[int] | None = None, batch_size: int = 8, progress: bool = True,
                      census_options: dict | None = None, top_k_contexts: int = 5, context_width: int = 16,
                      scan: Callable[..., LossResult] | None = None, ngram_counters: int | Any | None = None
                      ) -> tuple[dict[int, LayerCensus], dict[int, TopContextAccumulator],
                                 dict[int, dict[int, LayerCensus]], LossResult, dict[int, TopAttentionRows]]:
    """The traced pass of the census: every chosen layer's ``LayerCensus`` and ``TopContextAccumulator``
    (and each MoE layer's experts' ``LayerCensus``, as they are seen) fed with ``windows`` [n, T], the
    next-token loss, and each SSM layer's ``TopAttentionRows`` (the hidden-attention rows of the top contexts,
    computed in this same pass).  ``scan``: ``scale.scan_function(plan)`` for a resumable or multi-process pass
    (default: one plain ``scan_corpus``).  ``ngram_counters``: count the n-grams of order >= 2 in
    Misra-Gries summaries of that many counters per neuron (``neurons.heavy_hitters``; bounded memory,
    approximate n-gram coverage) instead of exact tables; a ``heavy_hitters.Summaries`` also says which
    orders (1: the token detectors' unigram table too)."""
    ad = adapter(model)
    moe = {layer: ad.moe_kind(layer) for layer in check_layers(model, layers) if ad.moe_kind(layer)}
    layers, skipped = census_layers(model, layers)
    if not layers and not moe:
        raise ValueError(f"no layer of this {ad.model_type} model has neurons the census reads: {skipped}")
    kinds = {layer: ad.neuron_kind(layer) for layer in layers}
    vocab = model.get_input_embeddings().num_embeddings
    if ngram_counters is not None and not getattr(ngram_counters, "delta_tokens", True):
        census_options = {**(census_options or {}), "delta_token_channels": None}  # the memory plan's choice
    census = {layer: LayerCensus(kinds[layer], vocab, layer=layer, **(census_options or {})) for layer in layers}
    if ngram_counters is not None:
        from mambascope.neurons.heavy_hitters import BoundedTokenDetectorAccumulator

        for part in census.values():
            part.detectors = BoundedTokenDetectorAccumulator.like(part.detectors, ngram_counters)
    tops = {layer: TopContextAccumulator(top_k_contexts, context_width, layer=layer) for layer in layers}
    rows = {layer: TopAttentionRows(ad.mixer_params(layer), context_width, layer=layer) for layer in layers
            if kinds[layer] in ("mamba", "mamba2")}
    experts: dict[int, dict[int, LayerCensus]] = {layer: {} for layer in moe}  # filled as experts are seen
    bos = tokenizer.bos_token_id
    units = [f"blocks.{layer}.{u}" for layer in layers
             for u in dict.fromkeys([*CENSUS_UNITS[kinds[layer]], *(ATTENTION_ROW_UNITS if layer in rows else ())])]
    units += [f"blocks.{layer}.mlp.{u}" for layer, kind in moe.items()
              for u in ("hook_post", "hook_route", *(["hook_pre"] if kind == "gated_moe" else []))]

    def consume(layer: int, tensors: dict[str, torch.Tensor], ids: torch.Tensor, rows_of_batch: torch.Tensor) -> None:
        device = next(iter(tensors.values())).device
        ids = ids.to(device)
        if layer in census:
            batch = NeuronBatch.from_layer(tensors, kinds[layer], ids, bos_token_id=bos, label=layer,
                                           window_ids=rows_of_batch)
            census[layer].update(batch)
            tops[layer].update(batch)
            if layer in rows:
                rows[layer].update(tensors, tops[layer], rows_of_batch)
        if layer in moe:
            for x, batch in expert_batches(tensors, moe[layer], ids, bos, layer, rows_of_batch):
                if x not in experts[layer]:
                    experts[layer][x] = LayerCensus(EXPERT_KIND[moe[layer]], vocab, layer=f"{layer}.expert{x}",
                                                    **(census_options or {}))
                    if ngram_counters is not None:
                        from mambascope.neurons.heavy_hitters import BoundedTokenDetectorAccumulator

                        experts[layer][x].detectors = BoundedTokenDetectorAccumulator.like(
                            experts[layer][x].detectors, ngram_counters)
                experts[layer][x].update(batch)

    if scan is None:
        loss = scan_corpus(model, windows, consume, names=units, batch_size=batch_size, progress=progress,
                           description="census")
    else:  # the scan may restore (resume) or merge (ranks) the accumulators in these dicts
        loss = scan(model, windows, consume, {"census": census, "tops": tops, "experts": experts, "rows": rows},
                    names=units, batch_size=batch_size, progress=progress, description="census")
    return census, tops, experts, loss, rows


def finish_layer(result: dict[str, Any], top: TopContextAccumulator, W: torch.Tensor | None,
                 unembed: tuple[torch.Tensor, torch.Tensor], tokenizer: Any, head_dim: int = 1) -> None:
    """Complete a finalized ``LayerCensus`` result in place: decoded detector and Δ tokens, ``suppression``,
    ``overlap``, decoded ``top_contexts`` and ``logit_effects`` through the write weights W [d_model, E] and
    ``unembed`` (final-norm weight, W_U) for each unit's typical sign.  W None (a unit with no linear write
    into the residual stream): suppression and logit effects are None."""
    norm_weight, W_U = unembed
    for det in result["token_detectors"]:
        det["token_strings"] = _decode(tokenizer, det["tokens"])
    for d in result["delta_sensitive"] or []:
        for t in d["top_tokens"] or []:
            t["string"] = _decode(tokenizer, [t["token"]])[0]
    sign = activation_sign(result)
    result["suppression"] = None if W is None else detector_suppression(
        W, norm_weight, W_U, result["token_detectors"], activation_sign=sign)
    result["overlap"] = group_overlap(neuron_groups(result, result["arch"], head_dim), result["n_neurons"])
    result["top_contexts"] = _decoded_contexts(top.finalize(), tokenizer)
    result["logit_effects"] = None if W is None else _logit_effects(W, norm_weight, W_U, tokenizer, sign)


def census_pass(model: nn.Module, tokenizer: Any, windows: torch.Tensor, *, layers: Sequence[int] | None = None,
                batch_size: int = 8, progress: bool = True, census_options: dict | None = None,
                top_k_contexts: int = 5, context_width: int = 16,
                scan: Callable[..., LossResult] | None = None, ngram_counters: int | Any | None = None
                ) -> dict[str, Any]:
    """The neuron census of every chosen layer in one traced pass over ``windows`` [n, T] (no padding).

    Returns ``tokens``, ``window``, ``loss`` (next-token loss on the same windows), ``layers`` {layer:
    ``LayerCensus.finalize()`` + decoded detector tokens, ``suppression``, ``overlap``, ``top_contexts``,
    ``logit_effects``} and ``detector_tokens_by_layer``.  ``scan``, ``ngram_counters``: as in
    ``census_accumulate``; with ``ngram_counters``, ``approximate`` lists the fields that are bounds.
    """
    ad = adapter(model)
    moe = {layer: ad.moe_kind(layer) for layer in check_layers(model, layers) if ad.moe_kind(layer)}
    census, tops, experts, loss, rows = census_accumulate(
        model, tokenizer, windows, layers=layers, batch_size=batch_size, progress=progress,
        census_options=census_options, top_k_contexts=top_k_contexts, context_width=context_width, scan=scan,
        ngram_counters=ngram_counters)
    layers, skipped = census_layers(model, layers)
    norm_weight, W_U = (t.float() for t in unembedding(model))
    moe_layers = {str(layer): {"layer_kind": ad.layer_kind(layer), "experts_as": EXPERT_KIND[kind],
                               "experts": _expert_results(experts[layer])} for layer, kind in moe.items()}
    out: dict[str, Any] = {"tokens": int(windows.numel()), "window": int(windows.shape[1]), "loss": loss.loss,
                           "layers": {}, "skipped_layers": {str(layer): why for layer, why in skipped.items()},
                           "moe_layers": moe_layers}
    if ngram_counters is not None:
        from mambascope.neurons.heavy_hitters import Summaries

        orders = tuple({n for part in census.values() for n in part.detectors.ngram_orders})
        out["approximate"] = Summaries.of(ngram_counters).approximate_fields(orders)
    for layer in layers:
        result = census[layer].finalize()
        result["layer_kind"] = ad.layer_kind(layer)
        finish_layer(result, tops[layer], neuron_write_weights(model, layer).float(), (norm_weight, W_U),
                     tokenizer, _head_dim(model, layer))
        out["layers"][str(layer)] = result
    out["detector_tokens_by_layer"] = detector_tokens_by_layer(
        [out["layers"][str(layer)]["tokens_covered"] for layer in layers])
    context_attention_rows(out["layers"], rows)
    out["candidates"] = strongest_candidates(out["layers"])
    return out


CANDIDATES_PER_KIND = 5


def _ranked(layers: dict[str, dict], score: Callable[[dict], list[float | None]], n: int,
            descending: bool) -> list[tuple[int, int, float]]:
    """The ``n`` (layer, neuron, value) of largest (``descending``) or smallest ``score`` over all layers;
    None values are left out, ties go to the earlier layer and neuron."""
    found = [(int(layer), e, float(v)) for layer, r in layers.items() for e, v in enumerate(score(r) or [])
             if v is not None]
    return sorted(found, key=lambda x: (-x[2] if descending else x[2], x[0], x[1]))[:n]


def strongest_candidates(layers: dict[str, dict], n: int = CANDIDATES_PER_KIND) -> dict[str, Any]:
    """The ``n`` strongest candidates of each kind over every census layer, with the statistic each kind is
    judged by, its threshold and whether the neuron passes (docs/results.md, ``census.candidates``): the
    most positional (bias-corrected MI), the most token-selective (fewest unigram types covering the
    detector coverage of its activations), the least active (activation frequency) neurons and the most
    Δ-selective units.  From the finalized layer results only: no model runs."""
    if not layers:
        return {}
    first = next(iter(layers.values()))
    pos_cfg, det_cfg = first.get("positional") or {}, (first.get("detectors") or {}).get("criteria") or {}
    rare = (first.get("activity") or {}).get("rare_threshold")
    out: dict[str, Any] = {"per_kind": n}

    def positional_status(r: dict, e: int) -> str:
        pos = r.get("positional") or {}
        if e in set(r.get("positional_neurons") or []):
            return "positional"
        if pos.get("positional_p_value") is None:
            return "untested (no null)"
        if r["positional_mi"][e] <= pos["positional_threshold"]:
            return "below threshold (MI)"
        return "not significant (p >= alpha)"

    out["positional"] = {
        "statistic": "bias-corrected I(active; position), nats", "threshold": pos_cfg.get("positional_threshold"),
        "alpha": pos_cfg.get("positional_alpha"),
        "neurons": [{"layer": layer, "neuron": e, "mi": v,
                     "p_value": ((layers[str(layer)]["positional"].get("positional_p_value") or [None] * (e + 1))[e]),
                     "status": positional_status(layers[str(layer)], e)}
                    for layer, e, v in _ranked(layers, lambda r: r.get("positional_mi"), n, True)]}

    def coverage(r: dict) -> list[float | None]:  # types needed, for neurons with enough activations
        needed = (((r.get("detectors") or {}).get("ngram_coverage") or {}).get("1") or {}).get("needed") or []
        active = (r.get("activity") or {}).get("active_count") or []
        floor = det_cfg.get("min_occurrences", 0)
        return [v if v is not None and e < len(active) and active[e] >= floor else None for e, v in enumerate(needed)]

    def detector_status(r: dict, e: int, needed: float) -> str:
        if e in {d["neuron"] for d in r.get("token_detectors") or []}:
            return "token detector"
        if needed > det_cfg.get("max_types", 0):
            return "below threshold (too many types)"
        return "below threshold (precision)"

    out["token_selective"] = {
        "statistic": f"unigram types covering {det_cfg.get('coverage')} of the neuron's activations (fewest first)",
        "threshold": det_cfg.get("max_types"), "min_activations": det_cfg.get("min_occurrences"),
        "neurons": [{"layer": layer, "neuron": e, "types_needed": int(v),
                     "activations": layers[str(layer)]["activity"]["active_count"][e],
                     "status": detector_status(layers[str(layer)], e, v)}
                    for layer, e, v in _ranked(layers, coverage, n, False)]}

    def activity_status(r: dict, e: int) -> str:
        if e in set(r.get("dead_neurons") or []):
            return "dead"
        return "rarely active" if e in set(r.get("rarely_active") or []) else "above the rare threshold"

    out["least_active"] = {
        "statistic": "activation frequency (dead: 0)", "threshold": rare,
        "neurons": [{"layer": layer, "neuron": e, "frequency": v, "tokens": layers[str(layer)].get("tokens"),
                     "status": activity_status(layers[str(layer)], e)}
                    for layer, e, v in _ranked(layers, lambda r: r.get("activation_frequency"), n, False)]}

    def selectivity(r: dict) -> list[float | None]:  # over the recorded top units of the layer
        top = r.get("delta_sensitive") or []
        units = [None] * (max((d["index"] for d in top), default=-1) + 1)
        for d in top:
            units[d["index"]] = d["selectivity"]
        return units

    out["delta_sensitive"] = {
        "statistic": "selectivity std(ln Δ) of a Δ unit (channel; Mamba-2: head)", "threshold": None,
        "units": [{"layer": layer, "unit": u, "selectivity": v,
                   "status": "ranked (Δ-sensitivity has no threshold)"}
                  for layer, u, v in _ranked(layers, selectivity, n, True)]}
    return out


def context_attention_rows(layer_results: dict[str, dict], rows: dict[int, TopAttentionRows]) -> None:
    """Add ``attention_rows`` to each SSM layer result: for every neuron, the exact hidden-attention row
    α[t, ·] of its channel (Mamba-2: its head) at the peak t of its top context, over that context's
    tokens (None before the window start), as the census pass computed them (``TopAttentionRows``)."""
    for layer, accumulator in rows.items():
        result = layer_results[str(layer)]
        result["attention_rows"] = accumulator.finalize(result["top_contexts"])


def feature_census(model: nn.Module, tokenizer: Any, windows: torch.Tensor, dictionary: tuple[Any, Any, str],
                   neuron_layers: dict[str, dict] | None = None, *, batch_size: int = 8, progress: bool = True,
                   census_options: dict | None = None, top_k_contexts: int = 5, context_width: int = 16
                   ) -> dict[str, Any]:
    """The census of a dictionary's features on ``windows`` [n, T] in one traced pass (docs/features.md):
    ``dictionary`` {path, kind, hooks, widths}, ``layers`` {layer: the finalized feature census, completed like
    a neuron layer by ``finish_layer``}, ``tokens``, ``loss`` and, where ``neuron_layers`` holds the neuron
    census of the same layer and tokens, ``versus_neurons`` (``features.census.feature_summary``)."""
    from mambascope.features.census import FeatureCensus, feature_summary, feature_write_weights

    coder, spec, path = dictionary
    features = FeatureCensus(coder, spec, model.get_input_embeddings().num_embeddings, tokenizer.bos_token_id,
                             census_options=census_options, top_k_contexts=top_k_contexts,
                             context_width=context_width)
    loss = scan_corpus(model, windows, features.consume, names=features.names, batch_size=batch_size,
                       progress=progress, description="features")
    result = features.census.finalize()
    result["layer_kind"] = "features"
    W, how = feature_write_weights(model, coder, spec)
    finish_layer(result, features.tops, W, tuple(t.float() for t in unembedding(model)), tokenizer)
    layer = str(features.layer)
    out = {"dictionary": {"path": str(path), "kind": spec.kind, "hook_in": spec.hook_in, "hook_out": spec.hook_out,
                          "d_in": spec.d_in, "d_out": spec.d_out, "d_sae": spec.d_sae, "k": spec.k,
                          "model_name": spec.model_name},
           "tokens": int(windows.numel()), "loss": loss.loss, "layers": {layer: result}, "logit_effects": how}
    neurons = (neuron_layers or {}).get(layer)
    if neurons is not None and adapter(model).neuron_unit(features.layer) is not None:
        out["versus_neurons"] = feature_summary(neurons, result, features.layer)
    return out


def census_interventions(model: nn.Module, layer_results: dict[str, dict], heldout: torch.Tensor, *,
                         draws: int = 3, seed: int = 0, batch_size: int = 8,
                         pruning_ratios: Sequence[float] = (0.1, 0.25, 0.5), progress: bool = False) -> dict[str, Any]:
    """Ablation of every census group and pruning, measured on ``heldout`` windows the census never saw.

    Reads the groups, the neurons' means (mean ablation) and the pruning priority from the census
    results.  Returns ``{"ablation": ..., "pruning": ...}``.
    """
    layers = [int(layer) for layer in layer_results]
    groups = {layer: neuron_groups(layer_results[str(layer)], layer_results[str(layer)]["arch"],
                                   _head_dim(model, layer)) for layer in layers}
    means = {layer: torch.tensor(layer_results[str(layer)]["activity"]["mean_post"]) for layer in layers}
    priority = {layer: pruning_priority(layer_results[str(layer)],
                                        neuron_write_weights(model, layer).float().norm(dim=0).cpu())
                for layer in layers}
    by_group = {g: {layer: groups[layer][g] for layer in layers} for g in GROUPS}
    n_neurons = {layer: layer_results[str(layer)]["n_neurons"] for layer in layers}
    base = heldout_loss(model, heldout, batch_size=batch_size)  # both studies' unedited loss
    ablation = ablation_study(model, heldout, by_group, means, n_neurons, draws=draws, seed=seed,
                              batch_size=batch_size, progress=progress, baseline=base)
    pruning = pruning_study(model, heldout, priority, pruning_ratios, draws=draws, seed=seed, batch_size=batch_size,
                            progress=progress, baseline=base)
    pruning["priority"] = "dead, then rarely active (rarest first), then lowest mean|post| x |out_proj column|"
    return {"ablation": ablation, "pruning": pruning}


def run_census(model: nn.Module, tokenizer: Any, windows: torch.Tensor, *, layers: Sequence[int] | None = None,
               heldout_fraction: float = 0.25, batch_size: int = 8, draws: int = 3, seed: int = 0,
               ablation: bool = True, pruning_ratios: Sequence[float] = (0.1, 0.25, 0.5), progress: bool = True,
               census_options: dict | None = None) -> dict[str, Any]:
    """``census_pass`` on the selection windows, then (if ``ablation``) ``census_interventions`` on the
    held-out tail.  Returns the census dict with ``ablation`` and ``pruning`` added."""
    if ablation:
        check_draws(draws)
    select, heldout = split_windows(windows, heldout_fraction) if ablation else (windows, None)
    out = census_pass(model, tokenizer, select, layers=layers, batch_size=batch_size, progress=progress,
                      census_options=census_options)
    if heldout is not None:
        out["heldout_tokens"] = int(heldout.numel())
        out.update(census_interventions(model, out["layers"], heldout, draws=draws, seed=seed,
                                        batch_size=batch_size, pruning_ratios=pruning_ratios))
    return out


def neuron_table(census: dict[str, Any]) -> pd.DataFrame:
    """One row per layer x neuron: frequency, positional MI and correlation, detector tokens, Δ statistics."""
    frames = []
    for layer, r in census["layers"].items():
        E = r["n_neurons"]
        detector = {d["neuron"]: " ".join(repr(s) for s in d["token_strings"]) for d in r["token_detectors"]}
        frame = pd.DataFrame({
            "layer": int(layer), "neuron": range(E), "frequency": r["activation_frequency"],
            "dead": [False] * E, "rarely_active": [False] * E, "positional_mi": r["positional_mi"],
            "position_correlation": r["positional"]["position_correlation"],
            "mean_post": r["activity"]["mean_post"], "mean_abs_post": r["activity"]["mean_abs_post"],
            "detector_tokens": [detector.get(e, "") for e in range(E)],
        })
        frame.loc[r["dead_neurons"], "dead"] = True
        frame.loc[r["rarely_active"], "rarely_active"] = True
        # the census's decision: bias-corrected MI above the threshold and the permutation test passed
        frame["positional"] = False
        frame.loc[r["positional_neurons"], "positional"] = True
        if r["delta"] is not None:
            per_unit = E // r["delta"]["n_units"]  # 1 on Mamba-1; head_dim on Mamba-2 (Δ per head)
            for key in ("mean", "std", "selectivity"):
                frame[f"dt_{key}"] = [v for v in r["delta"][key] for _ in range(per_unit)]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def model_info(model: nn.Module, name: str) -> dict[str, Any]:
    """What the results file says about the model."""
    ad = adapter(model)
    first = next(layer for layer in range(ad.n_layers) if ad.neuron_kind(layer) is not None)
    width = neuron_write_weights(model, first).shape
    return {"name": name, "arch": ad.model_type, "n_layers": n_layers(model), "d_model": int(width[0]),
            "d_inner": int(width[1]), "layer_kinds": [ad.layer_kind(layer) for layer in range(ad.n_layers)],
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device": str(next(model.parameters()).device)}


STAGES = ("census", "features", "interventions", "attention_neurons")
DEFAULT_STAGES = ("census", "interventions", "attention_neurons")  # "features" needs a dictionary


def run_analysis(model: nn.Module, tokenizer: Any, windows: torch.Tensor, *, info: dict[str, Any],
                 layers: Sequence[int] | None = None, attention_layers: Sequence[int] | None = None,
                 methods: Sequence[str] | None = None, whole_model_methods: Sequence[str] = (),
                 token_windows: int | None = TOKEN_WINDOWS, stages: Sequence[str] = DEFAULT_STAGES,
                 heldout_fraction: float = 0.25, attention_windows: int = 16, faithfulness: bool = True,
                 batch_size: int = 8, draws: int = 3, seed: int = 0, progress: bool = True,
                 save: Any = None, scan: Callable[..., LossResult] | None = None,
                 ngram_counters: int | None = None, dictionary: Any = None,
                 census_options: dict | None = None) -> dict[str, Any]:
    """Every analysis in ``stages`` on ``windows`` [n, T]; the results-file dict (docs/design.md §8).

    ``info`` holds ``model`` and ``corpus`` descriptions.  Selection (census, attention-neuron ranking)
    uses the first part of the windows, held-out evaluation (ablation, pruning, faithfulness) the last
    ``heldout_fraction``.  A stage that fails is recorded in ``errors`` by name with its reason and the
    others run; ``save(results)`` is called after each stage, so an interrupt (re-raised) loses nothing
    finished, and ``incomplete`` lists the stages that did not run.  ``scan``: the census's traced pass
    (``census_accumulate``), e.g. resumable or shared by ``torchrun`` ranks; ``ngram_counters``: bounded
    n-gram summaries (``census_accumulate``).  ``dictionary`` (coder, spec, path) from
    ``features.census.open_dictionary``: the ``features`` stage censuses its features on the same windows.
    ``census_options``: ``LayerCensus`` options of both censuses (e.g. the detectors' ``min_precision``).
    ``whole_model_methods``: whole-model token attributions scored in the attention stage's token-level
    faithfulness beside the attention-neuron methods (``evaluate_faithfulness``), on ``token_windows`` windows.

    The returned dict holds every per-neuron field; ``results.save_results`` writes it as a slim
    ``results.json`` plus the neuron store (``mambascope.results.store``; docs/results.md says where each field goes).
    """
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}: choose from {', '.join(STAGES)}")
    check_draws(draws)
    layers = check_layers(model, layers)
    select, heldout = split_windows(windows, heldout_fraction)
    results: dict[str, Any] = {**info, "layers": {}, "census": None, "ablation": None, "pruning": None,
                               "attention_neurons": None, "errors": {}, "timings": {}, "incomplete": list(stages)}
    streamed = not isinstance(select, torch.Tensor)  # its length is known once the census has read it
    results["corpus"] = {**results.get("corpus", {}), "selection_tokens": None if streamed else int(select.numel()),
                         "heldout_tokens": int(heldout.numel())}

    def census() -> None:
        # census_options only when given: census_pass keeps its own default otherwise (or one bound to it)
        options = {} if census_options is None else {"census_options": census_options}
        out = census_pass(model, tokenizer, select, layers=layers, batch_size=batch_size, progress=progress,
                          scan=scan, ngram_counters=ngram_counters, **options)
        results["corpus"]["selection_tokens"] = out["tokens"]
        results["layers"] = out.pop("layers")
        results["census"] = out

    def features() -> None:
        if dictionary is None:
            raise ValueError("the features stage needs a dictionary (--dictionary DIR)")
        results["features"] = feature_census(model, tokenizer, select, dictionary, results["layers"],
                                             batch_size=batch_size, progress=progress, census_options=census_options)

    def interventions() -> None:
        if not results["layers"]:
            raise RuntimeError("needs the census, which did not finish")
        results.update(census_interventions(model, results["layers"], heldout, draws=draws, seed=seed,
                                            batch_size=batch_size, progress=progress))

    def attention() -> None:
        from mambascope.attention_neurons import run_attention_analysis

        n = min(attention_windows, select.shape[0], heldout.shape[0])
        # hybrids: attention neurons come from the SSM layers' hidden attention
        ssm = [layer for layer in layers if layer in adapter(model).ssm_layers()]
        default = ssm or layers
        results["attention_neurons"] = run_attention_analysis(
            model, select[:n], layers=list(attention_layers if attention_layers is not None else default),
            methods=methods, faithfulness=faithfulness, select_windows=select[:n], eval_windows=heldout,
            batch_size=batch_size, seed=seed, draws=draws, neuron_windows=n, whole_model=whole_model_methods,
            token_windows=token_windows)

    work = {"census": census, "features": features, "interventions": interventions, "attention_neurons": attention}
    todo = [s for s in STAGES if s in stages]
    for index, name in enumerate(todo, 1):
        if progress:
            print(f"[{index}/{len(todo)}] {name.replace('_', ' ')}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            work[name]()
        except KeyboardInterrupt:
            results["errors"][name] = "interrupted"
            if save is not None:
                save(results)
            raise
        except Exception as exc:  # one failing analysis must not take the others down (docs/design.md §6)
            results["errors"][name] = f"{type(exc).__name__}: {exc}"
        results["timings"][name] = round(time.perf_counter() - start, 3)
        results["incomplete"].remove(name)
        if save is not None:
            save(results)
    return results


def _windows(tokenizer: Any, texts: Sequence[str], window: int, max_tokens: int | None) -> torch.Tensor:
    from mambascope.data import tokenize_windows

    return tokenize_windows(texts, tokenizer, window, max_tokens=max_tokens).ids


def _as_layers(layer_idx: int | Sequence[int] | None) -> list[int] | None:
    return [layer_idx] if isinstance(layer_idx, int) else layer_idx


def run_complete_neuron_analysis(model: nn.Module, tokenizer: Any, texts: Sequence[str],
                                 layer_idx: int | Sequence[int] | None = None, *, window: int = 128,
                                 max_tokens: int | None = None, **options: Any) -> dict[str, Any]:
    """The seed's name for the neuron census of ``texts``: dead, rarely active, positional, token
    detectors, Δ-sensitive, overlap, ablation and pruning (``run_census``) for ``layer_idx`` (None = all).

    Returns ``run_census``'s dict: ``tokens``, ``window``, ``loss``, ``layers`` {layer: per-layer keys of
    docs/design.md §8}, ``detector_tokens_by_layer``, ``heldout_tokens``, ``ablation``, ``pruning``; every
    per-neuron list in memory (written to disk, they go to the neuron store: ``results.save_results``).
    """
    return run_census(model, tokenizer, _windows(tokenizer, texts, window, max_tokens),
                      layers=_as_layers(layer_idx), **options)


def run_comprehensive_analysis(model: nn.Module, tokenizer: Any, texts: Sequence[str], layer_idx: int = 0, *,
                               window: int = 128, max_tokens: int | None = None, model_name: str = "model",
                               **options: Any) -> dict[str, Any]:
    """The seed's entry point: every analysis on ``texts``, attention neurons on ``layer_idx``.

    Returns the results-file dict plus ``analysis_results`` = {census, attention_neurons, ablation,
    pruning} (the seed's layout: ``results["analysis_results"]["attention_neurons"]``).
    """
    windows = _windows(tokenizer, texts, window, max_tokens)
    info = {"model": model_info(model, model_name),
            "corpus": {"name": "texts", "texts": len(texts), "tokens": int(windows.numel()), "window": window}}
    results = run_analysis(model, tokenizer, windows, info=info, attention_layers=[layer_idx], **options)
    results["analysis_results"] = {key: results[key] for key in ("census", "attention_neurons", "ablation",
                                                                  "pruning")}
    return results


def _warning_lines(layers: dict[str, Any]) -> list[str]:
    """One line per distinct small-sample warning of the census, with the layers it applies to."""
    where: dict[str, list[str]] = {}
    for layer, r in layers.items():
        for warning in r.get("warnings") or []:
            where.setdefault(warning, []).append(layer)
    return [f"WARNING (layers {', '.join(names)}): {warning}" for warning, names in where.items()]


def print_analysis_summary(results: dict[str, Any], file: Any = None) -> None:
    """A short plain-text summary of a results dict: per-layer census counts, losses, attention, errors."""
    lines = []
    model, corpus = results.get("model", {}), results.get("corpus", {})
    lines.append(f"model {model.get('name')} ({model.get('arch')}, {model.get('n_layers')} layers, "
                 f"d_inner {model.get('d_inner')}); corpus {corpus.get('name')} "
                 f"{corpus.get('split', '')} {corpus.get('tokens')} tokens")
    if results.get("layers"):
        lines.append(f"{'layer':>5} {'kind':>9} {'dead %':>7} {'rare':>5} {'alive freq':>10} {'positional':>10} "
                     f"{'detectors':>9} {'Δ top sel.':>10}")
        for layer, r in results["layers"].items():
            delta = r.get("delta_sensitive")
            sel = f"{delta[0]['selectivity']:.3f}" if delta else "n/a"
            alive = r.get("mean_frequency_alive")
            lines.append(f"{layer:>5} {r.get('layer_kind', ''):>9} {r['pct_dead']:>7.2f} {len(r['rarely_active']):>5} "
                         f"{alive if alive is None else round(alive, 3)!s:>10} {len(r['positional_neurons']):>10} "
                         f"{len(r['token_detectors']):>9} {sel:>10}")
        pos = [r.get("positional") or {} for r in results["layers"].values()]
        if pos and "positional_alpha" in pos[0]:
            plugin = ", ".join(str(p["n_positional_plugin"]) for p in pos)
            lines.append(f"positional = bias-corrected MI > {pos[0]['positional_threshold']} and within-window "
                         f"permutation p < {pos[0]['positional_alpha']}; {pos[0]['median_tokens_per_position']} "
                         f"tokens per position (plug-in MI alone: {plugin})")
        lines.extend(_warning_lines(results["layers"]))
    if results.get("census"):
        lines.append(f"loss on the selection windows: {results['census']['loss']:.4f} nats/token")
    vs = (results.get("features") or {}).get("versus_neurons")
    if vs:
        c = vs["criteria"]
        lines.append(f"features of {results['features']['dictionary']['hook_in']} vs its neurons, token detectors at "
                     f"precision >= {c['min_precision']} on the same {vs['tokens']} tokens:")
        for unit in ("neurons", "features"):
            row = vs[unit]
            share = "n/a" if row["share_of_alive"] is None else f"{row['share_of_alive']:.3f}"
            need = row["types_needed"]
            lines.append(f"  {unit:<9} token detectors {row['token_detectors']} of {row['alive']} alive ({share}); "
                         f"dead {row['dead']}, rarely active {row['rarely_active']}, positional {row['positional']}; "
                         f"types covering {c['coverage']} of a unit's activations: median {need['median']}, "
                         f"<= {c['max_types']}: {need['at_most_max_types']}, <= 20: {need['at_most_20']} "
                         f"(of {need['units_counted']})")
    if results.get("ablation"):
        a = results["ablation"]
        lines.append(f"held-out loss {a['baseline_loss']:.4f}; zero-ablation Δloss per group (random control):")
        for name, g in a["groups"].items():
            if "zero" in g:
                lines.append(f"  {name:<16} {g['neurons']:>6} neurons  {g['zero']['delta']:+.4f} "
                             f"({g['zero']['random_delta_mean']:+.4f})")
            else:
                lines.append(f"  {name:<16} {g.get('skipped', '')}")
    attention = results.get("attention_neurons") or {}
    for method, per_layer in attention.get("results", {}).items():
        for layer, summary in per_layer.items():
            diversity = summary.get("neuron_diversity")
            lines.append(f"attention neurons {method:<18} layer {layer}: mean activation "
                         f"{summary['mean_activation']:.4g}, diversity "
                         f"{'undefined' if diversity is None else f'{diversity:.3f}'}")
    table = (attention.get("faithfulness") or {}).get("table")
    if table:
        lines.append("faithfulness (token: LeRF − MoRF area, larger = more faithful; neuron: Δloss of top-k ablation)")
        for row in table:
            area, delta = row.get("area_difference"), row.get("delta_loss")
            ci = "" if row.get("area_difference_low") is None else (
                f" [{row['area_difference_low']:+.3f}, {row['area_difference_high']:+.3f}]"
                + {True: " above random", False: " not above random", None: ""}[row.get("above_random")])
            where = "whole model" if row["layer"] is None else f"layer {row['layer']}"
            lines.append(f"  {row['method']:<18} {where}: area diff "
                         f"{'n/a' if area is None else f'{area:+.4f}'}{ci}"
                         + ("" if row["layer"] is None else f", Δloss {'n/a' if delta is None else f'{delta:+.4f}'}"))
    for method, reason in attention.get("errors", {}).items():
        lines.append(f"FAILED attention neurons {method}: {reason}")
    faith_errors = (attention.get("faithfulness") or {}).get("errors", {})
    for method, reason in faith_errors.items():
        if attention.get("errors", {}).get(method) != reason:  # not already said above
            lines.append(f"FAILED faithfulness {method}: {reason}")
    for name, reason in results.get("errors", {}).items():
        lines.append(f"FAILED {name}: {reason}")
    print("\n".join(lines), file=file)
