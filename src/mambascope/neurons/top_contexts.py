"""The top-activating contexts of every neuron, kept while streaming (for neuron pages in the report).

For neuron e, the k valid tokens with the largest |post[t, e]| (ties: earlier window, then earlier
position), each with the ``width`` tokens of its window ending at it (never later tokens, as with
n-gram triggers) and the neuron's activation on each of those tokens.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from mambascope.neurons._common import Accumulator, check_positive_int
from mambascope.neurons.batch import LayerLabel, NeuronBatch


def _keys(magnitude: Tensor, token_index: Tensor) -> Tensor:
    """int64 keys ordered like (|value| descending, corpus token index ascending): the bits of a non-negative
    fp32 are ordered like its value, so (magnitude bits << 32) | (2³² − 1 − index).  Negative magnitudes
    mark invalid tokens: key −1, last."""
    bits = magnitude.float().clamp_min(0).view(torch.int32).long()
    return torch.where(magnitude >= 0, (bits << 32) | (0xFFFFFFFF - token_index), -1)


def _best(magnitude: Tensor, token_index: Tensor, k: int) -> Tensor:
    """Column indices [m, ≤k] of the k best per row of ``magnitude`` [m, n]: |value| descending, then corpus
    token index ascending, whatever the batching.

    A float ``topk`` of k + 1 finds the k best of every row whose k-th value is above its (k+1)-th (no tie
    across the cut; a negative k-th means every valid token is in); the picks are put in key order
    (:func:`_keys`), and the few rows with a tie across the cut are redone with one exact ``topk`` of keys.
    """
    m, n = magnitude.shape
    k = min(k, n)
    if k == n:
        picks = torch.arange(n, device=magnitude.device).expand(m, n)
        tied = torch.zeros(m, dtype=torch.bool, device=magnitude.device)
    else:
        values, picks = magnitude.topk(k + 1, dim=1)
        picks = picks[:, :k]
        tied = (values[:, k - 1] == values[:, k]) & (values[:, k - 1] >= 0)
    order = _keys(magnitude.gather(1, picks), token_index.gather(1, picks)).argsort(dim=1, descending=True)
    picks = picks.gather(1, order)
    if bool(tied.any()):
        rows = tied.nonzero().flatten()
        picks[rows] = _keys(magnitude[rows], token_index[rows]).topk(k, dim=1).indices
    return picks


class TopContextAccumulator(Accumulator):
    """Per neuron: the k peak |activation| tokens over the corpus, with their preceding context.

    State (E neurons, k, width w): ``values`` [E, k] (signed post at the peak), ``windows`` [E, k],
    ``positions`` [E, k], ``context_tokens`` [E, k, w] (−1 before the window start) and
    ``context_post`` [E, k, w] (NaN there); the last context slot is the peak token itself.
    Batches must carry ``window_ids`` so that contexts point back into the corpus.
    """

    _config: ClassVar[tuple[str, ...]] = ("k", "width")
    _state: ClassVar[tuple[str, ...]] = ("values", "windows", "positions", "context_tokens", "context_post")

    def __init__(self, k: int = 5, width: int = 16, layer: LayerLabel = None) -> None:
        super().__init__(layer)
        self.k = check_positive_int("k", k)
        self.width = check_positive_int("width", width)
        self.window_length: int | None = None  # L of the first batch, to number tokens across the corpus

    def update(self, batch: NeuronBatch) -> None:
        if batch.window_ids is None:
            raise ValueError(f"{self._where()}: batches need window_ids to locate the contexts")
        self._check_finite(batch)
        first = self._start(batch)
        _, L, E = batch.post.shape
        if self.window_length is None:
            self.window_length = L
        self.n_tokens += int(batch.valid.sum())
        # [b·L, E]: |post|, −1 on invalid tokens
        magnitude = batch.post.abs().reshape(-1, E).index_fill_(0, batch.invalid_rows, -1.0)
        every = torch.arange(E, device=magnitude.device)
        if first or self.values.shape[1] < self.k:
            neurons = every
        else:  # only neurons whose batch peak can enter their kept k (ties may: an earlier token wins them)
            kth = self.values[:, -1].abs()  # NaN while fewer than k valid peaks are kept
            neurons = ((magnitude.amax(0).double() >= kth) | torch.isnan(kth)).nonzero().flatten()
            if neurons.numel() == 0:
                return
        candidate = self._candidates(batch, magnitude, neurons)
        if first:
            for name in self._state:
                setattr(self, name, candidate[name][:, :0])
        self._keep(candidate, None if neurons.numel() == E else neurons)

    def _candidates(self, batch: NeuronBatch, magnitude: Tensor, neurons: Tensor) -> dict[str, Tensor]:
        """The batch's best k tokens of each of ``neurons`` [m], with their contexts ([m, k] and [m, k, w]);
        ``magnitude`` [b·L, E]."""
        L, E = batch.post.shape[1:]
        score = (magnitude if neurons.numel() == E else magnitude.index_select(1, neurons)).T  # [m, b·L] view
        token_index = (batch.window_ids[:, None] * self.window_length + torch.arange(L, device=score.device))
        flat = _best(score, token_index.reshape(1, -1).expand(score.shape[0], -1), self.k)  # [m, k]
        row, pos = flat // L, flat % L
        keep = score.gather(1, flat) >= 0  # fewer valid tokens than k leaves invalid picks
        offsets = torch.arange(self.width - 1, -1, -1, device=pos.device)
        ctx_pos = pos[..., None] - offsets  # [m, k, w]
        inside = ctx_pos >= 0
        ctx_pos = ctx_pos.clamp_min(0)
        ctx_row = row[..., None].expand_as(ctx_pos)
        neuron = neurons[:, None, None].expand_as(ctx_pos)
        tokens = torch.where(inside, batch.token_ids[ctx_row, ctx_pos], -1)
        post = torch.where(inside, batch.post[ctx_row, ctx_pos, neuron].double(), float("nan"))
        return {
            "values": torch.where(keep, batch.post[row, pos, neurons[:, None]].double(), float("nan")),
            "windows": torch.where(keep, batch.window_ids[row], -1),
            "positions": torch.where(keep, pos, -1),
            "context_tokens": tokens,
            "context_post": post,
        }

    def _keep(self, candidate: dict[str, Tensor], neurons: Tensor | None = None) -> None:
        """Merge candidates of ``neurons`` (None: all) into the state and keep the best k per neuron in a
        batching-independent order."""
        merged = {name: torch.cat([getattr(self, name) if neurons is None else getattr(self, name)[neurons],
                                   candidate[name]], dim=1) for name in self._state}
        token_index = merged["windows"] * self.window_length + merged["positions"]
        order = _best(merged["values"].abs().nan_to_num(-1.0), token_index, self.k)
        for name in self._state:
            t = merged[name]
            idx = order if t.dim() == 2 else order[..., None].expand(-1, -1, t.shape[2])
            kept = t.gather(1, idx)
            if neurons is None:
                setattr(self, name, kept)
            else:
                getattr(self, name)[neurons] = kept

    def _adopt_extra(self, other: Accumulator) -> None:
        self.window_length = other.window_length

    def _merge_state(self, other: Accumulator) -> None:
        self._keep({name: getattr(other, name) for name in self._state})

    def finalize(self) -> dict[str, Any]:
        """JSON-ready: per neuron lists of the kept peaks (fewer than k where fewer valid tokens exist)."""
        self._require_data()
        found = ~torch.isnan(self.values)
        counts = found.sum(1).tolist()  # kept peaks come first: missing ones sort last

        def rows(t: Tensor) -> list:
            return [r[:n] for r, n in zip(t.tolist(), counts, strict=True)]

        post = self.context_post.float()
        return {
            "k": self.k, "width": self.width, "values": rows(self.values), "windows": rows(self.windows),
            "positions": rows(self.positions), "context_tokens": rows(self.context_tokens),
            "context_post": [[[None if v != v else v for v in ctx] for ctx in neuron]
                             for neuron in rows(post)],
        }
