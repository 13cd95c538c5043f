"""Decoding through the traced forward, with edits at every new token (docs/hooks.md, "Generation and steering").

The prefill is one traced forward over the prompt that fills a :class:`~mambascope.arch.base.DecodeCache`
(each SSM mixer's conv window and state, each attention layer's keys and values); every later step runs
the tracer on the one new token from that cache, so a step costs one token, not a re-run of the prefix
(the recurrent form of the scan: h_t = exp(Δ_t·A)·h_{t-1} + Δ_t·B_t·x_t, Gu & Dao 2023, Alg. 2).

Edit contract: an edit sees the unit's tensor of the current call, [b, L, ...] at the prefill and
[b, 1, ...] at each step.  An edit that depends on the position must know where the call starts: one with
a true ``positional`` attribute (as :class:`Steer`) is called ``edit(tensor, start)``, ``start`` the absolute
position of the tensor's first slot; any other edit is called ``edit(tensor)`` and acts alike on every token.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mambascope.arch import adapter
from mambascope.arch.base import DecodeCache, UnsupportedFeature
from mambascope.trace.forward import Edit, check_inputs, trace_stream

# families whose every part (Mamba-1 / Mamba-2 mixer, attention, MLP) reads and updates the decoding cache
FAMILIES = ("mamba", "mamba2", "gpt2", "bamba")
MODES = ("add", "set")
MAX_NEW_TOKENS = 4096


@dataclass(frozen=True, eq=False)
class Steer:
    """Activation steering of one unit along ``direction`` [d] (the unit's last axis), at chosen positions.

    ``mode="add"``: x + scale·direction (Turner et al. 2023's activation addition; for a feature, the
    decoder row W_dec[i]).  ``mode="set"``: the component of x along the unit-norm direction is set to
    ``scale``, x + (scale − x·d̂)·d̂; for a basis vector e_n this clamps neuron n to ``scale``.
    ``positions``: [start, stop) ranges of absolute positions (stop None = to the end), None = every position.
    """

    direction: torch.Tensor
    scale: float
    positions: tuple[tuple[int, int | None], ...] | None = None
    mode: str = "add"
    positional = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not math.isfinite(self.scale):
            raise ValueError(f"scale must be finite, got {self.scale}")
        if self.direction.dim() != 1 or not bool(torch.isfinite(self.direction).all()):
            raise ValueError("the steering direction must be a finite vector [d]")
        if self.mode == "set" and not bool(self.direction.any()):
            raise ValueError("mode 'set' needs a non-zero direction")

    def __call__(self, tensor: torch.Tensor, start: int = 0) -> torch.Tensor:
        d = self.direction.to(tensor.device, tensor.dtype)
        if self.mode == "add":
            steered = tensor + self.scale * d
        else:
            unit = d / d.norm()
            steered = tensor + (self.scale - tensor @ unit)[..., None] * unit
        if self.positions is None:
            return steered
        pos = torch.arange(start, start + tensor.shape[1], device=tensor.device)
        keep = torch.zeros_like(pos, dtype=torch.bool)
        for lo, hi in self.positions:
            keep |= (pos >= lo) & (pos < hi) if hi is not None else pos >= lo
        return torch.where(keep.view(1, -1, *[1] * (tensor.dim() - 2)), steered, tensor)


def neuron_direction(width: int, index: int) -> torch.Tensor:
    """e_index [width], the basis direction of one neuron."""
    return torch.zeros(width).index_fill_(0, torch.tensor([index]), 1.0)


def neuron_steering(model: nn.Module, layer: int, neuron: int) -> tuple[str, torch.Tensor]:
    """(hook name, e_neuron) of neuron ``neuron`` of ``layer``'s neuron unit (``blocks.L.mixer.hook_post``, or
    ``blocks.L.mlp.hook_post`` on a transformer layer).  ValueError / IndexError in one line for a layer that is
    not the model's or has no neurons, and for a neuron out of range."""
    ad = adapter(model)
    ad.check_layer(layer)
    unit = ad.neuron_unit(layer)
    if unit is None:
        raise ValueError(f"layer {layer} is attention-only; it has no neurons")
    width = ad.neuron_write_weights(layer).shape[1]
    if not 0 <= neuron < width:
        raise IndexError(f"neuron {neuron}: layer {layer} has neurons 0..{width - 1}")
    return f"blocks.{layer}.{unit}", neuron_direction(width, neuron)


def steered_pair(model: nn.Module, ids: torch.Tensor, hook: str, edit: Edit, max_new_tokens: int,
                 **settings) -> dict[str, torch.Tensor]:
    """``{"unsteered", "steered"}``: the new tokens [b, max_new_tokens] of :func:`generate` from ``ids``
    without and with ``edit`` at ``hook``, with the same ``settings`` (do_sample, temperature, top_k, seed),
    so that the two continuations differ by the edit only (``mambascope steer`` and the explorer's panel)."""
    runs = {"unsteered": generate(model, ids, max_new_tokens, **settings),
            "steered": generate(model, ids, max_new_tokens, edits={hook: edit}, **settings)}
    return {name: tokens[:, ids.shape[-1]:] for name, tokens in runs.items()}


def _edits_at(edits: Mapping[str, Edit], start: int) -> dict[str, Edit]:
    """The edits for a call whose first token is at absolute position ``start`` (see the module docstring)."""
    def bind(edit):
        return (lambda t: edit(t, start)) if getattr(edit, "positional", False) else edit
    return {name: bind(edit) for name, edit in edits.items()}


def _next_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """[b] from the last position's logits [b, V]: argmax, or a draw from softmax(logits / T) over the top k."""
    if not do_sample:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -torch.inf)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]


