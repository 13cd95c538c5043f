"""Live traces for ``mambascope serve``: a user's text through the model, one neuron's activation per token
and its exact hidden-attention row at a chosen position.

The activation is the layer's neuron unit (``adapter.neuron_unit``: ``blocks.{l}.mixer.hook_post`` on SSM
layers, ``blocks.{l}.mlp.hook_post`` on MLP layers) from :func:`mambascope.trace.trace`.  The attention row
is α[t, ·] of :func:`mambascope.ssm.hidden_attention.hidden_attention` (kind ``"s6"``) for the neuron's
channel (Mamba-1) or head (Mamba-2: channel // head_dim), computed for that one row only, exactly as the
pipeline's ``context_attention_rows`` computes the rows the report shows.  Attention and MLP layers have
no hidden attention, and the answer says so.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from mambascope.arch import adapter
from mambascope.ssm.hidden_attention import hidden_attention
from mambascope.trace import trace

MAX_TOKENS = 1024
"""Longest text (in tokens) a live trace accepts, below the model's own maximum where it has one: the
server answers in well under a second on CPU for a small model at this length."""
MAX_CHARS = 20_000
"""Longest text (in characters) read before tokenizing."""


class LiveInputError(ValueError):
    """A live-trace request the model cannot answer (empty, no such layer/neuron/position): HTTP 400."""


class LiveTooLongError(LiveInputError):
    """A text over the live-trace limits: HTTP 413."""


class LiveModel:
    """A loaded model and tokenizer that trace texts one at a time (a lock serialises requests)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, name: str) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.adapter = adapter(model)
        own = self.adapter.max_length
        self.max_tokens = min(MAX_TOKENS, own) if own else MAX_TOKENS
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"available": True, "model": self.name, "max_tokens": self.max_tokens, "max_chars": MAX_CHARS,
                "layers": {str(layer): self.adapter.layer_kind(layer) for layer in range(self.adapter.n_layers)}}

    def neuron_counts(self) -> dict[int, int]:
        """Neurons per layer that has them (from a one-token trace of the neuron units: shapes only)."""
        ad = self.adapter
        units = {layer: ad.neuron_unit(layer) for layer in range(ad.n_layers)}
        names = [f"blocks.{layer}.{unit}" for layer, unit in units.items() if unit]
        device = next(self.model.parameters()).device
        with self._lock, torch.no_grad():
            tr = trace(self.model, torch.zeros(1, 1, dtype=torch.long, device=device), names)
        return {int(name.split(".")[1]): int(tr[name].shape[-1]) for name in names if tr[name].dim() == 3}

    def mismatch(self, sizes: dict[int, int]) -> str | None:
        """Why this model is not the one of an output with ``sizes`` {layer: neurons}, or None."""
        counts = self.neuron_counts()
        for layer, n in sorted(sizes.items()):
            if counts.get(layer) != n:
                has = f"{counts[layer]} neurons" if layer in counts else "no neurons"
                return (f"model {self.name!r} does not match this output: its layer {layer} has {has}, the output's "
                        f"{n}; give the run's model with --model")
        return None

    def tokenize(self, text: str) -> torch.Tensor:
        if not isinstance(text, str) or not text:
            raise LiveInputError("text: give a non-empty string")
        if len(text) > MAX_CHARS:
            raise LiveTooLongError(f"text: {len(text)} characters; at most {MAX_CHARS}")
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        if ids.shape[1] == 0:
            raise LiveInputError("text: it has no tokens")
        if ids.shape[1] > self.max_tokens:
            raise LiveTooLongError(f"text: {ids.shape[1]} tokens; at most {self.max_tokens} for a live trace")
        return ids.to(next(self.model.parameters()).device)

    def trace(self, text: str, layer: int, neuron: int, position: int | None = None) -> dict[str, Any]:
        """``{"tokens", "activations", "position", "attention": {"unit", "index", "row"} | None, "reason"}``.

        ``position``: the query token t of the attention row (default the last; negative counts from the end).
        """
        ad = self.adapter
        if not 0 <= layer < ad.n_layers:
            raise LiveInputError(f"layer: {layer} is not a layer of {self.name} (0..{ad.n_layers - 1})")
        unit = ad.neuron_unit(layer)
        if unit is None:
            raise LiveInputError(f"layer {layer} of {self.name} is an attention layer: it has no neurons")
        ids = self.tokenize(text)
        L = ids.shape[1]
        position = L - 1 if position is None else position
        if not -L <= position < L:
            raise LiveInputError(f"position: {position} is outside the text's {L} tokens")
        position %= L
        kind = ad.neuron_kind(layer)
        ssm = kind in ("mamba", "mamba2")
        names = [f"blocks.{layer}.{unit}"] + ([f"blocks.{layer}.mixer.hook_{u}" for u in ("dt", "B", "C")]
                                              if ssm else [])
        with self._lock, torch.no_grad():
            tr = trace(self.model, ids, names)
            post = tr[f"blocks.{layer}.{unit}"][0]
            if post.dim() != 2:  # MoE [L, X, F]: the census takes each expert's neurons separately
                raise LiveInputError(f"layer {layer} is a {ad.layer_kind(layer)} layer: live traces show dense "
                                     "neurons only")
            if not 0 <= neuron < post.shape[1]:
                raise LiveInputError(f"neuron: {neuron} is out of range: layer {layer} has neurons "
                                     f"0..{post.shape[1] - 1}")
            attention, reason = None, None
            if ssm:
                params = ad.mixer_params(layer)
                channel = neuron // params.head_dim  # head_dim is 1 on Mamba-1: one row per channel
                row = hidden_attention(tr.layer(layer), params, "s6", channels=[channel], rows=[position])[0, 0, 0]
                attention = {"unit": "head" if kind == "mamba2" else "channel", "index": channel,
                             "row": [float(x) for x in row[:position + 1].tolist()]}
            else:
                reason = (f"layer {layer} ({ad.layer_kind(layer)}) has no hidden attention: that is a quantity of "
                          "Mamba SSM layers; its neurons are the MLP's post")
        return {"model": self.name, "layer": layer, "neuron": neuron, "position": position,
                "tokens": [self.tokenizer.decode([int(i)]) for i in ids[0].tolist()],
                "activations": [float(x) for x in post[:, neuron].tolist()], "attention": attention,
                "reason": reason}


def load_live(name: str, device: str = "cpu") -> tuple[LiveModel | None, str | None]:
    """(LiveModel, None), or (None, why it could not load, one line naming the model)."""
    from mambascope.models.loading import load_model

    try:
        model, tokenizer = load_model(name, device=device)
    except Exception as exc:  # any failure becomes the live panel's reason; serving the rest goes on
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, f"model {name!r} could not be loaded: {first}"
    return LiveModel(model, tokenizer, name), None
