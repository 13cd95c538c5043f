"""One batch of traced neuron activations, as every neuron accumulator consumes it (docs/design.md §3, §5).

The accumulators in this package (update / merge / finalize) never see the model: they read a
:class:`NeuronBatch` built from the tracer's per-layer mapping with :meth:`NeuronBatch.from_layer`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from mambascope.trace.names import NEURON_UNIT

# The neuron kinds a census reads (``mambascope.arch.Adapter.neuron_kind``): Mamba mixers, a plain MLP
# ("gpt2": post = act(pre)), a gated MLP ("gated_mlp": post = act(gate) · up); and "feature": a sparse
# dictionary's latents (``features.census``: post = z, active ⇔ z > 0, no Δ).
ARCHS = ("mamba", "mamba2", "gpt2", "gated_mlp", "feature")
RULES = ("gate", "magnitude")

# Unit whose sign decides whether a Mamba neuron is active: the gate z (docs/design.md §3).
GATE_UNIT = "mixer.hook_gate_pre"
DT_UNIT = "mixer.hook_dt"

LayerLabel = str | int | None


class NonFiniteError(ValueError):
    """A NaN or Inf in the activations (``post``) or in Δ; the message names layer, row and position."""


class EmptyAccumulatorError(RuntimeError):
    """``finalize()`` on an accumulator that has not seen a single valid token."""


def layer_name(layer: LayerLabel) -> str:
    return f"layer {layer}" if layer is not None else "unnamed layer"


def check_finite(x: Tensor, valid: Tensor, what: str, layer: LayerLabel) -> None:
    """Raise :class:`NonFiniteError` at the first (row, position) where ``x`` [b,L,C] is NaN/Inf on a valid token.

    Only valid tokens are checked: padding and excluded tokens never enter a statistic (every
    accumulator selects ``x[valid]``), so a non-finite value there cannot corrupt a result.
    A finite sum of all of ``x`` proves every value finite (a NaN or ±Inf anywhere makes it non-finite) in
    one cheap reduction; only otherwise (or when the float32 sum overflows) are the valid tokens searched.
    """
    if bool(torch.isfinite(x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32))):
        return
    bad_token = (~torch.isfinite(x)).any(-1) & valid
    if bool(bad_token.any()):
        row, pos = (int(i) for i in bad_token.nonzero()[0])  # nonzero is row-major: the first bad value
        channel = int((~torch.isfinite(x[row, pos])).nonzero()[0, 0])
        value = float(x[row, pos, channel])
        raise NonFiniteError(
            f"{what} of {layer_name(layer)} is {value} (not finite) at batch row {row}, position {pos}, "
            f"channel {channel}; neuron statistics need finite activations (check the model's dtype "
            "for overflow)"
        )


@dataclass
class NeuronBatch:
    """Activations of one layer's neurons on one batch of token windows.

    Shapes: ``post`` [b,L,E] float, the neuron unit (Mamba ``mixer.hook_post`` = y ⊙ SiLU(z), the
    input of out_proj; GPT-2 ``mlp.hook_post``); ``active`` [b,L,E] bool; ``token_ids`` [b,L] long;
    ``positions`` [b,L] long, the 0-based position within the window; ``valid`` [b,L] bool, False for
    padding and excluded tokens (BOS), which no statistic ever counts; ``dt`` [b,L,C] float or None,
    Δ with C = E (Mamba-1) or C = heads (Mamba-2), None for GPT-2. ``layer`` labels error messages.

    Construction validates shapes, dtypes and devices, and raises :class:`NonFiniteError` naming
    the layer and the (batch row, position) of the first NaN/Inf of ``post`` or ``dt`` on a valid token.
    """

    post: Tensor
    active: Tensor
    token_ids: Tensor
    positions: Tensor
    valid: Tensor
    dt: Tensor | None = None
    layer: LayerLabel = None
    window_ids: Tensor | None = None

    def __post_init__(self) -> None:
        where = layer_name(self.layer)
        if self.post.dim() != 3 or not self.post.is_floating_point():
            raise ValueError(f"{where}: post must be a float tensor [batch, pos, neurons], got "
                             f"{self.post.dtype} {tuple(self.post.shape)}")
        b, L, _ = self.post.shape
        if self.active.shape != self.post.shape or self.active.dtype != torch.bool:
            raise ValueError(f"{where}: active must be a bool tensor of post's shape {tuple(self.post.shape)}, "
                             f"got {self.active.dtype} {tuple(self.active.shape)}")
        for name in ("token_ids", "positions", "valid"):
            t = getattr(self, name)
            if t.shape != (b, L):
                raise ValueError(f"{where}: {name} must have shape [batch, pos] = {(b, L)}, got {tuple(t.shape)}")
        for name in ("token_ids", "positions"):
            t = getattr(self, name)
            if t.is_floating_point() or t.dtype == torch.bool:
                raise ValueError(f"{where}: {name} must be an integer tensor, got {t.dtype}")
            setattr(self, name, t.long())
        if self.valid.dtype != torch.bool:
            raise ValueError(f"{where}: valid must be a bool tensor, got {self.valid.dtype}")
        if self.dt is not None and (self.dt.dim() != 3 or self.dt.shape[:2] != (b, L)
                                    or not self.dt.is_floating_point()):
            raise ValueError(f"{where}: dt must be a float tensor [batch, pos, channels] with batch, pos = "
                             f"{(b, L)}, got {self.dt.dtype} {tuple(self.dt.shape)}")
        if self.window_ids is not None and self.window_ids.shape != (b,):
            raise ValueError(f"{where}: window_ids must have shape [batch] = {(b,)}, "
                             f"got {tuple(self.window_ids.shape)}")
        tensors = [self.post, self.active, self.token_ids, self.positions, self.valid]
        if self.dt is not None:
            tensors.append(self.dt)
        if len({t.device for t in tensors}) != 1:
            raise ValueError(f"{where}: all tensors of a NeuronBatch must be on one device, got "
                             f"{sorted({str(t.device) for t in tensors})}")
        check_finite(self.post, self.valid, "post (the neuron activation)", self.layer)
        if self.dt is not None:
            check_finite(self.dt, self.valid, "Δ (dt)", self.layer)

    # -- per-batch intermediates shared by the accumulators ------------------------------------------------
    # Computed once on first use (after construction, so the accumulators' re-checks see in-place edits
    # made before the first update) instead of once per accumulator.  Rows are picked with index_select /
    # index_fill_ on the flat [b·L, E] view: on CPU several times faster than boolean-mask indexing.
    @cached_property
    def valid_rows(self) -> Tensor:
        """[n] indices of the valid tokens in the flattened [b·L] batch, ascending (row-major)."""
        return self.valid.reshape(-1).nonzero().flatten()

    @cached_property
    def invalid_rows(self) -> Tensor:
        """[b·L − n] indices of the other token slots."""
        return (~self.valid).reshape(-1).nonzero().flatten()

    def valid_of(self, x: Tensor) -> Tensor:
        """[n, C] rows of ``x`` [b, L, C] at the valid tokens (a view when every token is valid)."""
        flat = x.reshape(-1, x.shape[-1])
        return flat if self.invalid_rows.numel() == 0 else flat.index_select(0, self.valid_rows)

    @cached_property
    def valid_post(self) -> Tensor:
        """[n, E] float64: ``post`` on the n valid tokens (row-major), float64 so sums do not depend on batching."""
        return self.valid_of(self.post).to(torch.float64)

    @cached_property
    def valid_active(self) -> Tensor:
        """[n, E] bool: ``active`` on the valid tokens."""
        return self.valid_of(self.active)

    @cached_property
    def active_on_valid(self) -> Tensor:
        """[b·L, E] float32, 1 where ``active`` and ``valid`` (float: CPU sums and ``index_add_`` of float are
        several times faster than of bool or int, and exact for counts below 2²⁴)."""
        return self.active.reshape(-1, self.n_neurons).to(torch.float32).index_fill_(0, self.invalid_rows, 0.0)

    @cached_property
    def valid_post_sum(self) -> Tensor:
        """[E] float64: Σ post over the valid tokens; non-finite exactly when a valid token's post is NaN/Inf."""
        return self.valid_post.sum(0)

    @property
    def n_neurons(self) -> int:
        return self.post.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.post.device

    @classmethod
    def from_layer(
        cls,
        layer: Mapping[str, Tensor],
        arch: str,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        bos_token_id: int | None = None,
        rule: str = "gate",
        eps: float = 0.0,
        label: LayerLabel = None,
        window_ids: Tensor | None = None,
    ) -> NeuronBatch:
        """Build a batch from one layer of a trace: ``layer`` maps unit names without ``blocks.{l}.``.

        ``post`` = ``layer[NEURON_UNIT[arch]]`` [b,L,E]. Activity rule (docs/design.md §3):

        - ``rule="gate"``: Mamba (``"mamba"``, ``"mamba2"``) active ⇔ ``mixer.hook_gate_pre`` z > 0,
          i.e. the gate SiLU(z) is open, the analogue of ReLU > 0 in OPT (Voita et al. 2023).
          GPT-2 active ⇔ ``mlp.hook_post`` > 0: GELU(x) > 0 exactly when x > 0, so this is the same
          "pre-activation positive" rule (GELU's small negative outputs for x < 0 count as inactive).
        - ``rule="magnitude"``: active ⇔ |post| > ``eps`` (any architecture).

        ``dt`` = ``layer["mixer.hook_dt"]`` on Mamba when present (None when not traced, and on GPT-2).
        ``input_ids`` [b,L]; ``attention_mask`` [b,L] (1 = token, 0 = padding; None = no padding).
        ``positions`` = cumsum(attention_mask) − 1 along the row: the index counted from the first
        non-pad token, so left padding shifts it (pad slots get 0 and are invalid anyway).
        ``valid`` = attention_mask & (input_ids != bos_token_id): BOS is excluded from every statistic
        but keeps its position (the first real token then sits at position 1).
        ``label`` names the layer in error messages.  ``window_ids`` [b]: the rows' indices in the corpus's
        windows, for statistics that point back at contexts (top activations).
        """
        if arch not in ARCHS:
            raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHS}")
        if rule not in RULES:
            raise ValueError(f"unknown activity rule {rule!r}; expected one of {RULES}")
        if not (eps >= 0.0 and eps < float("inf")):
            raise ValueError(f"eps must be a finite number >= 0, got {eps}")
        if rule == "gate" and eps != 0.0:
            raise ValueError("eps applies only to rule='magnitude'; the gate rule has no threshold")
        where = layer_name(label)
        post_unit = NEURON_UNIT[arch]
        if post_unit not in layer:
            raise KeyError(f"{where}: the trace has no {post_unit!r} (the neuron unit of {arch}); "
                           f"it has {sorted(layer)}")
        post = layer[post_unit]
        if rule == "magnitude":
            active = post.abs() > eps
        elif arch == "gpt2":
            active = post > 0
        elif arch == "gated_mlp":
            # act(gate) > 0 ⇔ gate > 0 for SiLU and GELU gates: the gate is open, as for Mamba's z
            if "mlp.hook_pre" not in layer:
                raise KeyError(f"{where}: the gate rule needs 'mlp.hook_pre' in the trace; it has {sorted(layer)}")
            active = layer["mlp.hook_pre"] > 0
        else:
            if GATE_UNIT not in layer:
                raise KeyError(f"{where}: the gate rule needs {GATE_UNIT!r} in the trace; it has {sorted(layer)}")
            active = layer[GATE_UNIT] > 0
        dt = layer.get(DT_UNIT) if arch in ("mamba", "mamba2") else None
        if input_ids.shape != post.shape[:2]:
            raise ValueError(f"{where}: input_ids shape {tuple(input_ids.shape)} does not match the "
                             f"activations' [batch, pos] = {tuple(post.shape[:2])}")
        input_ids = input_ids.to(post.device)
        if attention_mask is None:
            mask = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"{where}: attention_mask shape {tuple(attention_mask.shape)} != "
                                 f"input_ids shape {tuple(input_ids.shape)}")
            mask = attention_mask.to(post.device).bool()
        positions = (mask.long().cumsum(1) - 1).clamp_min(0)
        valid = mask if bos_token_id is None else mask & (input_ids != bos_token_id)
        return cls(post=post, active=active, token_ids=input_ids.long(), positions=positions,
                   valid=valid, dt=dt, layer=label,
                   window_ids=None if window_ids is None else window_ids.to(post.device).long())
