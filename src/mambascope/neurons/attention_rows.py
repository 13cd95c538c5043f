"""The hidden-attention row of every neuron's top context, computed in the census pass itself.

For neuron e of an SSM layer (channel e on Mamba-1, head e // head_dim on Mamba-2), the exact hidden-attention
row α[t, ·] (Ali et al. 2024, ``ssm.hidden_attention``) at the peak t of its top context (the first of
``TopContextAccumulator``), over the ``width`` tokens of the context ending at t.  Whenever a batch gives a
neuron a new top context, its row is computed from that batch's traced Δ, B and C (all such neurons at once),
so the rows never need a second pass over the corpus; after the first batches a new top context is rare.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from mambascope.neurons.batch import LayerLabel
from mambascope.neurons.top_contexts import TopContextAccumulator
from mambascope.ssm.params import MixerParams

# the traced units the rows are computed from
UNITS = ("mixer.hook_dt", "mixer.hook_B", "mixer.hook_C")


class TopAttentionRows:
    """Per neuron: the window, position and row of its current top context, [E, M] / [E, M, width] with M = 1
    while streaming and one candidate per merged accumulator after ``merge`` (``finalize`` keeps the one of
    the final top context)."""

    def __init__(self, params: MixerParams, width: int, layer: LayerLabel = None) -> None:
        self.params, self.width, self.layer = params, width, layer
        self.window: Tensor | None = None  # [E, M]
        self.position: Tensor | None = None
        self.values: Tensor | None = None  # [E, M, width] float32, NaN before the window start

    def update(self, units: Mapping[str, Tensor], tops: TopContextAccumulator, window_ids: Tensor) -> None:
        """After ``tops.update`` on this batch: compute the rows of the neurons whose top context is now in it.

        ``units``: the layer's traced tensors of the batch (``UNITS``); ``window_ids`` [b] its rows' windows."""
        win, pos = tops.windows[:, 0], tops.positions[:, 0]
        E, device = win.shape[0], win.device
        if self.window is None:
            self.window = torch.full((E, 1), -1, dtype=torch.long, device=device)
            self.position = torch.full((E, 1), -1, dtype=torch.long, device=device)
            self.values = torch.full((E, 1, self.width), float("nan"), device=device)
        window_ids = window_ids.to(device)
        in_batch = torch.isin(win, window_ids) & ((win != self.window[:, 0]) | (pos != self.position[:, 0]))
        neurons = in_batch.nonzero().flatten()
        if neurons.numel() == 0:
            return
        row = (window_ids[None, :] == win[neurons, None]).int().argmax(1)  # the batch row of each top context
        self.values[neurons, 0] = self._rows(units, row, neurons // self.params.head_dim, pos[neurons]).float()
        self.window[neurons, 0], self.position[neurons, 0] = win[neurons], pos[neurons]

    def _rows(self, units: Mapping[str, Tensor], row: Tensor, unit: Tensor, peak: Tensor) -> Tensor:
        """α[t, s] for s = t − width + 1 … t (NaN before the window start) of m (batch row, Δ unit, peak t)
        triples, [m, width] float64, all at once: with S_s = Σ_{k=s+1..t} Δ_k (Ali et al. 2024, eq. 9–11;
        ``ssm.reference.hidden_attention_loops``), α[t, s] = Σ_n C[t, n]·exp(A_n·S_s)·B[s, n]·Δ_s."""
        dt, B, C = (units[name].double() for name in UNITS)
        s = peak[:, None] - (self.width - 1) + torch.arange(self.width, device=peak.device)  # [m, w]
        inside = s >= 0
        s = s.clamp_min(0)
        r = row[:, None].expand_as(s)
        delta = torch.where(inside, dt[r, s, unit[:, None].expand_as(s)], 0.0)  # [m, w]
        after = delta.flip(1).cumsum(1).flip(1) - delta  # S_s: Δ of the positions after s, up to t
        A = self.params.A.to(dt.device, torch.float64)[unit]  # [m, N] (Mamba-1) or [m] (Mamba-2: one per head)
        if B.dim() == 4:  # Mamba-2: B, C [b, L, G, N]; the head's group
            group = unit // (self.params.n_heads // B.shape[2])
            Bs, Ct = B[r, s, group[:, None].expand_as(s)], C[row, peak, group]  # [m, w, N], [m, N]
            decay = torch.exp(A[:, None, None] * after[..., None])
        else:
            Bs, Ct = B[r, s], C[row, peak]
            decay = torch.exp(A[:, None, :] * after[..., None])  # [m, w, N]
        alpha = (Ct[:, None, :] * decay * Bs).sum(-1) * delta
        return torch.where(inside, alpha, float("nan"))

    def merge(self, other: TopAttentionRows) -> TopAttentionRows:
        """Keep both accumulators' candidates: the merged top contexts decide at ``finalize``."""
        if other.window is None:
            return self
        if self.window is None:
            self.window, self.position, self.values = other.window, other.position, other.values
            return self
        device = self.window.device
        self.window = torch.cat([self.window, other.window.to(device)], 1)
        self.position = torch.cat([self.position, other.position.to(device)], 1)
        self.values = torch.cat([self.values, other.values.to(device)], 1)
        return self

    def finalize(self, top: Mapping[str, Any]) -> dict[str, list]:
        """``attention_rows`` {neurons, tokens, values} for the neurons with a top context, from the finalized
        (and decoded: ``tokens``) top contexts ``top``; values None before the window start."""
        out: dict[str, list] = {"neurons": [], "tokens": [], "values": []}
        if self.window is None:
            return out
        values = self.values.tolist()
        window, position = self.window.tolist(), self.position.tolist()
        for e, wins in enumerate(top["windows"]):  # formatting E rows for JSON, not a computation
            if not wins:
                continue
            j = next((j for j, (w, p) in enumerate(zip(window[e], position[e], strict=True))
                      if w == wins[0] and p == top["positions"][e][0]), None)
            if j is None:
                raise RuntimeError(f"layer {self.layer}: no attention row for neuron {e}'s top context (window "
                                   f"{wins[0]}); the rows must see every batch the top contexts see")
            out["neurons"].append(e)
            out["tokens"].append(list(top["tokens"][e][0]))
            out["values"].append([None if v != v else v for v in values[e][j]])
        return out
