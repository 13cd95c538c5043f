"""Δ-sensitive channels / heads of a Mamba layer, from the real Δ (docs/design.md §5).

Companion to the neuron statistics of Voita et al. 2023 ("Neurons in Large Language Models: Dead,
N-gram, Positional"); Δ has no transformer counterpart, so its definitions are ours (§5):
mean Δ, std Δ and selectivity = std of ln Δ over valid tokens, per channel (Mamba-1) or head (Mamba-2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from mambascope.neurons._common import Accumulator, KeyedRows, check_positive_int
from mambascope.neurons.batch import LayerLabel, NeuronBatch, layer_name

TokenChannels = Sequence[int] | Literal["all"] | None


class DeltaAccumulator(Accumulator):
    """Per-unit Δ moments and per-token-type mean Δ.

    Streams over the N valid tokens, per unit c (channel on Mamba-1, head on Mamba-2), in float64:
    ΣΔ, ΣΔ², Σ ln Δ, Σ (ln Δ)². ``finalize()``: mean = ΣΔ/N, std = sqrt(ΣΔ²/N − mean²) (population,
    ddof 0), selectivity = std of ln Δ likewise; the ``top_k`` most selective units.

    Tokens that drive Δ highest: per token type t and tracked unit c, ΣΔ[t,c] (float64, a
    :class:`KeyedRows` with rows for the types seen) and the occurrences n[t]; mean Δ[t,c] = ΣΔ[t,c]/n[t]
    over types with n[t] >= ``min_occurrences``; for each top-k unit its ``top_tokens`` types by mean Δ.
    The top-k is only known at the end, so the table covers every unit by default (``token_channels="all"``):
    C·8 bytes per type seen, at most V·C·8, e.g. 618 MB for V = 50280, C = 1536 (Mamba-1 130m), 9.7 MB for
    Mamba-2's 24 heads. When that most is above ``max_table_bytes`` (default 1 GiB) construction fails; pass
    ``token_channels=[...]`` (e.g. the top-k of an earlier run) or ``None`` to skip the table.
    """

    _config: ClassVar[tuple[str, ...]] = ("vocab_size", "top_k", "top_tokens", "min_occurrences",
                                         "token_channels", "unit")
    _state: ClassVar[tuple[str, ...]] = ("sum_dt", "sum_dt2", "sum_log", "sum_log2", "token_count",
                                        "token_sum")

    def __init__(self, vocab_size: int, top_k: int = 10, top_tokens: int = 10, min_occurrences: int = 5,
                 token_channels: TokenChannels = "all", max_table_bytes: int = 1 << 30,
                 unit: Literal["channel", "head"] = "channel", layer: LayerLabel = None) -> None:
        super().__init__(layer)
        self.vocab_size = check_positive_int("vocab_size", vocab_size)
        self.top_k = check_positive_int("top_k", top_k)
        self.top_tokens = check_positive_int("top_tokens", top_tokens)
        self.min_occurrences = check_positive_int("min_occurrences", min_occurrences)
        self.max_table_bytes = check_positive_int("max_table_bytes", max_table_bytes)
        if unit not in ("channel", "head"):
            raise ValueError(f"unit must be 'channel' (Mamba-1) or 'head' (Mamba-2), got {unit!r}")
        self.unit = unit
        if token_channels is None or token_channels == "all":
            self.token_channels: list[int] | str | None = token_channels
        elif isinstance(token_channels, str):
            raise ValueError(f"token_channels must be 'all', None or a list of indices, got {token_channels!r}")
        else:
            chosen = sorted({int(c) for c in token_channels})
            if not chosen or chosen[0] < 0:
                raise ValueError(f"token_channels must be non-empty, non-negative indices, got {token_channels!r}")
            self.token_channels = chosen

    def update(self, batch: NeuronBatch) -> None:
        """Add the Δ of one batch (``batch.dt`` [b,L,C]); valid tokens only. Δ must be > 0 (ln Δ)."""
        if batch.dt is None:
            raise ValueError(f"{self._where()}: the batch has no Δ (dt); trace 'mixer.hook_dt' (Mamba only)")
        dt = batch.valid_of(batch.dt).to(torch.float64)  # [n, C]
        total = dt.sum(0)
        if not bool(torch.isfinite(total).all()):  # a NaN/Inf on a valid token: name the first
            self._check_finite(batch, dt=True)
        if self._start(batch, batch.dt.shape[-1]):
            self._create(batch.device)
        squares = dt.square()  # [n, C] buffer then reused for ln Δ: a fresh large buffer costs its page faults
        sum_squares = squares.sum(0)
        log = torch.log(dt, out=squares)
        log_total = log.sum(0)
        if not bool(torch.isfinite(log_total).all()):  # ln Δ is −inf or NaN exactly where Δ <= 0
            positive = (dt > 0).all(1)
            row, pos = (int(i) for i in batch.valid.nonzero()[int((~positive).nonzero()[0, 0])])
            raise ValueError(f"Δ (dt) of {layer_name(self.layer)} is <= 0 at batch row {row}, position {pos}; "
                             "Δ = softplus(·) > 0 and its log is needed (underflow in a low-precision dtype?)")
        self.n_tokens += dt.shape[0]
        self.sum_dt += total
        self.sum_dt2 += sum_squares
        self.sum_log += log_total
        self.sum_log2 += log.square_().sum(0)
        tok = batch.token_ids[batch.valid]
        if tok.numel() and (int(tok.min()) < 0 or int(tok.max()) >= self.vocab_size):
            raise ValueError(f"{self._where()}: token ids must lie in [0, vocab_size={self.vocab_size})")
        self.token_count += torch.bincount(tok, minlength=self.vocab_size)
        if self.token_channels == "all":
            self.token_sum.add(tok, dt)
        elif self._tracked is not None:
            self.token_sum.add(tok, dt[:, self._tracked.to(dt.device)])

    def _create(self, device: torch.device) -> None:
        C, V = self.n_neurons, self.vocab_size
        for name in ("sum_dt", "sum_dt2", "sum_log", "sum_log2"):
            setattr(self, name, torch.zeros(C, dtype=torch.float64, device=device))
        self.token_count = torch.zeros(V, dtype=torch.long, device=device)
        if self.token_channels is None:
            width = 0
        elif self.token_channels == "all":
            width = C
        else:
            if self.token_channels[-1] >= C:
                raise ValueError(f"{self._where()}: token_channels index {self.token_channels[-1]} >= {C} units")
            width = len(self.token_channels)
        if V * width * 8 > self.max_table_bytes:
            raise ValueError(
                f"{self._where()}: the per-token Δ table would need {V * width * 8 / 2**30:.2f} GiB "
                f"(V={V} × {width} {self.unit}s × float64) > max_table_bytes={self.max_table_bytes}; "
                "pass token_channels=[...] (e.g. the top-k of an earlier run), token_channels=None, "
                "or a larger max_table_bytes")
        self.token_sum = KeyedRows(width, torch.float64, V, device)  # rows for the token types seen only

    @property
    def _tracked(self) -> Tensor | None:
        """Units with a per-token column, in column order (None: no table)."""
        if self.token_channels is None:
            return None
        if self.token_channels == "all":
            return torch.arange(self.n_neurons)
        return torch.tensor(self.token_channels)

    def moments(self) -> dict[str, Tensor]:
        """mean, std, mean_log, selectivity per unit [C] (float64)."""
        N = self.n_tokens
        mean, mean_log = self.sum_dt / N, self.sum_log / N
        std = (self.sum_dt2 / N - mean * mean).clamp_min(0).sqrt()  # clamp: rounding can dip below 0
        selectivity = (self.sum_log2 / N - mean_log * mean_log).clamp_min(0).sqrt()
        return {"mean": mean, "std": std, "mean_log": mean_log, "selectivity": selectivity}

    def finalize(self) -> dict[str, Any]:
        """JSON-ready dict: per-unit lists and ``top_k`` [{index, mean, std, selectivity, top_tokens}].

        ``top_tokens`` is [{token, mean_dt, count}] (highest mean Δ first, types with >=
        ``min_occurrences`` occurrences), or None for a unit outside ``token_channels``.
        """
        self._require_data()
        m = self.moments()
        k = min(self.top_k, self.n_neurons)
        top = torch.argsort(m["selectivity"], descending=True, stable=True)[:k]
        top_tokens: list[list[dict[str, Any]] | None] = [None] * k
        tracked = self._tracked
        if tracked is not None:
            column = torch.full((self.n_neurons,), -1, dtype=torch.long)
            column[tracked] = torch.arange(tracked.numel())
            cols = column[top.cpu()]
            has = cols >= 0
            if bool(has.any()):
                count = self.token_count.double()
                sums = self.token_sum.dense(cols[has].to(count.device))  # [V, k']
                means = sums / count.clamp_min(1)[:, None]
                eligible = (self.token_count >= self.min_occurrences)[:, None].expand_as(means)
                means = torch.where(eligible, means, float("-inf"))
                j = min(self.top_tokens, self.vocab_size)
                # stable sort: equal means keep token-id order, whatever the batching
                best_tok = torch.argsort(means, dim=0, descending=True, stable=True)[:j]  # [j, k']
                best_val = means.gather(0, best_tok)
                n_eligible = int(eligible[:, 0].sum())
                best_val, best_tok = best_val[:n_eligible].T.tolist(), best_tok[:n_eligible].T.tolist()
                counts = self.token_count.tolist()
                # formatting k' (a handful of) units for JSON, not a computation
                lists = iter([
                    [{"token": t, "mean_dt": v, "count": counts[t]} for t, v in zip(toks, vals, strict=True)]
                    for toks, vals in zip(best_tok, best_val, strict=True)
                ])
                top_tokens = [next(lists) if h else None for h in has.tolist()]
        records = [
            {"index": c, "mean": mu, "std": sd, "selectivity": sel, "top_tokens": tt}
            for c, mu, sd, sel, tt in zip(top.tolist(), m["mean"][top].tolist(), m["std"][top].tolist(),
                                          m["selectivity"][top].tolist(), top_tokens, strict=True)
        ]
        return {
            "unit": self.unit,
            "n_units": self.n_neurons,
            "tokens": self.n_tokens,
            "mean": m["mean"].tolist(),
            "std": m["std"].tolist(),
            "mean_log": m["mean_log"].tolist(),
            "selectivity": m["selectivity"].tolist(),
            "top_k": records,
            "token_channels": self.token_channels,
            "min_occurrences": self.min_occurrences,
        }
