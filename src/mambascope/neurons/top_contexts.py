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


def _best(magnitude: Tensor, token_index: Tensor, k: int) -> Tensor:
    """Column indices [E, ≤k] of the k best per row: |value| descending, then corpus token index ascending.

    One exact ``topk`` over int64 keys: the bits of a non-negative fp32 are ordered like its value, so
    (magnitude bits << 32) | (2³² − 1 − index) orders by magnitude, ties to the earlier token, whatever
    the batching.  Negative magnitudes mark invalid tokens and sort last.
    """
    bits = magnitude.float().clamp_min(0).view(torch.int32).long()
    key = (bits << 32) | (0xFFFFFFFF - token_index)
    key = torch.where(magnitude >= 0, key, -1)
    return key.topk(min(k, key.shape[1]), dim=1).indices


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
        b, L, E = batch.post.shape
        score = batch.post.abs().masked_fill(~batch.valid[..., None], -1.0).permute(2, 0, 1).reshape(E, b * L)
        if self.window_length is None:
            self.window_length = L
        token_index = (batch.window_ids[:, None] * self.window_length + torch.arange(L, device=score.device))
        flat = _best(score, token_index.reshape(1, -1).expand(E, -1), self.k)  # [E, k]
        row, pos = flat // L, flat % L
        keep = score.gather(1, flat) >= 0  # fewer valid tokens than k leaves invalid picks
        offsets = torch.arange(self.width - 1, -1, -1, device=pos.device)
        ctx_pos = pos[..., None] - offsets  # [E, k, w]
        inside = ctx_pos >= 0
        ctx_pos = ctx_pos.clamp_min(0)
        ctx_row = row[..., None].expand_as(ctx_pos)
        neuron = torch.arange(E, device=pos.device)[:, None, None].expand_as(ctx_pos)
        tokens = torch.where(inside, batch.token_ids[ctx_row, ctx_pos], -1)
        post = torch.where(inside, batch.post[ctx_row, ctx_pos, neuron].double(), float("nan"))
        candidate = {
            "values": torch.where(keep, batch.post[row, pos, torch.arange(E, device=pos.device)[:, None]].double(),
                                  float("nan")),
            "windows": torch.where(keep, batch.window_ids[row], -1),
            "positions": torch.where(keep, pos, -1),
            "context_tokens": tokens,
            "context_post": post,
        }
        self.n_tokens += int(batch.valid.sum())
        if first:
            for name in self._state:
                setattr(self, name, candidate[name][:, :0])
        self._keep(candidate)

    def _keep(self, candidate: dict[str, Tensor]) -> None:
        """Merge candidates into the state and keep the best k per neuron in a batching-independent order."""
        merged = {name: torch.cat([getattr(self, name), candidate[name]], dim=1) for name in self._state}
        token_index = merged["windows"] * self.window_length + merged["positions"]
        order = _best(merged["values"].abs().nan_to_num(-1.0), token_index, self.k)
        for name in self._state:
            t = merged[name]
            idx = order if t.dim() == 2 else order[..., None].expand(-1, -1, t.shape[2])
            setattr(self, name, t.gather(1, idx))

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
