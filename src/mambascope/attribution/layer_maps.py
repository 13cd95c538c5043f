"""Layer-level token-to-token maps of a model (implicit attention of the whole mixer, LaTIM-style
aggregation) and their rollout through the residual stream (docs/methods.md "Implicit attention").

SSM layers: c[i, j] = ‖W_out·(Ω[:, i, j] ⊙ x_j)‖₂ with Ω the mixer's implicit attention (conv, activation,
hidden attention, gate; :mod:`mambascope.ssm.implicit_attention`).  Attention layers: the same norm of
token j's term in the attention output.  MLP-only layers mix no tokens and get no map (the identity in
the rollout).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mambascope.arch import adapter
from mambascope.ssm.implicit_attention import VARIANTS, attention_token_map, layer_token_map, residual_rollout
from mambascope.trace import head_write_weights, mixer_params, trace

__all__ = ["layer_map", "layer_maps", "rollout_map", "token_mixing_layers"]

_SSM_UNITS = ("hook_x", "hook_conv", "hook_dt", "hook_B", "hook_C", "hook_y", "hook_gate_pre")


def token_mixing_layers(model: nn.Module) -> list[int]:
    """The layers that mix tokens: SSM mixers and attention."""
    ad = adapter(model)
    return [layer for layer in range(ad.n_layers) if ad.layer_kind(layer) in ("mamba", "mamba2", "attention")]


def _check(model: nn.Module, layers: int | Sequence[int] | None) -> list[int]:
    mixing = token_mixing_layers(model)
    if layers is None:
        return mixing
    n = adapter(model).n_layers
    chosen = [layers] if isinstance(layers, int) else list(layers)
    out = []
    for layer in chosen:
        if not -n <= layer < n:
            raise IndexError(f"layer {layer} out of range: the model has layers 0..{n - 1}")
        layer %= n
        if layer not in mixing:
            raise ValueError(f"layer {layer} mixes no tokens (no SSM mixer, no attention); layers with a "
                             f"token map: {mixing}")
        out.append(layer)
    return out


def layer_maps(model: nn.Module, input_ids: Tensor, layers: int | Sequence[int] | None = None, *,
               variant: str = "full", rows: Sequence[int] | Tensor | None = None,
               attention_mask: Tensor | None = None) -> dict[int, Tensor]:
    """{layer: c [b, L, L]} for the chosen token-mixing layers (default all) from one traced forward.

    ``variant``: the SSM operator's ablation (``full``, ``no_conv``, ``no_gate``, ``no_act``); ``rows``:
    only these query rows ([b, R, L]; L times less work when a method needs one query row)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown implicit-attention variant {variant!r}; valid: {', '.join(VARIANTS)}")
    chosen = _check(model, layers)
    ad = adapter(model)
    names = []
    for layer in chosen:
        units = ("mixer." + u for u in _SSM_UNITS) if ad.layer_kind(layer) != "attention" else (
            "attn.hook_pattern", "attn.hook_v")
        names += [f"blocks.{layer}.{u}" for u in units]
    with torch.no_grad():
        tr = trace(model, input_ids, names, attention_mask=attention_mask)
    maps = {}
    for layer in chosen:
        units = tr.layer(layer)
        if ad.layer_kind(layer) == "attention":
            maps[layer] = attention_token_map(units["attn.hook_pattern"], units["attn.hook_v"],
                                              head_write_weights(model, layer), rows=rows)
        else:
            maps[layer] = layer_token_map(units, mixer_params(model, layer), variant, rows=rows,
                                          attention_mask=attention_mask)
    return maps


def layer_map(model: nn.Module, input_ids: Tensor, layer: int, *, variant: str = "full",
              rows: Sequence[int] | Tensor | None = None, attention_mask: Tensor | None = None) -> Tensor:
    """c [b, L, L] of one layer (or [b, R, L] for query ``rows``): row i is the relevance of each position
    j ≤ i for token i (a per-layer method)."""
    maps = layer_maps(model, input_ids, [layer], variant=variant, rows=rows, attention_mask=attention_mask)
    return maps[layer % adapter(model).n_layers]


def rollout_map(model: nn.Module, input_ids: Tensor, *, variant: str = "full",
                attention_mask: Tensor | None = None) -> Tensor:
    """R [b, L, L]: the layer maps of every token-mixing layer rolled out through the residual stream
    (:func:`~mambascope.ssm.implicit_attention.residual_rollout`); a whole-model method."""
    maps = layer_maps(model, input_ids, variant=variant, attention_mask=attention_mask)
    return residual_rollout([maps[layer] for layer in sorted(maps)])
