"""Implicit attention of the whole Mamba mixer, its ablations, layer-level token maps and their rollout.

**Operator** (Zimerman, Ali & Wolf 2024, "Explaining Modern Gated-Linear RNNs via a Unified Implicit
Attention Formulation"): per channel e (Mamba-1; on Mamba-2 the hidden attention α is per head h = e // P
and the diagonals per channel), the mixer is a data-controlled linear map from the in_proj x-branch x
(``mixer.hook_x``) to the input of out_proj (``mixer.hook_post``):

    Ω_e = diag(g_e) · α_e · diag(σ(c_e) ⊙ m) · T_e,        post[:, e] = Ω_e · x[:, e] + extra[:, e]

with T_e the causal depthwise conv as a banded Toeplitz matrix (T[s, j] = w_e[K−1−(s−j)] for 0 ≤ s−j < K),
c = ``mixer.hook_conv``, SiLU(c)/c = σ(c) the activation read as a data-dependent diagonal, m the padding
mask (padded key columns of Ω are zero), α the S6 / SSD hidden attention (Ali et al. 2024;
``ssm/hidden_attention.py``) without D, and g the output gate: SiLU(z) on Mamba-1,
norm_weight·SiLU(z)·rsqrt(mean_group((y·SiLU z)²) + ε) on Mamba-2 (the gated RMSNorm's per-token scale read
as a diagonal, :func:`~mambascope.ssm.hidden_attention.output_gate`).
The stated extra term holds what is not a token-to-token interaction: the D skip and the conv bias β,

    extra_e = g_e ⊙ (D_e·u_e + α_e · (σ(c_e) ⊙ m · β_e)),   u = SiLU(c)·m = ``mixer.hook_ssm_input``.

**Ablations** (approximations by definition, as in the paper): ``no_conv`` T = I (the conv read as the
identity, so the operator maps conv outputs at the same positions), ``no_gate`` g = 1, ``no_act`` σ(c) = 1.

**Layer map**: the contribution of token j to the mixer's output at token i is the out_proj-projected term
T_i(x_j) = W_out · (Ω[:, i, j] ⊙ x[j, :]) ∈ R^d_model, so that Σ_j T_i(x_j) + W_out·extra_i is out_proj's
output (its bias aside); the map is c[i, j] = ‖T_i(x_j)‖₂ (the norm-based aggregation of LaTIM, Pitorro &
Treviso 2025, over every channel at once; their ALTI-style distance variant is not implemented).
Attention layers get the same definition (Kobayashi et al. 2020): c[i, j] = ‖Σ_h A_h[i, j]·v_{j,h}·W_O^h‖₂.

**Rollout** through the residual stream: R = Ã_{n−1} ⋯ Ã_0 with Ã = rownorm(I + rownorm(c)) (each row
normalised to sum 1, so the residual keeps half of each token), as attention rollout (Abnar & Zuidema 2020).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mambascope.ssm.hidden_attention import (
    block_bias,
    conv_toeplitz_right,
    hidden_attention,
    need_units,
    output_gate,
)
from mambascope.ssm.params import MixerParams

VARIANTS = ("full", "no_conv", "no_gate", "no_act")
# working memory of one row chunk of a layer map when the caller gives none
DEFAULT_MAP_BYTES = 1 << 28

__all__ = ["VARIANTS", "attention_token_map", "conv_toeplitz_right", "implicit_attention", "implicit_extra",
           "layer_token_map", "residual_rollout", "token_contributions"]


def _diagonals(layer: Mapping[str, Tensor], params: MixerParams, attention_mask: Tensor | None
               ) -> tuple[Tensor, Tensor]:
    """(g, σ(c)·m), both [b, L, E] in the work dtype (fp64 for fp64 tensors, else fp32)."""
    conv, y = need_units(layer, "mixer.hook_conv", "mixer.hook_y", what="implicit attention")
    wd = torch.float64 if conv.dtype == torch.float64 else torch.float32
    sig = torch.sigmoid(conv.to(wd))
    if attention_mask is not None:
        sig = sig * attention_mask.to(device=sig.device, dtype=wd)[:, :, None]
    if "mixer.hook_gate_pre" in layer:
        z = layer["mixer.hook_gate_pre"].to(wd)
        gate = z * torch.sigmoid(z)
    else:
        gate = need_units(layer, "mixer.hook_gate", what="implicit attention")[0].to(wd)
    return output_gate(y.to(wd), gate, params), sig


def _channels(params: MixerParams, channels: Sequence[int] | Tensor | None, device: torch.device) -> Tensor:
    E = params.d_inner
    idx = torch.arange(E, device=device) if channels is None else torch.as_tensor(channels, device=device).long()
    if idx.numel() == 0 or bool(((idx < 0) | (idx >= E)).any()):
        raise IndexError(f"channels must be a non-empty selection of 0..{E - 1}")
    return idx


def implicit_attention(layer: Mapping[str, Tensor], params: MixerParams, variant: str = "full", *,
                       channels: Sequence[int] | Tensor | None = None, rows: Sequence[int] | Tensor | None = None,
                       attention_mask: Tensor | None = None) -> Tensor:
    """Ω [b, c, R, L] of the chosen channels (default all E) and query rows (default all L); see the module
    docstring.  ``layer``: the traced units of the layer without ``blocks.{l}.`` (``mixer.hook_dt``,
    ``hook_B``, ``hook_C``, ``hook_conv``, ``hook_y``, ``hook_gate_pre`` or ``hook_gate``).
    ``variant``: ``full`` (exact with :func:`implicit_extra`), ``no_conv``, ``no_gate``, ``no_act``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown implicit-attention variant {variant!r}; valid: {', '.join(VARIANTS)}")
    gate, sig = _diagonals(layer, params, attention_mask)
    idx = _channels(params, channels, gate.device)
    if params.arch == "mamba":
        alpha = hidden_attention(layer, params, "s6", channels=idx, rows=rows, attention_mask=attention_mask)
    else:  # one α per head, shared by its channels
        heads, inverse = torch.unique(idx // params.head_dim, return_inverse=True)
        alpha = hidden_attention(layer, params, "s6", channels=heads, rows=rows,
                                 attention_mask=attention_mask)[:, inverse]
    row_idx = torch.arange(gate.shape[1]) if rows is None else torch.as_tensor(rows).long() % gate.shape[1]
    if variant != "no_act":
        alpha = alpha * sig[:, :, idx].transpose(1, 2).unsqueeze(2)
    if variant != "no_conv":
        alpha = conv_toeplitz_right(alpha, params.conv_weight.to(alpha)[idx])
    if attention_mask is not None:  # padded keys: zero columns (their x is zero too, so nothing is lost)
        alpha = alpha * attention_mask.to(alpha)[:, None, None, :]
    if variant != "no_gate":
        alpha = alpha * gate[:, row_idx.to(gate.device)][:, :, idx].transpose(1, 2).unsqueeze(-1)
    return alpha


def implicit_extra(layer: Mapping[str, Tensor], params: MixerParams, *,
                   attention_mask: Tensor | None = None) -> Tensor:
    """extra [b, L, E] = g ⊙ (D·u + α·(σ(c)·m·β)): the D skip and the conv-bias term, so that
    post = Ω·x + extra exactly for the ``full`` operator (module docstring)."""
    (u,) = need_units(layer, "mixer.hook_ssm_input", what="implicit attention")
    gate, sig = _diagonals(layer, params, attention_mask)
    D = params.D.to(gate)
    if params.arch == "mamba2":
        D = D.repeat_interleave(params.head_dim)
    # block_bias = g ⊙ (α + D)·(σ·m·β); the skip of the x part, g·D·(u − σ·m·β), completes g·D·u
    bias = block_bias(layer, params, attention_mask=attention_mask).transpose(1, 2)
    beta = torch.zeros_like(D) if params.conv_bias is None else params.conv_bias.to(gate)
    return bias + gate * D * (u.to(gate) - sig * beta)


def token_contributions(layer: Mapping[str, Tensor], params: MixerParams, variant: str = "full", *,
                        rows: Sequence[int] | Tensor | None = None,
                        attention_mask: Tensor | None = None) -> Tensor:
    """T [b, R, L, d_model]: T[:, i, j] = W_out·(Ω[:, i, j] ⊙ x_j), token j's term in out_proj's output at
    query i (``variant`` as :func:`implicit_attention`; ``mixer.hook_x`` needed too)."""
    (x,) = need_units(layer, "mixer.hook_x", what="implicit attention")
    omega = implicit_attention(layer, params, variant, rows=rows, attention_mask=attention_mask)
    terms = omega * x.to(omega).transpose(1, 2).unsqueeze(2)  # [b, E, R, L]
    return torch.einsum("berl,de->brld", terms, params.out_proj_weight.to(terms))


def _row_chunks(L: int, rows: Sequence[int] | Tensor | None, per_row: int, max_bytes: int | None) -> list[Tensor]:
    """The query rows (default all L; negative from the end) in chunks of about ``max_bytes`` of work."""
    idx = torch.arange(L) if rows is None else torch.as_tensor(rows).long().reshape(-1)
    if idx.numel() == 0 or bool(((idx < -L) | (idx >= L)).any()):
        raise IndexError(f"query rows must be a non-empty selection of 0..{L - 1}")
    idx = idx % L
    budget = DEFAULT_MAP_BYTES if max_bytes is None else max_bytes
    step = max(1, min(idx.numel(), budget // max(1, per_row)))
    return [idx[s:s + step] for s in range(0, idx.numel(), step)]


def layer_token_map(layer: Mapping[str, Tensor], params: MixerParams, variant: str = "full", *,
                    rows: Sequence[int] | Tensor | None = None, attention_mask: Tensor | None = None,
                    max_bytes: int | None = None) -> Tensor:
    """c [b, L, L] (or [b, R, L] for query ``rows``): c[i, j] = ‖T_i(x_j)‖₂ (module docstring), computed in
    chunks of query rows whose working memory stays near ``max_bytes`` (default 256 MiB)."""
    (x,) = need_units(layer, "mixer.hook_x", what="implicit attention")
    b, L, E = x.shape
    es = 8 if x.dtype == torch.float64 else 4
    chunks = _row_chunks(L, rows, es * b * L * (3 * E + 2 * params.out_proj_weight.shape[0]), max_bytes)
    parts = [token_contributions(layer, params, variant, rows=r, attention_mask=attention_mask).norm(dim=-1)
             for r in chunks]
    return torch.cat(parts, dim=1)


def attention_token_map(pattern: Tensor, v: Tensor, write: Tensor, *, rows: Sequence[int] | Tensor | None = None,
                        max_bytes: int | None = None) -> Tensor:
    """c [b, L, L] (or [b, R, L] for query ``rows``) of an attention layer: c[i, j] = ‖Σ_h A_h[i, j]·v_{j,h}·W_O^h‖₂.

    pattern [b, H, L, L] (``attn.hook_pattern``); v [b, L, H_kv, dh] (``attn.hook_v``, grouped-query heads
    repeated to H); write [H, dh, d_model] (W_O per head, ``head_write_weights``)."""
    b, H, L, _ = pattern.shape
    if v.shape[2] != H:
        v = v.repeat_interleave(H // v.shape[2], dim=2)
    vo = torch.einsum("blhk,hkd->blhd", v.to(pattern), write.to(pattern))  # [b, L, H, d_model]
    es = 8 if pattern.dtype == torch.float64 else 4
    chunks = _row_chunks(L, rows, es * b * L * 2 * write.shape[-1], max_bytes)
    return torch.cat([torch.einsum("bhij,bjhd->bijd", pattern[:, :, r], vo).norm(dim=-1) for r in chunks], dim=1)


def _rownorm(a: Tensor) -> Tensor:
    s = a.sum(-1, keepdim=True)
    return a / torch.where(s > 0, s, torch.ones_like(s))


def residual_rollout(maps: Sequence[Tensor]) -> Tensor:
    """R [b, L, L] = Ã_{n−1} ⋯ Ã_0, Ã = rownorm(I + rownorm(c)) for the layer maps c [b, L, L] in layer order
    (non-negative).  Row i: how token i's stream after the last layer mixes the input tokens."""
    if not maps:
        raise ValueError("residual_rollout needs at least one layer map")
    eye = torch.eye(maps[0].shape[-1], dtype=maps[0].dtype, device=maps[0].device)
    out = None
    for c in maps:
        step = _rownorm(eye + _rownorm(c))
        out = step if out is None else step @ out
    return out
