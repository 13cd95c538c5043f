"""Attribution patching: every cell of a patching grid from one forward and one backward pass.

Nanda 2023, "Attribution Patching: Activation Patching At Industrial Scale": the metric of the base run
with unit a replaced by the source's value is, to first order,

    m_patched ≈ m_base + (a_source − a_base) · ∂m/∂a |_base

with the sum over the unit's components at one position (and its channels or head).  For denoising the
base run is the corrupted one and the source the clean one; for noising the reverse.  The estimate is
exact where m is affine in a along the path from a_base to a_source, and its error grows with the
nonlinearity in between (final norm, gates, softmax); docs/patching.md measures it against true
patching (:func:`mambascope.interventions.patching.activation_patching`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from mambascope.interventions.patching import (
    PatchGrid,
    PatchingResult,
    UnitRow,
    all_states,
    as_ids,
    check_positions,
    compose,
    grid_rows,
    prepare_runs,
)
from mambascope.trace import trace
from mambascope.trace.forward import Edit


def _cell_sums(delta_grad: torch.Tensor, row: UnitRow, positions: Sequence[int]) -> torch.Tensor:
    """Σ over a row's components of (a_source − a_base)·∂m/∂a at each position: [len(positions)]."""
    d = delta_grad[0, positions]
    if row.index is not None:
        d = d[:, list(row.index)]
    return d.reshape(len(positions), -1).sum(dim=1)


def attribution_patching(
    model: nn.Module,
    clean_ids: torch.Tensor | Sequence[int],
    corrupt_ids: torch.Tensor | Sequence[int] | None = None,
    *,
    target: int,
    metric: str = "logit_diff",
    other: int | None = None,
    unit_types: Sequence[str] = ("resid_pre",),
    layers: Iterable[int] | None = None,
    positions: Sequence[int] | None = None,
    channels: Sequence[int] | None = None,
    direction: str = "denoise",
    corrupt_edits: Mapping[str, Edit] | None = None,
) -> PatchingResult:
    """The first-order estimate of :func:`~mambascope.interventions.patching.activation_patching`'s grids
    (same arguments, no batching needed): the source run is traced once, the base run once with its
    autograd graph, and one backward pass of the metric gives ∂m/∂a for every unit at once.

    Each grid's ``metric`` is the estimated patched metric, ``effect`` the estimated fraction restored.
    """
    rows = grid_rows(model, unit_types, layers, channels)
    names = sorted({r.name for rs in rows.values() for r in rs})
    pos = check_positions(positions, as_ids(clean_ids, "clean").shape[1])
    runs = prepare_runs(model, clean_ids, corrupt_ids, names, target=target, metric=metric, other=other,
                        direction=direction, corrupt_edits=corrupt_edits)
    # ∂m/∂a through a zero added to each unit: the gradient of the value the forward continues with, also
    # where the tracer hands out a copy (the SSM state's [b, K, ...] stack)
    zeros = {n: torch.zeros_like(runs.base[n], requires_grad=True) for n in names}
    edits = dict(runs.base_edits)
    for n in names:
        edits[n] = compose(edits.get(n), lambda t, z=zeros[n]: t + z.to(t.dtype))
    logits = trace(model, runs.base_ids, names=[], edits=edits, grad=True,
                   state_positions=all_states(names, runs.base_ids.shape[1])).logits
    m_base = runs.metric(logits)[0]
    grads = torch.autograd.grad(m_base, [zeros[n] for n in names], allow_unused=True)
    base_metric = float(m_base.detach())
    grids = {}
    for u, rs in rows.items():
        estimate = torch.empty(len(rs), len(pos), dtype=torch.float64)
        for i, row in enumerate(rs):
            g = grads[names.index(row.name)]
            if g is None:  # the metric does not depend on this unit: patching it changes nothing
                estimate[i] = base_metric
                continue
            delta = (runs.source[row.name].double() - runs.base[row.name].double()) * g.double()
            estimate[i] = base_metric + _cell_sums(delta.cpu(), row, pos)
        grids[u] = PatchGrid(u, rs, pos, estimate, runs.effect(estimate), runs.changed(rs, pos))
    return PatchingResult(runs.metric, direction, runs.clean_metric, runs.corrupt_metric, grids)


def correlation(true: torch.Tensor, estimate: torch.Tensor) -> dict[str, float | int | None]:
    """Pearson and Spearman correlation of two 1-D tensors, with their length ``cells``; a correlation is
    None where undefined (fewer than 2 cells, or a constant side)."""
    frame = pd.DataFrame({"true": true.double().numpy(), "estimate": estimate.double().numpy()})
    out: dict[str, float | int | None] = {"cells": len(frame)}
    for method in ("pearson", "spearman"):
        value = frame.corr(method=method).iloc[0, 1] if len(frame) > 1 else np.nan
        out[method] = float(value) if np.isfinite(value) else None
    return out


def agreement(true: PatchGrid, estimate: PatchGrid) -> dict[str, float | int | None]:
    """:func:`correlation` of two grids' effects over the cells where patching changes something
    (``true.changed``): elsewhere both are 0 by construction, and only float noise would be ranked."""
    keep = true.changed.flatten()
    return correlation(true.effect.flatten()[keep], estimate.effect.flatten()[keep])


__all__ = ["agreement", "attribution_patching", "correlation"]
