"""The neuron census run on a sparse dictionary's features (docs/features.md, "Features as units").

A dictionary of ``mambascope sae`` is read (``load_dictionary``), checked against the model (its hook exists and
has the dictionary's width), and its feature activations z = TopK_k(ReLU(x W_enc + b_enc)) [b, L, d_sae], x the
traced ``hook_in`` (a transcoder's input), are fed batch by batch to the very accumulators the neurons use
(``LayerCensus`` of kind ``"feature"``, ``TopContextAccumulator``): a feature is active where z > 0.

Logit effects go through the decoder direction: feature i writes W_dec[i] into ``hook_out``; into the residual
stream that is W_dec[i] itself for a residual-width unit (``hook_resid_*``, a part's output), and
W_out · W_dec[i] for the neuron unit (``mixer.hook_post``: W_out = out_proj), as for neurons.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mambascope.arch import adapter
from mambascope.arch.units import PART_OUT
from mambascope.features.dictionary import DictionarySpec, codes, load_dictionary, resolve_hook, split_hook
from mambascope.neurons import LayerCensus, NeuronBatch, TopContextAccumulator
from mambascope.trace import trace_stream

FEATURE_ARCH = "feature"  # the unit kind of a feature census (neurons.batch.ARCHS)
RESIDUAL_UNITS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", *sorted(set(PART_OUT.values())))


class _Stop(Exception):
    """Raised by the width probe's callback once the hook's layer is traced."""


def unit_width(model: nn.Module, hook: str) -> int:
    """Features per token of the traced unit ``hook`` (``blocks.L.UNIT``, its axes after [b, L] flattened), from
    a forward of one two-token window that stops after layer L."""
    unit = split_hook(hook)[1]
    got: dict[str, torch.Tensor] = {}

    def keep(index: int, units: dict[str, torch.Tensor]) -> None:
        got.update(units)
        raise _Stop

    device = next(model.parameters()).device
    with contextlib.suppress(_Stop), torch.no_grad():
        trace_stream(model, torch.zeros(1, 2, dtype=torch.long, device=device), keep, names=[hook])
    return int(got[unit][0, 0].numel())


def open_dictionary(directory: str | Path, model: nn.Module) -> tuple[nn.Module, DictionarySpec]:
    """The dictionary in ``directory``, checked against ``model`` before any work: its ``hook_in`` and ``hook_out``
    are units of the model with widths ``d_in`` and ``d_out`` (else a ValueError / KeyError naming both)."""
    coder, spec = load_dictionary(directory)
    for hook, width, role in ((spec.hook_in, spec.d_in, "reads"), (spec.hook_out, spec.d_out, "writes")):
        resolve_hook(model, hook, flag=f"--dictionary {directory}")
        found = unit_width(model, hook)
        if found != width:
            raise ValueError(f"--dictionary {directory}: it {role} {hook} with width {width}, but this model's "
                             f"{hook} has width {found} (a dictionary of another model?)")
    return coder, spec


def feature_batch(coder: nn.Module, spec: DictionarySpec, x: torch.Tensor, input_ids: torch.Tensor,
                  bos_token_id: int | None, window_ids: torch.Tensor | None = None) -> NeuronBatch:
    """A ``NeuronBatch`` of feature activations: post = z [b, L, d_sae] of the traced ``hook_in`` x [b, L, ...],
    active = z > 0, valid = not BOS (windows have no padding)."""
    b, L = input_ids.shape
    z = codes(coder, x.reshape(b * L, spec.d_in).float().cpu()).reshape(b, L, spec.d_sae)
    ids = input_ids.cpu().long()
    valid = torch.ones_like(ids, dtype=torch.bool) if bos_token_id is None else ids != bos_token_id
    positions = torch.arange(L).expand(b, L)
    return NeuronBatch(post=z, active=z > 0, token_ids=ids, positions=positions, valid=valid,
                       layer=f"{spec.layer}:features", window_ids=None if window_ids is None else window_ids.cpu())


class FeatureCensus:
    """The census accumulators of one dictionary's features: ``consume`` is a ``runner.scan_corpus`` callback
    (the traced ``hook_in`` of the dictionary's layer); ``census`` / ``tops`` finalize like a neuron layer's."""

    def __init__(self, coder: nn.Module, spec: DictionarySpec, vocab_size: int, bos_token_id: int | None, *,
                 census_options: dict | None = None, top_k_contexts: int = 5, context_width: int = 16) -> None:
        self.coder, self.spec, self.bos = coder, spec, bos_token_id
        self.layer, self.unit = split_hook(spec.hook_in)
        self.census = LayerCensus(FEATURE_ARCH, vocab_size, layer=self.layer, **(census_options or {}))
        self.tops = TopContextAccumulator(top_k_contexts, context_width, layer=self.layer)

    @property
    def names(self) -> list[str]:
        return [self.spec.hook_in]

    def consume(self, layer: int, units: dict[str, torch.Tensor], input_ids: torch.Tensor,
                window_ids: torch.Tensor) -> None:
        if layer != self.layer:
            return
        batch = feature_batch(self.coder, self.spec, units[self.unit], input_ids, self.bos, window_ids)
        self.census.update(batch)
        self.tops.update(batch)


def feature_write_weights(model: nn.Module, coder: nn.Module, spec: DictionarySpec
                          ) -> tuple[torch.Tensor | None, str]:
    """(W [d_model, d_sae], how): column i is what feature i writes into the residual stream per unit of
    activation, W_dec[i] through the linear write of ``hook_out``; W is None, and ``how`` says why, when
    ``hook_out`` reaches the residual stream through a non-linear map (no direct logit effect is defined)."""
    layer, unit = split_hook(spec.hook_out)
    W_dec = coder.W_dec.detach().float()  # [d_sae, d_out]
    if unit in RESIDUAL_UNITS:
        return W_dec.T.contiguous(), f"W_dec[i] (written into the residual stream at {unit}) · W_U after the final norm"
    ad = adapter(model)
    if unit == ad.neuron_unit(layer):
        W_out = ad.neuron_write_weights(layer).float().cpu()  # [d_model, E]
        if W_out.shape[1] == spec.d_out:
            return W_out @ W_dec.T, f"W_out · W_dec[i] ({unit} through the layer's output projection) · W_U " \
                                    "after the final norm"
    return None, f"not computed: {unit} reaches the residual stream through a non-linear map"


def feature_summary(neurons: dict[str, Any], features: dict[str, Any], layer: int) -> dict[str, Any]:
    """Features versus the neurons of the same layer on the same tokens: how many of each are token detectors
    under the same criteria (precision, coverage, types, occurrences), as counts and as shares of the alive
    units, and (``types_needed``) how many token types cover the coverage share of each unit's activations.
    ``neurons`` / ``features``: finalized layer results; ``mean_precision``: over detectors, of their least
    precise trigger."""

    criteria = features["detectors"]["criteria"]

    def types_needed(r: dict[str, Any]) -> dict[str, Any]:
        """The graded side of the detector test: per unit with >= min_occurrences activations, how many token
        types cover ``coverage`` of its activations (whatever their precision)."""
        needed = ((r["detectors"].get("ngram_coverage") or {}).get("1") or {}).get("needed") or []
        counts = r["activity"]["active_count"]
        v = sorted(n for n, a in zip(needed, counts, strict=False)
                   if n is not None and a >= criteria["min_occurrences"])
        return {"units_counted": len(v), "median": (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2 if v else None,
                "at_most_max_types": sum(n <= criteria["max_types"] for n in v), "at_most_20": sum(n <= 20 for n in v)}

    def row(r: dict[str, Any]) -> dict[str, Any]:
        alive = r["n_neurons"] - r["n_dead"]
        n = len(r["token_detectors"])
        return {"units": r["n_neurons"], "alive": alive, "dead": r["n_dead"], "token_detectors": n,
                "share_of_alive": n / alive if alive else None,
                "mean_precision": (sum(min(d["precision"]) for d in r["token_detectors"]) / n) if n else None,
                "tokens_covered": len(r["tokens_covered"]), "positional": len(r["positional_neurons"]),
                "rarely_active": len(r["rarely_active"]), "types_needed": types_needed(r)}

    same = neurons["detectors"]["criteria"] == criteria and neurons["tokens"] == features["tokens"]
    return {"layer": layer, "criteria": criteria, "tokens": features["tokens"], "same_tokens_and_criteria": same,
            "neurons": row(neurons), "features": row(features)}