def check_generate(model: nn.Module, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                   prompt_length: int = 0) -> None:
    """Raise ``UnsupportedFeature`` for a family the decoding cache does not cover, ``ValueError`` for bad settings."""
    ad = adapter(model)
    if ad.model_type not in FAMILIES:
        raise UnsupportedFeature(f"generate does not support the {ad.model_type} family yet (supported: "
                                 f"{', '.join(FAMILIES)})")
    integer = isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool)
    if not integer or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS}, got {max_new_tokens!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if ad.max_length is not None and prompt_length + max_new_tokens > ad.max_length:
        raise ValueError(f"{prompt_length} prompt tokens + {max_new_tokens} new exceed the model's maximum length "
                         f"{ad.max_length}")


@torch.no_grad()
def generate(
    model: nn.Module,
    ids: torch.Tensor,
    max_new_tokens: int,
    *,
    edits: Mapping[str, Edit] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    attention_mask: torch.Tensor | None = None,
    return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode ``max_new_tokens`` tokens after ``ids`` [b, L] through the traced forward, ``edits`` applied
    at the prefill and at every step (full hook name -> edit; see the module docstring for what an edit sees).

    Greedy (argmax) unless ``do_sample``: then softmax(logits / ``temperature``) over the ``top_k`` best
    tokens, drawn with a generator seeded by ``seed``.  No early stop at an end-of-sequence token.
    ``attention_mask`` [b, L]: left padding of the prompt, for SSM-only models (an attention layer's cache
    keeps no padding mask, so a padded batch is refused there).
    Returns the tokens [b, L + max_new_tokens], and with ``return_logits`` also the logits [b, new, V]
    that each new token was chosen from.
    """
    check_generate(model, max_new_tokens, temperature, top_k, ids.shape[-1] if ids.dim() == 2 else 0)
    check_inputs(model, ids, attention_mask)
    ad = adapter(model)
    padded = attention_mask is not None and not bool(attention_mask.all())
    if padded and any(ad.layer_kind(layer) not in ("mamba", "mamba2") for layer in range(ad.n_layers)):
        raise UnsupportedFeature(f"generate with a padded attention_mask on {ad.model_type}: the attention cache "
                                 "keeps no padding mask; generate each prompt unpadded")
    edits = dict(edits or {})
    device = model.get_input_embeddings().weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    cache = DecodeCache()
    tokens, step, chosen = ids.to(device), ids.to(device), []
    for _ in range(max_new_tokens):
        logits = trace_stream(model, step, None, attention_mask=attention_mask if cache.offset == 0 else None,
                              edits=_edits_at(edits, cache.offset), cache=cache)
        cache.offset += step.shape[1]
        last = logits[:, -1]
        chosen.append(last)
        step = _next_token(last, do_sample, temperature, top_k, generator)[:, None].to(device)
        tokens = torch.cat([tokens, step], dim=1)
    return (tokens, torch.stack(chosen, dim=1)) if return_logits else tokens


def dictionary_direction(directory: str | Path, index: int) -> tuple[str, torch.Tensor]:
    """(hook name, decoder row W_dec[index]) of a sparse dictionary saved in the SAELens format: ``cfg.json``
    and ``sae_weights.safetensors`` (``W_dec`` [d_sae, d_out]); only that row is read.  The decoder writes at
    ``hook_name`` for an SAE, at ``hook_name_out`` for a transcoder (which reads ``hook_name``).
    ``ValueError`` / ``FileNotFoundError`` naming the file for anything else."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    cfg_path, weights = directory / "cfg.json", directory / "sae_weights.safetensors"
    for path in (cfg_path, weights):
        if not path.is_file():
            raise FileNotFoundError(f"--feature: no {path.name} in {directory} (a SAELens-format dictionary)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--feature: {cfg_path} is not JSON ({exc})") from None
    hook = cfg.get("hook_name_out", cfg.get("hook_name")) if isinstance(cfg, dict) else None
    if not isinstance(hook, str) or not hook:
        raise ValueError(f"--feature: {cfg_path} has no hook_name (nor hook_name_out)")
    try:
        with safe_open(str(weights), framework="pt") as f:
            names = f.keys()
            if "W_dec" not in names:
                raise ValueError(f"--feature: {weights} has no W_dec")
            rows = f.get_slice("W_dec")
            shape = rows.get_shape()
            if len(shape) != 2:
                raise ValueError(f"--feature: W_dec in {weights} is {shape}, not [d_sae, d_out]")
            if not 0 <= index < shape[0]:
                raise IndexError(f"--feature: feature {index} out of range: the dictionary has features "
                                 f"0..{shape[0] - 1}")
            return hook, rows[index].float()
    except SafetensorError as exc:
        raise ValueError(f"--feature: {weights} is not a safetensors file ({exc})") from None


def parse_positions(text: str, name: str = "--positions") -> tuple[tuple[int, int | None], ...]:
    """``"3,5:8,10:"`` -> ((3, 4), (5, 8), (10, None)): absolute positions, ranges [start, stop).
    ``name``: the flag or field that errors are about."""
    ranges = []
    for item in text.split(","):
        item = item.strip()
        lo, sep, hi = item.partition(":")
        try:
            start = int(lo)
            stop = (int(hi) if hi.strip() else None) if sep else start + 1
        except ValueError:
            raise ValueError(f"{name}: {item!r} is not N, A:B or A:") from None
        if start < 0 or (stop is not None and stop <= start):
            raise ValueError(f"{name}: {item!r} is not a non-empty range of non-negative positions")
        ranges.append((start, stop))
    return tuple(ranges)


__all__ = ["FAMILIES", "MODES", "Steer", "check_generate", "dictionary_direction", "generate", "neuron_direction",
           "neuron_steering", "parse_positions", "steered_pair"]
