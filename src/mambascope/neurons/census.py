"""One layer's neuron census: every streaming statistic of docs/design.md §5 in one update / merge / finalize.

Definitions follow Voita et al. 2023, "Neurons in Large Language Models: Dead, N-gram, Positional"
(see the modules of each accumulator); the result has the per-layer keys of docs/design.md §8.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from mambascope.neurons.activity import ActivityAccumulator
from mambascope.neurons.batch import ARCHS, LayerLabel, NeuronBatch, layer_name
from mambascope.neurons.delta import DeltaAccumulator, TokenChannels
from mambascope.neurons.detectors import TokenDetectorAccumulator
from mambascope.neurons.positional import PositionalAccumulator

# finalize() keys promoted to the top level (docs/design.md §8); the rest stays in the sub-dicts.
_ACTIVITY_TOP = ("tokens", "n_neurons", "dead_neurons", "n_dead", "pct_dead", "activation_frequency",
                 "rarely_active", "mean_frequency_alive")
_POSITIONAL_TOP = ("positional_neurons", "positional_mi")


class LayerCensus:
    """Activity, positional, token-detector and (Mamba) Δ accumulators of one layer.

    ``arch`` "mamba" | "mamba2" | "gpt2" | "gated_mlp" (the neuron kind) decides whether Δ is expected:
    Mamba batches must carry ``dt`` (per channel on Mamba-1, per head on Mamba-2); MLP neurons have none and report
    ``delta_sensitive`` = None (not applicable). ``layer`` labels errors and the result.
    Keyword options are those of the accumulators (defaults: Voita et al. 2023 / docs/design.md §5).
    """

    def __init__(self, arch: str, vocab_size: int, *, layer: LayerLabel = None,
                 rare_threshold: float = 0.01, activity_thresholds: Sequence[float] | Tensor | None = None,
                 mi_threshold: float = 0.05, positional_alpha: float = 0.001, top_k_positional: int = 10,
                 max_types: int = 5, coverage: float = 0.95, min_precision: float = 0.95,
                 min_occurrences: int = 5, ngram_orders: Sequence[int] = (1, 2, 3),
                 top_k_delta: int = 10, delta_top_tokens: int = 10,
                 delta_token_channels: TokenChannels = "all", max_delta_table_bytes: int = 1 << 30) -> None:
        if arch not in ARCHS:
            raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHS}")
        self.arch, self.layer = arch, layer
        self.activity = ActivityAccumulator(rare_threshold, activity_thresholds, layer=layer)
        self.positional = PositionalAccumulator(mi_threshold, top_k_positional, layer=layer, alpha=positional_alpha)
        self.detectors = TokenDetectorAccumulator(vocab_size, max_types, coverage, min_precision,
                                                  min_occurrences, ngram_orders, layer=layer)
        self.delta = None if arch not in ("mamba", "mamba2") else DeltaAccumulator(
            vocab_size, top_k_delta, delta_top_tokens, min_occurrences, delta_token_channels,
            max_delta_table_bytes, unit="head" if arch == "mamba2" else "channel", layer=layer)

    def _parts(self) -> list[Any]:
        return [a for a in (self.activity, self.positional, self.detectors, self.delta) if a is not None]

    def update(self, batch: NeuronBatch) -> None:
        """Feed one batch to every accumulator."""
        # checked before any accumulator moves, so a rejected batch leaves the census unchanged
        if self.delta is None and batch.dt is not None:
            raise ValueError(f"{layer_name(self.layer)}: a {self.arch} census got Δ (dt); GPT-2 has none")
        if self.delta is not None and batch.dt is None:
            raise ValueError(f"{layer_name(self.layer)}: a {self.arch} census needs Δ but the batch has no Δ (dt); "
                             "trace 'mixer.hook_dt'")
        for part in self._parts():
            part.update(batch)

    def merge(self, other: LayerCensus) -> LayerCensus:
        """Fold in a census of the same layer and settings that saw disjoint data; returns self."""
        if not isinstance(other, LayerCensus) or other.arch != self.arch:
            raise ValueError(f"{layer_name(self.layer)}: can only merge a LayerCensus of the same architecture")
        for mine, theirs in zip(self._parts(), other._parts(), strict=True):
            mine.merge(theirs)
        return self

    def finalize(self) -> dict[str, Any]:
        """JSON-serializable per-layer result (docs/design.md §8).

        Top level: ``layer``, ``arch``, ``tokens`` (N valid tokens), ``n_neurons``, ``dead_neurons``,
        ``n_dead``, ``pct_dead``, ``activation_frequency``, ``rarely_active``, ``mean_frequency_alive``,
        ``positional_neurons``, ``positional_mi``, ``token_detectors`` [{neuron, tokens, counts,
        precision, coverage}] (token ids; decoding is the caller's), ``tokens_covered``,
        ``delta_sensitive`` (top-k units [{index, mean, std, selectivity, top_tokens}] or None for
        GPT-2), ``warnings`` (the accumulators' small-sample warnings, [] when every threshold can be
        trusted at this sample size). Sub-dicts ``activity``, ``positional``, ``detectors``, ``delta`` hold
        the remaining outputs of each accumulator.
        """
        act = self.activity.finalize()
        pos = self.positional.finalize()
        det = self.detectors.finalize()
        delta = self.delta.finalize() if self.delta is not None else None
        result: dict[str, Any] = {"layer": self.layer, "arch": self.arch}
        result.update({key: act[key] for key in _ACTIVITY_TOP})
        result.update({key: pos[key] for key in _POSITIONAL_TOP})
        result["token_detectors"] = det["token_detectors"]
        result["tokens_covered"] = det["tokens_covered"]
        result["delta_sensitive"] = delta["top_k"] if delta is not None else None
        result["warnings"] = [part["warning"] for part in (act, pos, det) if part["warning"] is not None]
        result["activity"] = {k: v for k, v in act.items() if k not in _ACTIVITY_TOP}
        result["positional"] = {k: v for k, v in pos.items() if k not in (*_POSITIONAL_TOP, "tokens")}
        result["detectors"] = {k: v for k, v in det.items()
                               if k not in ("token_detectors", "tokens_covered", "tokens")}
        result["delta"] = ({k: v for k, v in delta.items() if k not in ("top_k", "tokens")}
                           if delta is not None else None)
        return result
