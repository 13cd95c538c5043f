"""Knockout edits over a whole model and their effect on a prediction (Endy et al., ACL 2025; docs/methods.md).

SSM layers: the :class:`~mambascope.ssm.knockout.Knockout` edit of ``mixer.hook_y`` (the scan output
without the source token's term, exact; docs/hooks.md).  Attention layers: attention knockout (Geva et al.
2023, "Dissecting Recall of Factual Associations"): the source key hidden from every later query and each
such row of ``attn.hook_pattern`` renormalised over the keys left, which is the softmax with the source's
score set to −inf.  Neither touches the causal conv of a Mamba mixer: the d_conv − 1 tokens after the
source still see it through the conv (Endy et al. knock out the SSM's hidden attention only).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mambascope.arch import adapter
from mambascope.ssm.knockout import Knockout
from mambascope.trace import trace
from mambascope.trace.forward import KNOCKOUT_UNIT, AnyEdit, Edit

PATTERN_UNIT = "attn.hook_pattern"

__all__ = ["Knockout", "KnockoutGrid", "attention_knockout", "knockout_edits", "knockout_grid", "knockout_layers",
           "knockout_logprobs"]


def knockout_layers(model: nn.Module, layers: Iterable[int] | None = None, attention: bool = True) -> list[int]:
    """The layers (of ``layers``, default all) where a token can be knocked out: those with a scan, and with
    ``attention`` those with softmax attention.  ValueError when none is left."""
    ad = adapter(model)
    chosen = list(range(ad.n_layers)) if layers is None else list(layers)
    for layer in chosen:
        ad.check_layer(layer)
    kinds = (KNOCKOUT_UNIT, PATTERN_UNIT) if attention else (KNOCKOUT_UNIT,)
    out = [layer for layer in chosen if any(u in ad.units(layer) for u in kinds)]
    if not out:
        raise ValueError(f"layers {chosen} of this {ad.model_type} model have no SSM scan"
                         f"{' or attention' if attention else ''} to knock a token out of")
    return out


def attention_knockout(source: int | Sequence[int | None]) -> Edit:
    """Edit of ``attn.hook_pattern`` [b, H, L, L]: hide key ``source`` (one for every row, or ``source[r]`` in
    row r, None for none) from every later query and renormalise those rows over the remaining keys (= the
    softmax with that score at −inf; a row whose whole mass was on the source, to the last bit, becomes zero)."""
    def edit(pattern: torch.Tensor) -> torch.Tensor:
        b, _, L, _ = pattern.shape
        per_row = [source] * b if isinstance(source, int) else source
        keep = torch.ones(b, 1, L, L, dtype=torch.bool, device=pattern.device)
        for r, j in enumerate(per_row):
            if j is not None:
                keep[r, 0, j % L + 1:, j % L] = False
        kept = pattern * keep
        return kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(pattern.dtype).tiny)

    return edit


def knockout_edits(model: nn.Module, source: int | Sequence[int | None], *, layers: Iterable[int] | None = None,
                   attention: bool = True) -> dict[str, AnyEdit]:
    """Edits that knock token ``source`` out of every later token in each knockout layer of ``layers``
    (default all, see :func:`knockout_layers`): a :class:`Knockout` on each SSM layer's ``mixer.hook_y``,
    and with ``attention`` an :func:`attention_knockout` on each attention layer's pattern.

    ``source``: one position for every row of the batch, or one per row (row r knocks out ``source[r]``, none
    where it is None).  Pass the result as ``edits=`` to ``mambascope.trace``.
    """
    ad = adapter(model)
    if not isinstance(source, int):
        source = [None if s is None else int(s) for s in source]
    ssm = Knockout(source) if isinstance(source, int) else [Knockout(s, rows=(r,)) for r, s in enumerate(source)
                                                            if s is not None]
    edits: dict[str, AnyEdit] = {}
    for layer in knockout_layers(model, layers, attention):
        units = ad.units(layer)
        if KNOCKOUT_UNIT in units:
            edits[f"blocks.{layer}.{KNOCKOUT_UNIT}"] = ssm
        if attention and PATTERN_UNIT in units:
            edits[f"blocks.{layer}.{PATTERN_UNIT}"] = attention_knockout(source)
    return edits


def _logprob(logits: torch.Tensor, position: int, target: int) -> torch.Tensor:
    return torch.log_softmax(logits[:, position].double(), dim=-1)[:, target]


def knockout_logprobs(model: nn.Module, input_ids: torch.Tensor, *, target: int, position: int = -1,
                      sources: Sequence[int] | None = None, layers: Iterable[int] | None = None,
                      attention: bool = True, batch_size: int = 32) -> tuple[torch.Tensor, float]:
    """(log p(target) at ``position`` with each source knocked out of every layer of ``layers`` [len(sources)],
    the clean log-prob); ``sources`` default every position.  Batched: row r + 1 of a forward knocks out its
    own source, row 0 none; each knocked-out value is the clean one plus its difference to its own batch's row 0,
    so that a knockout that changes nothing gives exactly the clean value (rows of one batch round alike)."""
    ids = torch.as_tensor(input_ids).reshape(1, -1)
    L = ids.shape[1]
    chosen = list(range(L)) if sources is None else [s % L for s in sources]
    layer_list = knockout_layers(model, layers, attention)
    out = torch.empty(len(chosen), dtype=torch.float64)
    clean = None
    for start in range(0, len(chosen), batch_size):
        part = [None, *chosen[start:start + batch_size]]
        edits = knockout_edits(model, part, layers=layer_list, attention=attention)
        values = _logprob(trace(model, ids.expand(len(part), -1), names=[], edits=edits).logits, position, target)
        clean = float(values[0]) if clean is None else clean
        out[start:start + len(part) - 1] = (clean + (values[1:] - values[0])).cpu()
    if clean is None:
        clean = float(_logprob(trace(model, ids, names=[]).logits, position, target)[0])
    return out, clean


@dataclass
class KnockoutGrid:
    """log p(target) with source j knocked out of layer ℓ alone: ``logprob`` [layers, positions] (float64),
    beside ``clean_logprob``; ``drop`` = clean − knocked."""

    layers: list[int]
    positions: list[int]
    logprob: torch.Tensor
    clean_logprob: float

    @property
    def drop(self) -> torch.Tensor:
        return self.clean_logprob - self.logprob

    def to_json(self) -> dict:
        return {"layers": self.layers, "positions": self.positions, "logprob": self.logprob.tolist(),
                "clean_logprob": self.clean_logprob, "drop": self.drop.tolist()}


def knockout_grid(model: nn.Module, input_ids: torch.Tensor, *, target: int, position: int = -1,
                  positions: Sequence[int] | None = None, layers: Iterable[int] | None = None,
                  attention: bool = True, batch_size: int = 32) -> KnockoutGrid:
    """The effect on log p(target) at ``position`` of knocking each source (``positions``, default all) out of
    every later token in one layer at a time (each knockout layer of ``layers``)."""
    ids = torch.as_tensor(input_ids).reshape(1, -1)
    L = ids.shape[1]
    pos = list(range(L)) if positions is None else sorted({p % L for p in positions})
    rows = knockout_layers(model, layers, attention)
    values = torch.empty(len(rows), len(pos), dtype=torch.float64)
    clean = 0.0
    for r, layer in enumerate(rows):
        values[r], clean = knockout_logprobs(model, ids, target=target, position=position, sources=pos,
                                             layers=[layer], attention=attention, batch_size=batch_size)
    return KnockoutGrid(rows, pos, values, clean)
