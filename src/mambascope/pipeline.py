"""The analyses end to end: the neuron census (DESIGN.md §5) and the comprehensive analysis (§6, §8).

Selection and evaluation never share tokens: the analysed windows are split into a selection part,
which every accumulator sees, and a held-out tail (``heldout_fraction`` of the windows), on which
ablation and pruning measure the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from mambascope.interventions import ablation_study, pruning_study
from mambascope.neurons import (
    LayerCensus,
    NeuronBatch,
    TopContextAccumulator,
    detector_suppression,
    detector_tokens_by_layer,
    group_overlap,
    top_logit_tokens,
)
from mambascope.runner import scan_corpus
from mambascope.trace import architecture, mixer_params, n_layers, neuron_write_weights, unembedding

GROUPS = ("dead", "rarely_active", "positional", "token_detector", "delta_sensitive")


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
    """(selection, held-out): the last ``heldout_fraction`` of the windows (corpus order) are held out."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    n_heldout = round(windows.shape[0] * heldout_fraction)
    if n_heldout < 1 or n_heldout >= windows.shape[0]:
        raise ValueError(f"{windows.shape[0]} windows cannot be split into selection and held-out parts; "
                         "give more text or a smaller --window")
    return windows[:-n_heldout], windows[-n_heldout:]


def _decode(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([int(i)]) for i in ids]


