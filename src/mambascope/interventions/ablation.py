"""Held-out loss under interventions at the neuron unit (docs/design.md §5, "Ablation" and "Pruning").

Ablation replaces chosen neurons of ``post`` (Mamba ``mixer.hook_post``, GPT-2 ``mlp.hook_post``) by 0
or by their mean over the selection split, and measures next-token loss on a disjoint held-out split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from mambascope.arch import adapter
from mambascope.runner import LossResult, scan_corpus
from mambascope.trace.forward import Edit


def heldout_loss(model: nn.Module, windows: torch.Tensor, *, edits: Mapping[str, Edit] | None = None,
                 batch_size: int = 16, bar: tqdm | None = None) -> LossResult:
    """Mean next-token loss of ``model`` on ``windows`` [n, T] (no padding), optionally under ``edits``."""
    return scan_corpus(model, windows, None, edits=edits, batch_size=batch_size, progress=False, bar=bar)


def ablation_edits(model: nn.Module, neurons: Mapping[int, Sequence[int] | torch.Tensor], mode: str = "zero",
                   means: Mapping[int, torch.Tensor] | None = None) -> dict[str, Edit]:
    """Edits that set the given neurons of each layer's neuron unit to 0 (``zero``) or to ``means[layer]``.

    neurons: layer -> neuron indices.  means: layer -> [E] mean activation over the selection split.
    """
    if mode not in ("zero", "mean"):
        raise ValueError(f"unknown ablation mode {mode!r}: use 'zero' or 'mean'")
    ad = adapter(model)
    edits: dict[str, Edit] = {}
    for layer, index in neurons.items():
        unit = ad.neuron_unit(layer)
        if unit is None:
            raise ValueError(f"layer {layer} is an attention-only layer: it has no neurons to ablate")
        index = torch.as_tensor(index, dtype=torch.long)
        if index.numel() == 0:
            continue
        if mode == "mean":
            if means is None or layer not in means:
                raise ValueError(f"mean ablation of layer {layer} needs its neuron means from the selection split")
            value = means[layer][index]
        else:
            value = torch.zeros(index.numel())

        def edit(post: torch.Tensor, index: torch.Tensor = index, value: torch.Tensor = value) -> torch.Tensor:
            post = post.clone()
            post[..., index.to(post.device)] = value.to(device=post.device, dtype=post.dtype)
            return post

        edits[f"blocks.{layer}.{unit}"] = edit
    return edits


def random_groups(n_neurons: int, size: int, draws: int, seed: int) -> list[torch.Tensor]:
    """``draws`` random neuron index sets of ``size`` (the control for a group of that size)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n_neurons, generator=g)[:size].sort().values for _ in range(draws)]


MIN_DRAWS = 3


def check_draws(draws: int) -> int:
    """``draws`` validated: the random control reports a mean and a spread, which need several draws."""
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < MIN_DRAWS:
        raise ValueError(f"--draws must be at least {MIN_DRAWS} (the random control's mean and std need several "
                         f"draws), got draws={draws!r}")
    return draws


def _spread(values: list[float]) -> dict[str, float | list[float] | None]:
    """Mean, sample std (None, i.e. JSON null, over fewer than 2 values: undefined, not 0) and the values."""
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(values) > 1 else None, "draws": values}


