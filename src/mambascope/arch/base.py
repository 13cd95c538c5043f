"""The interface every architecture adapter implements (docs/design.md §10).

An adapter is the only code that knows a Hugging Face family's module internals.  It says which parts
each layer has (an SSM mixer, attention, an MLP), runs one layer with ``emit`` so every internal unit
can be read or edited, and hands out the parameters analyses need (the mixer's A, D, conv, out_proj;
the neuron's write weights; the unembedding).  Adding a family is one module subclassing
:class:`Adapter` plus one line in ``mambascope.arch.ADAPTERS``.

The layout follows TransformerLens's split between a model-agnostic hooked forward and per-family
adapters, but the forward here re-runs the family's own modules instead of converting weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch
from torch import nn

from mambascope.arch.lrp_mode import normalize
from mambascope.arch.units import STATE_SHAPES, STATE_UNIT, layer_units
from mambascope.ssm.knockout import Knockout
from mambascope.ssm.params import MixerParams


class Emit(Protocol):
    """How a layer hands its units to the tracer (``mambascope.trace.forward``).

    ``emit(unit, tensor)`` records a unit [b, L, ...] and returns it, possibly edited; the forward
    continues with what it returns.  ``state_positions``: the sorted positions after which this layer's
    SSM state is wanted or edited, None when it is neither (then the scan runs unsegmented);
    ``state(unit, k, h)`` hands over the state after the k-th of them and returns the state the scan
    continues from.  ``knockouts``: the layer's scan knockouts (``mambascope.ssm.knockout.Knockout``), whose
    terms the mixer subtracts from the scan output before emitting ``mixer.hook_y``; empty for none.
    """

    state_positions: tuple[int, ...] | None
    knockouts: tuple[Knockout, ...]

    def __call__(self, unit: str, tensor: torch.Tensor) -> torch.Tensor: ...

    def state(self, unit: str, k: int, tensor: torch.Tensor) -> torch.Tensor: ...
SSM_PARTS = ("mamba", "mamba2")
MOE_PARTS = ("moe", "gated_moe", "gated_moe_shared")
MLP_PARTS = ("mlp", "gated_mlp", *MOE_PARTS)


class UnsupportedFeature(ValueError):
    """A model uses a feature the tracer does not reproduce; the message names the feature."""


@dataclass
class DecodeCache:
    """The recurrent state that lets a decoding step run on one new token (``mambascope.generate``).

    ``offset``: the absolute position of the first token of the current call (0 at the prefill, the number
    of tokens seen before at a step); ``parts[module]``: the state of one mixer or attention module, filled
    at the prefill and updated at every step by the part's code in ``arch/parts.py``: ``"conv"`` the last
    d_conv-1 inputs of the conv [b, d_conv-1, C], ``"ssm"`` the SSM state after the last token, ``"k"``,
    ``"v"`` the attention keys and values so far [b, t, H_kv, dh].
    """

    offset: int = 0
    parts: dict[nn.Module, dict[str, torch.Tensor]] = field(default_factory=dict)


@dataclass
class Context:
    """What every layer of one forward pass shares.

    ``mask`` [b, L] of 0/1, None when nothing is padded; ``need_pattern``: layers whose softmax
    pattern is requested (computed explicitly there, fused elsewhere); ``extra``: per-family state
    computed once per pass (rotary tables, the original embeddings of Zamba2's shared blocks);
    ``cache``: the decoding state while generating (None for an ordinary forward).
    """

    mask: torch.Tensor | None
    need_pattern: frozenset[int]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    cache: DecodeCache | None = None

    def part_cache(self, part: nn.Module) -> dict[str, torch.Tensor] | None:
        """The decoding state of a mixer or attention module (see :class:`DecodeCache`), None outside generation."""
        return None if self.cache is None else self.cache.parts.setdefault(part, {})

    @property
    def offset(self) -> int:
        """Absolute position of this call's first token (0 outside generation)."""
        return 0 if self.cache is None else self.cache.offset


def module_device(module: nn.Module, default: torch.device) -> torch.device:
    """The device of a module's weights (``default`` for a module without any)."""
    weight = next(module.parameters(), None)
    return default if weight is None else weight.device


class Adapter:
    """One Hugging Face family of causal LMs, seen by the tracer.  Subclasses set ``model_type``
    (``config.model_type``) and ``hf_class``, and implement the methods that raise NotImplementedError."""

    model_type: ClassVar[str]
    hf_class: ClassVar[str]
    # a pure transformer (every layer attention + MLP): its attention neurons are heads, not SSM channels
    transformer: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self.check_supported()

    # ---- structure -------------------------------------------------------------------------------
    def check_supported(self) -> None:
        """Raise :class:`UnsupportedFeature` naming any configured feature the trace would get wrong."""

    def blocks(self) -> nn.ModuleList:
        """The decoder layers; ``model.model.layers`` in most Hugging Face families."""
        return self.model.model.layers

    def require_silu(self, act: str, family: str, mixer: str, option: str = "hidden_act") -> None:
        """The mixer math (and hidden attention) applies SiLU after the conv; refuse another activation by name."""
        if act != "silu":
            raise UnsupportedFeature(f"{family} with {option}={act!r}: the {mixer} mixer is traced with SiLU "
                                     "after the conv only")

    @property
    def n_layers(self) -> int:
        return len(self.blocks())

    def parts(self, layer: int) -> tuple[str, ...]:
        """The layer's parts in forward order: ``"mamba"``, ``"mamba2"``, ``"attn"``, ``"mlp"``, ``"gated_mlp"``,
        ``"moe"``, ``"gated_moe"``, ``"gated_moe_shared"`` (units in ``mambascope.arch.units.PART_UNITS``)."""
        raise NotImplementedError

    @property
    def parallel(self) -> bool:
        """Whether a layer's parts all read ``hook_resid_pre`` (GPT-NeoX's parallel residual)."""
        return False

    def units(self, layer: int) -> dict[str, str]:
        """unit -> shape of every traced unit of ``layer``."""
        return layer_units(self.parts(layer), self.parallel)

    def state_units(self, layer: int) -> dict[str, str]:
        """``{"mixer.hook_ssm_state": shape}`` on an SSM layer, else empty: the state after chosen positions,
        traced only when positions are asked for (``trace(..., state_positions=...)``)."""
        kind = self.layer_kind(layer)
        return {STATE_UNIT: STATE_SHAPES[kind]} if kind in STATE_SHAPES else {}

    def layer_kind(self, layer: int) -> str:
        """``"mamba"``, ``"mamba2"`` (SSM layers, with or without an MLP after the mixer), ``"attention"``,
        ``"mlp"`` or ``"moe"``: what per-layer tables show."""
        parts = self.parts(layer)
        ssm = [p for p in parts if p in SSM_PARTS]
        if ssm:
            return ssm[0]
        if "attn" in parts:
            return "attention"
        return "moe" if any(p in MOE_PARTS for p in parts) else "mlp"

    def ssm_layers(self) -> list[int]:
        return [layer for layer in range(self.n_layers) if self.layer_kind(layer) in SSM_PARTS]

    def neuron_unit(self, layer: int) -> str | None:
        """The unit analysed as the layer's neurons: the SSM mixer's ``post`` where the layer has a mixer,
        else the MLP's ``post`` (input of the down projection; [b, L, X, F] on MoE layers, zero where a
        token is not routed to the expert), None for an attention-only layer."""
        parts = self.parts(layer)
        if any(p in SSM_PARTS for p in parts):
            return "mixer.hook_post"
        if any(p in MLP_PARTS for p in parts):
            return "mlp.hook_post"
        return None

    def neuron_kind(self, layer: int) -> str | None:
        """How the census reads the layer's neurons (``mambascope.neurons.NeuronBatch``): ``"mamba"`` /
        ``"mamba2"`` (the mixer's post, active ⇔ gate z > 0, with Δ); ``"gpt2"`` (a plain MLP's post
        act(pre): active ⇔ post > 0, i.e. pre > 0 for GELU, ReLU, ReLU², SiLU); ``"gated_mlp"``
        (act(gate)·up: active ⇔ gate pre-activation > 0); ``"moe"`` / ``"gated_moe"`` (routed experts of
        plain / gated MLPs); None when the layer has no neurons (attention only)."""
        parts = self.parts(layer)
        for part in parts:
            if part in SSM_PARTS:
                return part
        for part, kind in (("mlp", "gpt2"), ("gated_mlp", "gated_mlp")):
            if part in parts:
                return kind
        return self.moe_kind(layer)

    def moe_kind(self, layer: int) -> str | None:
        """``"moe"`` (plain experts), ``"gated_moe"`` (act(gate)·up experts) or None: the layer's routed experts."""
        parts = self.parts(layer)
        if "moe" in parts:
            return "moe"
        return "gated_moe" if any(p in MOE_PARTS for p in parts) else None

    @property
    def max_length(self) -> int | None:
        """Longest sequence the model accepts (learned position embeddings), None when unbounded."""
        return None

    # ---- forward ---------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, ctx: Context) -> torch.Tensor:
        """The residual stream before layer 0 [b, L, D]; may fill ``ctx.extra``."""
        raise NotImplementedError

    def run_block(self, layer: int, h: torch.Tensor, ctx: Context, emit: Emit) -> torch.Tensor:
        """Layer ``layer`` on the residual stream h [b, L, D], emitting its units; returns the new stream."""
        raise NotImplementedError

    def on_block_device(self, layer: int, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        """h (and the context's tensors) on the device of layer ``layer``'s weights, where a ``device_map``
        (accelerate) may have put it; nothing moves when all layers share one device."""
        device = module_device(self.blocks()[layer], h.device)
        if h.device != device:
            ctx.mask = None if ctx.mask is None else ctx.mask.to(device)
            ctx.extra = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in ctx.extra.items()}
        return h.to(device)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and unembedding of the last residual stream -> [b, L, V] (each on its module's device)."""
        norm, head = self.final_norm(), self.model.get_output_embeddings()
        x = normalize(norm, h.to(module_device(norm, h.device)))
        return head(x.to(module_device(head, x.device)))

    # ---- parameters ------------------------------------------------------------------------------
    def mixer(self, layer: int) -> nn.Module:
        """The SSM mixer module of an SSM layer."""
        raise NotImplementedError

    def out_projs(self, layer: int) -> dict[str, nn.Module]:
        """unit -> the linear map that unit is the input of, for each part of the layer:
        ``mixer.hook_post`` -> out_proj, ``mlp.hook_post`` -> down projection, ``attn.hook_z`` -> o_proj."""
        raise NotImplementedError

    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range: the model has layers 0..{self.n_layers - 1}")

    def mixer_params(self, layer: int) -> MixerParams:
        """The mixer parameters of an SSM layer as plain tensors."""
        self.check_layer(layer)
        kind = self.layer_kind(layer)
        if kind not in SSM_PARTS:
            raise ValueError(f"layer {layer} of this {self.model_type} model is a {kind} layer; mixer "
                             f"parameters exist on its SSM layers {self.ssm_layers()}")
        mixer = self.mixer(layer)
        A = -torch.exp(mixer.A_log.detach().float())
        conv_w = mixer.conv1d.weight.detach()[:, 0, :]
        conv_b = mixer.conv1d.bias.detach() if mixer.conv1d.bias is not None else None
        E = mixer.intermediate_size
        if kind == "mamba":
            return MixerParams(
                kind, A, mixer.D.detach(), conv_w, conv_b, mixer.out_proj.weight.detach(),
                d_inner=E, d_state=mixer.ssm_state_size, n_heads=E, head_dim=1, n_groups=1,
            )
        # a mixer without a gated norm (Falcon-H1's default: an nn.Identity) gates y ⊙ SiLU(z)
        norm_weight = getattr(mixer.norm, "weight", None)
        return MixerParams(
            kind, A, mixer.D.detach(), conv_w[:E], None if conv_b is None else conv_b[:E],
            mixer.out_proj.weight.detach(), d_inner=E, d_state=mixer.ssm_state_size, n_heads=mixer.num_heads,
            head_dim=mixer.head_dim, n_groups=mixer.n_groups,
            norm_weight=None if norm_weight is None else norm_weight.detach(),
            norm_eps=getattr(mixer.norm, "variance_epsilon", 0.0),
        )

    def neuron_write_weights(self, layer: int) -> torch.Tensor:
        """[d_model, E]: column e is what neuron e writes into the residual stream per unit of activation."""
        self.check_layer(layer)
        if self.neuron_unit(layer) is None:
            raise ValueError(f"layer {layer} of this {self.model_type} model is attention-only: it has no neurons")
        return self.out_projs(layer)[self.neuron_unit(layer)].weight.detach()

    def head_write_weights(self, layer: int) -> torch.Tensor:
        """[H, d_head, d_model]: W_O of each attention head, so that
        hook_attn_out[t] = Σ_h z[t, h] · W_O[h] (+ the projection's bias)."""
        self.check_layer(layer)
        if "attn" not in self.parts(layer):
            raise ValueError(f"layer {layer} of this {self.model_type} model is a {self.layer_kind(layer)} layer: "
                             "it has no attention heads")
        W = self.out_projs(layer)["attn.hook_z"].weight.detach()  # nn.Linear: [d_model, H·dh]
        heads = self.n_heads(layer)
        return W.T.reshape(heads, -1, W.shape[0])

    def n_heads(self, layer: int) -> int:
        return self.config.num_attention_heads

    def unembedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(final norm weight [d_model], unembedding W_U [V, d_model]) for direct logit effects."""
        return self.final_norm().weight.detach(), self.model.get_output_embeddings().weight.detach()