def _decoded_contexts(top: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """Token ids of the contexts to strings ("" before the window start)."""
    ids = sorted({t for neuron in top["context_tokens"] for ctx in neuron for t in ctx if t >= 0})
    text = dict(zip(ids, _decode(tokenizer, ids), strict=True))
    top["tokens"] = [[[text.get(t, "") for t in ctx] for ctx in neuron] for neuron in top.pop("context_tokens")]
    top["activations"] = top.pop("context_post")
    return top


def _logit_effects(W: torch.Tensor, norm_weight: torch.Tensor, W_U: torch.Tensor, tokenizer: Any,
                   k: int = 10) -> dict[str, Any]:
    """Each neuron's most promoted and most suppressed tokens through the final norm and unembedding."""
    top = top_logit_tokens(W, norm_weight, W_U, k)
    ids = sorted(set(top["promoted_tokens"].flatten().tolist()) | set(top["suppressed_tokens"].flatten().tolist()))
    text = dict(zip(ids, _decode(tokenizer, ids), strict=True))
    return {"promoted": [[text[t] for t in row] for row in top["promoted_tokens"].tolist()],
            "promoted_values": top["promoted_effects"].tolist(),
            "suppressed": [[text[t] for t in row] for row in top["suppressed_tokens"].tolist()],
            "suppressed_values": top["suppressed_effects"].tolist()}


def neuron_groups(layer_result: dict, arch: str, head_dim: int) -> dict[str, list[int]]:
    """The census groups of one layer as neuron indices (Mamba-2's Δ-sensitive heads → their channels)."""
    delta = [d["index"] for d in layer_result["delta_sensitive"] or []]
    if arch == "mamba2":  # Δ is per head: its neurons are the head's channels
        delta = [h * head_dim + j for h in delta for j in range(head_dim)]
    return {"dead": layer_result["dead_neurons"], "rarely_active": layer_result["rarely_active"],
            "positional": layer_result["positional_neurons"],
            "token_detector": [d["neuron"] for d in layer_result["token_detectors"]],
            "delta_sensitive": delta if arch != "gpt2" else []}


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


def census_pass(model: nn.Module, tokenizer: Any, windows: torch.Tensor, *, layers: Sequence[int] | None = None,
                batch_size: int = 8, progress: bool = True, census_options: dict | None = None,
                top_k_contexts: int = 5, context_width: int = 16) -> dict[str, Any]:
    """The neuron census of every chosen layer in one traced pass over ``windows`` [n, T] (no padding).

    Returns ``tokens``, ``window``, ``loss`` (next-token loss on the same windows), ``layers`` {layer:
    ``LayerCensus.finalize()`` + decoded detector tokens, ``suppression``, ``overlap``, ``top_contexts``,
    ``logit_effects``} and ``detector_tokens_by_layer``.
    """
    arch = architecture(model)
    layers = check_layers(model, layers)
    vocab = model.get_input_embeddings().num_embeddings
    census = {layer: LayerCensus(arch, vocab, layer=layer, **(census_options or {})) for layer in layers}
    tops = {layer: TopContextAccumulator(top_k_contexts, context_width, layer=layer) for layer in layers}
    bos = tokenizer.bos_token_id
    units = [f"blocks.{layer}.{u}" for layer in layers
             for u in (["mlp.hook_post"] if arch == "gpt2" else ["mixer.hook_post", "mixer.hook_gate_pre",
                                                                 "mixer.hook_dt"])]

    def consume(layer: int, tensors: dict[str, torch.Tensor], ids: torch.Tensor, rows: torch.Tensor) -> None:
        device = next(iter(tensors.values())).device
        batch = NeuronBatch.from_layer(tensors, arch, ids.to(device), bos_token_id=bos, label=layer, window_ids=rows)
        census[layer].update(batch)
        tops[layer].update(batch)

    loss = scan_corpus(model, windows, consume, names=units, batch_size=batch_size, progress=progress,
                       description="census")
    norm_weight, W_U = (t.float() for t in unembedding(model))
    head_dim = mixer_params(model, 0).head_dim if arch == "mamba2" else 1
    out: dict[str, Any] = {"tokens": int(windows.numel()), "window": int(windows.shape[1]), "loss": loss.loss,
                           "layers": {}}
    for layer in layers:
        result = census[layer].finalize()
        W = neuron_write_weights(model, layer).float()
        for det in result["token_detectors"]:
            det["token_strings"] = _decode(tokenizer, det["tokens"])
        for d in result["delta_sensitive"] or []:
            for t in d["top_tokens"] or []:
                t["string"] = _decode(tokenizer, [t["token"]])[0]
        result["suppression"] = detector_suppression(W, norm_weight, W_U, result["token_detectors"])
        result["overlap"] = group_overlap(neuron_groups(result, arch, head_dim), result["n_neurons"])
        result["top_contexts"] = _decoded_contexts(tops[layer].finalize(), tokenizer)
        result["logit_effects"] = _logit_effects(W, norm_weight, W_U, tokenizer)
        out["layers"][str(layer)] = result
    out["detector_tokens_by_layer"] = detector_tokens_by_layer(
        [out["layers"][str(layer)]["tokens_covered"] for layer in layers])
    return out


def census_interventions(model: nn.Module, layer_results: dict[str, dict], heldout: torch.Tensor, *,
                         draws: int = 3, seed: int = 0, batch_size: int = 8,
                         pruning_ratios: Sequence[float] = (0.1, 0.25, 0.5)) -> dict[str, Any]:
    """Ablation of every census group and pruning, measured on ``heldout`` windows the census never saw.

    Reads the groups, the neurons' means (mean ablation) and the pruning priority from the census
    results.  Returns ``{"ablation": ..., "pruning": ...}``.
    """
    arch = architecture(model)
    head_dim = mixer_params(model, 0).head_dim if arch == "mamba2" else 1
    layers = [int(layer) for layer in layer_results]
    groups = {layer: neuron_groups(layer_results[str(layer)], arch, head_dim) for layer in layers}
    means = {layer: torch.tensor(layer_results[str(layer)]["activity"]["mean_post"]) for layer in layers}
    priority = {layer: pruning_priority(layer_results[str(layer)],
                                        neuron_write_weights(model, layer).float().norm(dim=0).cpu())
                for layer in layers}
    by_group = {g: {layer: groups[layer][g] for layer in layers} for g in GROUPS}
    n_neurons = layer_results[str(layers[0])]["n_neurons"]
    ablation = ablation_study(model, heldout, by_group, means, n_neurons, draws=draws, seed=seed,
                              batch_size=batch_size)
    pruning = pruning_study(model, heldout, priority, pruning_ratios, draws=draws, seed=seed, batch_size=batch_size)
    pruning["priority"] = "dead, then rarely active (rarest first), then lowest mean|post| x |out_proj column|"
    return {"ablation": ablation, "pruning": pruning}


def run_census(model: nn.Module, tokenizer: Any, windows: torch.Tensor, *, layers: Sequence[int] | None = None,
               heldout_fraction: float = 0.25, batch_size: int = 8, draws: int = 3, seed: int = 0,
               ablation: bool = True, pruning_ratios: Sequence[float] = (0.1, 0.25, 0.5), progress: bool = True,
               census_options: dict | None = None) -> dict[str, Any]:
    """``census_pass`` on the selection windows, then (if ``ablation``) ``census_interventions`` on the
    held-out tail.  Returns the census dict with ``ablation`` and ``pruning`` added."""
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
        frame["positional"] = frame["positional_mi"] > r["positional"]["positional_threshold"]
        if r["delta"] is not None:
            per_unit = E // r["delta"]["n_units"]  # 1 on Mamba-1; head_dim on Mamba-2 (Δ per head)
            for key in ("mean", "std", "selectivity"):
                frame[f"dt_{key}"] = [v for v in r["delta"][key] for _ in range(per_unit)]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