def ablation_study(model: nn.Module, windows: torch.Tensor, groups: Mapping[str, Mapping[int, Sequence[int]]],
                   means: Mapping[int, torch.Tensor], n_neurons: int | Mapping[int, int], *, draws: int = 3,
                   seed: int = 0, batch_size: int = 16, progress: bool = False,
                   baseline: LossResult | None = None) -> dict:
    """Loss with each named group zero- and mean-ablated, against random groups of the same size per layer.

    groups: group name -> {layer: neuron indices}.  n_neurons: the layers' width (one int, or per layer
    when layers differ, as in hybrids).  Returns the baseline and, per group and mode, the
    loss, its change, and the random control's mean, std and draws (``draws`` >= 3).  An empty group is
    reported as such.  ``baseline``: the unedited ``heldout_loss`` of ``windows`` when already measured.
    """
    check_draws(draws)
    bar = tqdm(unit="tok", unit_scale=True, desc="ablation", disable=not progress)
    base = baseline if baseline is not None else heldout_loss(model, windows, batch_size=batch_size, bar=bar)
    out: dict = {"baseline_loss": base.loss, "tokens": base.tokens, "draws": draws, "groups": {}}
    for g_index, (name, layers) in enumerate(groups.items()):
        size = {layer: len(idx) for layer, idx in layers.items() if len(idx)}
        entry: dict = {"neurons": sum(size.values()), "per_layer": {str(k): v for k, v in size.items()}}
        if not size:
            out["groups"][name] = entry | {"skipped": "group is empty"}
            continue
        width = n_neurons if isinstance(n_neurons, Mapping) else dict.fromkeys(size, n_neurons)
        per_layer = {layer: random_groups(width[layer], k, draws, seed + 1000 * g_index + layer)
                     for layer, k in size.items()}
        controls = [{layer: sets[d] for layer, sets in per_layer.items()} for d in range(draws)]
        for mode in ("zero", "mean"):
            loss = heldout_loss(model, windows, edits=ablation_edits(model, layers, mode, means),
                                batch_size=batch_size, bar=bar).loss
            rand = [heldout_loss(model, windows, edits=ablation_edits(model, c, mode, means),
                                 batch_size=batch_size, bar=bar).loss for c in controls]
            entry[mode] = {"loss": loss, "delta": loss - base.loss, "random": _spread(rand),
                           "random_delta_mean": float(torch.tensor(rand).mean()) - base.loss}
        out["groups"][name] = entry
    bar.close()
    return out


def pruning_study(model: nn.Module, windows: torch.Tensor, priority: Mapping[int, torch.Tensor],
                  ratios: Sequence[float] = (0.1, 0.25, 0.5), *, draws: int = 3, seed: int = 0,
                  batch_size: int = 16, progress: bool = False, baseline: LossResult | None = None) -> dict:
    """Zero-prune the first ``ratio`` of each layer's neurons in ``priority`` order, against random pruning.

    priority: layer -> [E] neuron indices, first = pruned first (e.g. dead, then rarely active, then
    lowest importance).  Returns per ratio the loss before/after and the random control's spread
    (``draws`` >= 3).  Arguments are checked before any forward pass.  ``baseline``: as in :func:`ablation_study`.
    """
    check_draws(draws)
    bad = [ratio for ratio in ratios if not 0 < ratio < 1]
    if bad:
        raise ValueError(f"pruning ratio {bad[0]} must be in (0, 1)")
    bar = tqdm(unit="tok", unit_scale=True, desc="pruning", disable=not progress)
    base = baseline if baseline is not None else heldout_loss(model, windows, batch_size=batch_size, bar=bar)
    out: dict = {"baseline_loss": base.loss, "tokens": base.tokens, "ratios": {}}
    for ratio in ratios:
        chosen = {layer: order[: round(ratio * order.numel())] for layer, order in priority.items()}
        loss = heldout_loss(model, windows, edits=ablation_edits(model, chosen), batch_size=batch_size, bar=bar).loss
        per_layer = {layer: random_groups(order.numel(), round(ratio * order.numel()), draws, seed + layer)
                     for layer, order in priority.items()}
        rand = [heldout_loss(model, windows, batch_size=batch_size, bar=bar,
                             edits=ablation_edits(model, {layer: sets[d] for layer, sets in per_layer.items()})).loss
                for d in range(draws)]
        out["ratios"][str(ratio)] = {"pruned_per_layer": {str(k): int(v.numel()) for k, v in chosen.items()},
                                     "loss": loss, "delta": loss - base.loss, "random": _spread(rand)}
    bar.close()
    return out
