"""Dead and rarely active neurons (Voita et al. 2023, "Neurons in Large Language Models: Dead,
N-gram, Positional", §3 and Fig. 1a/1b; docs/design.md §5)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from mambascope.neurons._common import Accumulator, check_open_unit, none_if_nan
from mambascope.neurons.batch import LayerLabel, NeuronBatch

# One-sided confidence of the bound on a dead neuron's frequency.
DEAD_CONFIDENCE = 0.95


def dead_frequency_bound(tokens: int, confidence: float = DEAD_CONFIDENCE) -> float:
    """Upper confidence bound on the frequency of a neuron seen active on 0 of ``tokens`` tokens.

    Clopper & Pearson (1934), exact for zero successes: the frequency f with (1 − f)^N = 1 − confidence,
    f = 1 − (1 − confidence)^(1/N) ≈ 3/N at 95 % (the "rule of three", Hanley & Lippman-Hand 1983).
    Tokens of one window are not independent, so the effective N is smaller and the bound optimistic.
    """
    return 1.0 - (1.0 - confidence) ** (1.0 / tokens)


def tokens_to_tell_dead(rare_threshold: float, confidence: float = DEAD_CONFIDENCE) -> int:
    """Fewest tokens at which a neuron of frequency ``rare_threshold`` is seen active at least once with
    probability ``confidence``: N >= ln(1 − confidence) / ln(1 − rare_threshold) (299 for 1 %)."""
    return math.ceil(math.log(1.0 - confidence) / math.log1p(-rare_threshold))


def default_thresholds() -> Tensor:
    """|post| thresholds of the dead-neuron sensitivity curve: 1e-4 … 1, four per decade (17 values)."""
    return torch.logspace(-4, 0, 17, dtype=torch.float64)


def _check_thresholds(thresholds: Sequence[float] | Tensor | None) -> Tensor:
    if thresholds is None:
        return default_thresholds()
    t = torch.as_tensor(thresholds, dtype=torch.float64).flatten().cpu()
    if t.numel() == 0:
        raise ValueError("thresholds must contain at least one value")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(f"thresholds must be finite and >= 0, got {t.tolist()}")
    if t.numel() > 1 and not bool((t[1:] > t[:-1]).all()):
        raise ValueError(f"thresholds must be strictly increasing, got {t.tolist()}")
    return t


class ActivityAccumulator(Accumulator):
    """Per-neuron activity over the valid tokens of a corpus.

    Streams (per neuron e, over the N valid tokens): active count A_e = Σ_t active[t,e] (int64);
    Σ post, Σ |post|, Σ post·active (float64); and M_e = max_t |post[t,e]| (float64), from which the count
    C_{k,e} = #{t : |post[t,e]| > θ_k} of each threshold θ_k of the grid is zero exactly when M_e <= θ_k
    (compared in float64; only whether C_{k,e} is zero enters a result).

    ``finalize()`` reports (Voita et al. 2023, §3): frequency f_e = A_e / N; **dead** ⇔ A_e = 0
    (active on 0 of N tokens, N reported as ``tokens``); **rarely active** ⇔ 0 < f_e < ``rare_threshold``
    (default 1%); % dead of the layer; mean frequency over the alive neurons (Fig. 1b); the
    sensitivity curve % dead(θ_k) = 100·#{e : C_{k,e} = 0}/E over the |post| grid; mean post,
    mean |post| (inputs of mean ablation and pruning importance) and mean post while active.
    Small samples: ``dead_frequency_upper_bound`` (:func:`dead_frequency_bound`) and a ``warning`` when it
    reaches ``rare_threshold``, i.e. when "dead" cannot be told from "rarely active" at N tokens.
    """

    _config: ClassVar[tuple[str, ...]] = ("rare_threshold", "thresholds")
    _state: ClassVar[tuple[str, ...]] = ("active_count", "max_abs", "sum_post", "sum_abs", "sum_post_active")

    def __init__(self, rare_threshold: float = 0.01, thresholds: Sequence[float] | Tensor | None = None,
                 layer: LayerLabel = None) -> None:
        super().__init__(layer)
        self.rare_threshold = check_open_unit("rare_threshold", rare_threshold)
        self.thresholds = _check_thresholds(thresholds)

    def update(self, batch: NeuronBatch) -> None:
        """Add one batch: only tokens with ``batch.valid`` count. NaN/Inf in post raises NonFiniteError."""
        self._check_finite(batch)
        if self._start(batch):
            E, dev = batch.n_neurons, batch.device
            self.active_count = torch.zeros(E, dtype=torch.long, device=dev)
            self.max_abs = torch.zeros(E, dtype=torch.float64, device=dev)
            self.sum_post = torch.zeros(E, dtype=torch.float64, device=dev)
            self.sum_abs = torch.zeros(E, dtype=torch.float64, device=dev)
            self.sum_post_active = torch.zeros(E, dtype=torch.float64, device=dev)
        post = batch.valid_post  # [n, E] float64 (shared with the other accumulators)
        if post.shape[0] == 0:
            return
        self.n_tokens += post.shape[0]
        self.active_count += batch.active_on_valid.sum(0).long()  # exact: a batch has < 2²⁴ tokens
        self.sum_post += batch.valid_post_sum
        magnitude = post.abs()
        self.sum_abs += magnitude.sum(0)
        torch.maximum(self.max_abs, magnitude.amax(0), out=self.max_abs)
        # post where active, written over |post| (no float copy of active, no fresh [n, E] buffer)
        self.sum_post_active += torch.where(batch.valid_active, post, post.new_zeros(()), out=magnitude).sum(0)

    def _merge_state(self, other: Accumulator) -> None:
        assert isinstance(other, ActivityAccumulator)
        dev = self.max_abs.device
        torch.maximum(self.max_abs, other.max_abs.to(dev), out=self.max_abs)
        for name in ("active_count", "sum_post", "sum_abs", "sum_post_active"):
            setattr(self, name, getattr(self, name) + getattr(other, name).to(dev))

    def finalize(self) -> dict[str, Any]:
        """Per-neuron lists (length E) and per-layer summaries, JSON-ready; see the class docstring."""
        self._require_data()
        N, E = self.n_tokens, self.n_neurons
        freq = self.active_count.double() / N
        dead = self.active_count == 0
        rare = (~dead) & (freq < self.rare_threshold)
        alive_freq = freq[~dead]
        count = self.active_count.double()
        mean_active = torch.where(dead, float("nan"), self.sum_post_active / count.clamp_min(1))
        bound = dead_frequency_bound(N)
        warning = None
        if bound >= self.rare_threshold:
            warning = (f"dead: at {N} tokens a neuron active on up to {100 * bound:.2g}% of tokens shows no "
                       f"activation with probability >= {1 - DEAD_CONFIDENCE:.0%}, so dead cannot be told from "
                       f"rarely active (< {100 * self.rare_threshold:g}%); use >= "
                       f"{tokens_to_tell_dead(self.rare_threshold)} tokens")
        return {
            "tokens": N,
            "n_neurons": E,
            "active_count": self.active_count.tolist(),
            "activation_frequency": freq.tolist(),
            "dead_neurons": dead.nonzero().flatten().tolist(),
            "n_dead": int(dead.sum()),
            "dead_frequency_upper_bound": bound,
            "warning": warning,
            "pct_dead": 100.0 * float(dead.double().mean()),
            "rare_threshold": self.rare_threshold,
            "rarely_active": rare.nonzero().flatten().tolist(),
            "n_rarely_active": int(rare.sum()),
            # None when every neuron is dead: the mean over no neuron is undefined, not 0.
            "mean_frequency_alive": float(alive_freq.mean()) if alive_freq.numel() else None,
            "mean_post": (self.sum_post / N).tolist(),
            "mean_abs_post": (self.sum_abs / N).tolist(),
            "mean_post_active": none_if_nan(mean_active),
            "dead_sensitivity": {
                "thresholds": self.thresholds.tolist(),
                "pct_dead": (100.0 * (self.max_abs[None, :] <= self.thresholds.to(self.max_abs.device)[:, None])
                            .double().mean(1)).tolist(),
            },
        }
