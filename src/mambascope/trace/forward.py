"""The instrumented forward pass: ``trace`` (every requested unit at once) and ``trace_stream``
(each layer's units handed to a callback, so a corpus scan never holds all layers)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from mambascope.arch import Context, adapter
from mambascope.trace.names import UNITS, layers_of, resolve_names

LayerCallback = Callable[[int, dict[str, torch.Tensor]], None]
Edit = Callable[[torch.Tensor], torch.Tensor]


class Trace(dict):
    """Mapping from full hook names (``blocks.0.mixer.hook_post``) to tensors, plus ``logits``."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], logits: torch.Tensor, arch: str):
        super().__init__(tensors)
        self.logits = logits
        self.arch = arch

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        """The units of one layer keyed without the ``blocks.{l}.`` prefix."""
        prefix = f"blocks.{index}."
        return {name[len(prefix):]: t for name, t in self.items() if name.startswith(prefix)}


def check_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_length: int | None = None) -> None:
    """Raise ``ValueError`` for inputs a forward pass would silently mishandle."""
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor [batch, pos], got {tuple(input_ids.shape)} "
                         f"{input_ids.dtype}")
    if input_ids.numel() == 0:
        raise ValueError("input_ids is empty: nothing to trace")
    vocab = model.get_input_embeddings().num_embeddings
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ValueError(f"input id {bad} is outside the vocabulary (0..{vocab - 1})")
    if max_length is None:
        max_length = adapter(model).max_length
    if max_length is not None and input_ids.shape[1] > max_length:
        raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds the maximum length {max_length}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids "
                             f"{tuple(input_ids.shape)}")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must contain only 0 and 1")
        if not bool(attention_mask.any(dim=1).all()):
            raise ValueError("a row of attention_mask has no tokens")


def _emitter(prefix: str, wanted: set[str], edits: Mapping[str, Edit],
             collected: dict[str, torch.Tensor]) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """``emit`` for one layer: apply the edit registered for the unit, keep it if wanted, pass it on."""

    def emit(unit: str, tensor: torch.Tensor) -> torch.Tensor:
        name = prefix + unit
        if name in edits:
            tensor = edits[name](tensor)
        if name in wanted:
            collected[unit] = tensor
        return tensor

    return emit


def trace_stream(
    model: nn.Module,
    input_ids: torch.Tensor,
    callback: LayerCallback | None,
    *,
    attention_mask: torch.Tensor | None = None,
    names: str | Iterable[str] | None = None,
    edits: Mapping[str, Edit] | None = None,
    max_length: int | None = None,
    grad: bool = False,
) -> torch.Tensor:
    """Run the model once, handing ``callback(layer, {unit: tensor})`` each layer's requested units.

    Args:
        input_ids: [b, L] token ids.  attention_mask: [b, L] of 0/1 (left or right padding), optional.
        names: hook names or shell patterns (``"*hook_post"``, ``"blocks.3.*"``); None = every unit.
        edits: full hook name -> function applied to that unit's tensor; the forward continues with the
            result (zero- or mean-ablation at ``mixer.hook_post``, patching, ...).
        max_length: longest sequence accepted (models with learned positions default to their maximum).
        grad: build the autograd graph (for gradient-based attributions); off by default to save memory.
    Returns the logits [b, L, V].
    """
    ad = adapter(model)
    check_inputs(model, input_ids, attention_mask, max_length)
    units = [ad.units(layer) for layer in range(ad.n_layers)]
    wanted = set(resolve_names(units, names, ad.model_type)) if callback is not None else set()
    edits = dict(edits or {})
    unknown = set(edits) - set(resolve_names(units, None))
    if unknown:
        resolve_names(units, sorted(unknown), ad.model_type)  # raises with the nearest valid name
    device = model.get_input_embeddings().weight.device
    input_ids = input_ids.to(device)
    mask = None
    if attention_mask is not None and not bool(attention_mask.all()):
        mask = attention_mask.to(device)
    pattern_names = [n for n in (*wanted, *edits) if n.endswith(".attn.hook_pattern")]
    ctx = Context(mask, frozenset(layers_of(pattern_names)))

    with torch.set_grad_enabled(grad):
        h = ad.embed(input_ids, ctx)
        for index in range(ad.n_layers):
            collected: dict[str, torch.Tensor] = {}
            h = ad.run_block(index, ad.on_block_device(index, h, ctx), ctx,
                             _emitter(f"blocks.{index}.", wanted, edits, collected))
            if collected:
                callback(index, collected)
        logits = ad.logits(h)
    return logits


def trace(
    model: nn.Module,
    input_ids: torch.Tensor,
    names: str | Iterable[str] | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    edits: Mapping[str, Edit] | None = None,
    max_length: int | None = None,
    grad: bool = False,
) -> Trace:
    """Run the model once and return every requested unit: ``trace["blocks.0.mixer.hook_post"]``.

    Units and shapes per layer are ``mambascope.arch.adapter(model).units(layer)`` (docs/design.md §3, §10).
    For a corpus, prefer ``trace_stream``, which never holds more than one layer's units.
    """
    tensors: dict[str, torch.Tensor] = {}

    def keep(layer: int, units: dict[str, torch.Tensor]) -> None:
        tensors.update({f"blocks.{layer}.{unit}": t for unit, t in units.items()})

    logits = trace_stream(model, input_ids, keep, attention_mask=attention_mask, names=names, edits=edits,
                          max_length=max_length, grad=grad)
    return Trace(tensors, logits, adapter(model).model_type)


__all__ = ["UNITS", "Trace", "check_inputs", "trace", "trace_stream"]
