"""Positional neurons (Voita et al. 2023, "Neurons in Large Language Models: Dead, N-gram,
Positional", §5; docs/design.md §5)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from mambascope.neurons._common import Accumulator, check_positive_int, none_if_nan
from mambascope.neurons.batch import LayerLabel, NeuronBatch

LN2 = math.log(2.0)


def positional_information(active_by_position: Tensor, tokens_by_position: Tensor) -> Tensor:
    """Mutual information between a neuron's activity and position, per neuron [E] (nats).

    ``active_by_position`` [T,E] counts of active tokens at each position, ``tokens_by_position`` [T]
    valid tokens at each position. With fr(pos) = active/tokens at pos and fr the overall frequency
    (Voita et al. 2023, §5):

        I = (1/T) Σ_pos [fr(pos)·ln(fr(pos)/fr) + (1−fr(pos))·ln((1−fr(pos))/(1−fr))],   0·ln 0 = 0.

    Positions with no valid token (e.g. position 0 when BOS is excluded) have no fr(pos) and are
    left out; T is the number of positions that have at least one valid token.
    This plug-in estimate is biased upwards by about 1/(2·n(pos)) nats per position (n(pos) windows
    seen at pos), so the 0.05 threshold is meaningful only with hundreds of windows per position.
    """
    seen = tokens_by_position > 0
    counts = active_by_position[seen].to(torch.float64)
    tokens = tokens_by_position[seen].to(torch.float64)
    fr_pos = counts / tokens[:, None]  # [T', E]
    fr = counts.sum(0) / tokens.sum()  # [E]
    xlogy = torch.special.xlogy  # xlogy(0, y) = 0, which is the 0·ln0 = 0 convention
    # each summand is KL(Bernoulli(fr(pos)) ‖ Bernoulli(fr)) >= 0; when fr is 0 or 1 so is every fr(pos)
    terms = (xlogy(fr_pos, fr_pos) - xlogy(fr_pos, fr) + xlogy(1 - fr_pos, 1 - fr_pos)
             - xlogy(1 - fr_pos, 1 - fr))
    return terms.mean(0)


class PositionalAccumulator(Accumulator):
    """Activity by position within fixed-length windows, and the correlation of post with position.

    Streams: valid tokens per position n(pos) [T] and active counts per (position, neuron) [T,E]
    (int64); for the Pearson correlation of post x with position p, Σx, Σx², Σxp [E] and Σp, Σp²
    (float64). T grows to max position + 1 seen; batches are not required to share a window length
    (no check), but the measure assumes fixed-length windows without padding (docs/design.md §5).

    ``finalize()``: ``positional_mi`` I per neuron (see :func:`positional_information`), positional
    ⇔ I > ``mi_threshold`` (default 0.05, Voita et al.); Pearson r = cov(x,p)/(σ_x σ_p) from the
    streamed sums (None where σ_x or σ_p is 0), the layer's mean |r| and mean r (the seed's measure);
    fr(pos) curves of the ``top_k`` neurons with the largest I.
    """

    _config: ClassVar[tuple[str, ...]] = ("mi_threshold", "top_k")
    _state: ClassVar[tuple[str, ...]] = ("tokens_by_position", "active_by_position", "sum_x", "sum_xx",
                                         "sum_xp", "sum_p", "sum_pp")

    def __init__(self, mi_threshold: float = 0.05, top_k: int = 10, layer: LayerLabel = None) -> None:
        super().__init__(layer)
        mi_threshold = float(mi_threshold)
        if not (0.0 < mi_threshold < LN2):
            raise ValueError(f"mi_threshold must be in (0, ln 2 = {LN2:.4f}) nats (I never exceeds ln 2), "
                             f"got {mi_threshold}")
        self.mi_threshold = mi_threshold
        self.top_k = check_positive_int("top_k", top_k)

    def _grow(self, length: int) -> None:
        """Extend the per-position tables to ``length`` positions (windows longer than seen so far)."""
        extra = length - self.tokens_by_position.numel()
        if extra > 0:
            self.tokens_by_position = torch.cat([self.tokens_by_position,
                                                 self.tokens_by_position.new_zeros(extra)])
            self.active_by_position = torch.cat(
                [self.active_by_position, self.active_by_position.new_zeros(extra, self.n_neurons)])

    def update(self, batch: NeuronBatch) -> None:
        """Add one batch; only ``batch.valid`` tokens count, at ``batch.positions``. NaN/Inf in post raises."""
        self._check_finite(batch)
        if self._start(batch):
            E, dev = batch.n_neurons, batch.device
            self.tokens_by_position = torch.zeros(0, dtype=torch.long, device=dev)
            self.active_by_position = torch.zeros(0, E, dtype=torch.long, device=dev)
            self.sum_x = torch.zeros(E, dtype=torch.float64, device=dev)
            self.sum_xx = torch.zeros(E, dtype=torch.float64, device=dev)
            self.sum_xp = torch.zeros(E, dtype=torch.float64, device=dev)
            self.sum_p = torch.zeros((), dtype=torch.float64, device=dev)
            self.sum_pp = torch.zeros((), dtype=torch.float64, device=dev)
        pos = batch.positions[batch.valid]  # [n]
        if pos.numel() == 0:
            return
        if int(pos.min()) < 0:
            raise ValueError(f"{self._where()}: positions must be >= 0 on valid tokens")
        self._grow(int(pos.max()) + 1)
        self.n_tokens += pos.numel()
        self.tokens_by_position += torch.bincount(pos, minlength=self.tokens_by_position.numel())
        self.active_by_position.index_add_(0, pos, batch.active[batch.valid].long())
        x = batch.post[batch.valid].to(torch.float64)  # [n, E]
        p = pos.to(torch.float64)
        self.sum_x += x.sum(0)
        self.sum_xx += (x * x).sum(0)
        self.sum_xp += p @ x
        self.sum_p += p.sum()
        self.sum_pp += (p * p).sum()

    def _merge_state(self, other: Accumulator) -> None:
        assert isinstance(other, PositionalAccumulator)
        self._grow(other.tokens_by_position.numel())
        other_len = other.tokens_by_position.numel()
        dev = self.sum_x.device
        self.tokens_by_position[:other_len] += other.tokens_by_position.to(dev)
        self.active_by_position[:other_len] += other.active_by_position.to(dev)
        for name in ("sum_x", "sum_xx", "sum_xp", "sum_p", "sum_pp"):
            setattr(self, name, getattr(self, name) + getattr(other, name).to(dev))

    def correlation(self) -> Tensor:
        """Pearson r of post with position per neuron [E] (float64, NaN where undefined).

        r = (Σxp/N − x̄p̄) / sqrt((Σx²/N − x̄²)(Σp²/N − p̄²)). A variance below 1e-12 of the second
        moment is rounding noise of a constant series, so r is undefined there.
        """
        N = self.n_tokens
        mx, mp = self.sum_x / N, self.sum_p / N
        ex2, ep2 = self.sum_xx / N, self.sum_pp / N
        vx, vp = ex2 - mx * mx, ep2 - mp * mp
        cov = self.sum_xp / N - mx * mp
        defined = (vx > 1e-12 * ex2) & (vp > 1e-12 * ep2)
        r = cov / torch.sqrt(torch.where(defined, vx * vp, 1.0))
        return torch.where(defined, r.clamp(-1.0, 1.0), float("nan"))

    def finalize(self) -> dict[str, Any]:
        """JSON-ready dict; see the class docstring."""
        self._require_data()
        mi = positional_information(self.active_by_position, self.tokens_by_position)
        positional = mi > self.mi_threshold
        r = self.correlation()
        defined = ~torch.isnan(r)
        seen = (self.tokens_by_position > 0).nonzero().flatten()
        freq = self.active_by_position[seen].double() / self.tokens_by_position[seen, None].double()  # [T', E]
        k = min(self.top_k, self.n_neurons)
        top = torch.argsort(mi, descending=True, stable=True)[:k]
        curves = freq[:, top].T  # [k, T']
        return {
            "tokens": self.n_tokens,
            "window_length": self.tokens_by_position.numel(),
            "tokens_by_position": self.tokens_by_position.tolist(),
            "positional_mi": mi.tolist(),
            "positional_threshold": self.mi_threshold,
            "positional_neurons": positional.nonzero().flatten().tolist(),
            "n_positional": int(positional.sum()),
            "position_correlation": none_if_nan(r),
            "mean_abs_position_correlation": float(r[defined].abs().mean()) if bool(defined.any()) else None,
            "mean_position_correlation": float(r[defined].mean()) if bool(defined.any()) else None,
            "positional_top": {
                "positions": seen.tolist(),
                "neurons": top.tolist(),
                "mi": mi[top].tolist(),
                "frequency_by_position": curves.tolist(),
            },
        }
