"""One block of each architecture, recomputed from its own parameters with every unit exposed.

Each function mirrors the Hugging Face forward (transformers 5.x, pure-PyTorch path) operation by
operation, so that the traced logits equal the model's own.  ``emit(unit, tensor)`` records a unit
and returns it, possibly edited by an intervention; downstream computation uses what it returns.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mambascope.ssm.scan import selective_scan, ssd_scan

Emit = Callable[[str, torch.Tensor], torch.Tensor]


def _masked(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # HF zeroes padding positions before in_proj and after the conv (state-spaces/mamba#66).
    return t if mask is None else (t * mask[:, :, None]).to(t.dtype)


def _causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal conv over positions. x [b, L, C], weight [C, 1, K] -> [b, L, C]."""
    L = x.shape[1]
    out = F.conv1d(x.transpose(1, 2).to(weight.dtype), weight, bias, padding=weight.shape[-1] - 1,
                   groups=weight.shape[0])
    return out[:, :, :L].transpose(1, 2).to(x.dtype)


def mamba_block(block: nn.Module, h: torch.Tensor, mask: torch.Tensor | None, emit: Emit) -> torch.Tensor:
    """Mamba-1 block: RMSNorm, mixer (in_proj, conv, S6 scan, gate, out_proj), residual."""
    mixer = block.mixer
    h = emit("hook_resid_pre", h)
    residual = h.float() if block.residual_in_fp32 else h
    hidden = _masked(block.norm(h.to(block.norm.weight.dtype)), mask)
    x, z = mixer.in_proj(hidden).chunk(2, dim=-1)
    x = emit("mixer.hook_x", x)
    z = emit("mixer.hook_gate_pre", z)
    conv = emit("mixer.hook_conv", _causal_conv(x, mixer.conv1d.weight, mixer.conv1d.bias))
    u = emit("mixer.hook_ssm_input", _masked(F.silu(conv), mask))
    dt_low, B, C = torch.split(
        mixer.x_proj(u), [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size], dim=-1
    )
    dt = emit("mixer.hook_dt", F.softplus(dt_low @ mixer.dt_proj.weight.T + mixer.dt_proj.bias.to(dt_low.dtype)))
    B = emit("mixer.hook_B", B)
    C = emit("mixer.hook_C", C)
    A = -torch.exp(mixer.A_log.float())
    y = selective_scan(u, dt, A, B, C) + u * mixer.D.float()
    y = emit("mixer.hook_y", y)
    gate = emit("mixer.hook_gate", F.silu(z))
    post = emit("mixer.hook_post", y * gate)
    out = emit("hook_mixer_out", mixer.out_proj(post.to(mixer.out_proj.weight.dtype)))
    return emit("hook_resid_post", residual + out)


def mamba2_block(block: nn.Module, h: torch.Tensor, mask: torch.Tensor | None, emit: Emit) -> torch.Tensor:
    """Mamba-2 block: RMSNorm, mixer (in_proj, conv over x‖B‖C, SSD scan, gated RMSNorm, out_proj)."""
    mixer = block.mixer
    E, G, N, H = mixer.intermediate_size, mixer.n_groups, mixer.ssm_state_size, mixer.num_heads
    h = emit("hook_resid_pre", h)
    residual = h.float() if block.residual_in_fp32 else h
    hidden = _masked(block.norm(h.to(block.norm.weight.dtype)), mask)
    z, xBC, dt_raw = mixer.in_proj(hidden).split([E, mixer.conv_dim, H], dim=-1)
    x, B_raw, C_raw = xBC.split([E, G * N, G * N], dim=-1)
    x = emit("mixer.hook_x", x)
    z = emit("mixer.hook_gate_pre", z)
    conv = _causal_conv(torch.cat([x, B_raw, C_raw], dim=-1), mixer.conv1d.weight, mixer.conv1d.bias)
    conv_x, conv_BC = conv.split([E, 2 * G * N], dim=-1)
    conv_x = emit("mixer.hook_conv", conv_x)
    u = emit("mixer.hook_ssm_input", _masked(F.silu(conv_x), mask))
    B, C = _masked(F.silu(conv_BC), mask).split([G * N, G * N], dim=-1)
    dt = F.softplus(dt_raw + mixer.dt_bias.to(dt_raw.dtype))
    dt = emit("mixer.hook_dt", torch.clamp(dt, *mixer.time_step_limit))
    B = emit("mixer.hook_B", B.reshape(*B.shape[:2], G, N))
    C = emit("mixer.hook_C", C.reshape(*C.shape[:2], G, N))
    A = -torch.exp(mixer.A_log.float())
    P = mixer.head_dim
    u_heads = u.reshape(*u.shape[:2], H, P)
    y = ssd_scan(u_heads, dt, A, B, C, chunk_size=mixer.chunk_size) + mixer.D.float()[:, None] * u_heads.float()
    y = emit("mixer.hook_y", y.reshape(*u.shape[:2], E))
    gate = emit("mixer.hook_gate", F.silu(z.float()))
    post = emit("mixer.hook_post", _gated_rms_norm(y, gate, mixer.norm.weight, G, mixer.norm.variance_epsilon))
    out = emit("hook_mixer_out", mixer.out_proj(post.to(mixer.out_proj.weight.dtype)))
    return emit("hook_resid_post", residual + out)


def _gated_rms_norm(y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, groups: int,
                    eps: float) -> torch.Tensor:
    """weight ⊙ RMSNorm over each of ``groups`` channel groups of y ⊙ SiLU(z), in fp32 (HF MambaRMSNormGated)."""
    gated = y.float() * gate
    grouped = gated.reshape(*gated.shape[:-1], groups, -1)
    normed = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.reshape(gated.shape).to(weight.dtype)


def gpt2_block(block: nn.Module, h: torch.Tensor, mask: torch.Tensor | None, emit: Emit,
               layer: int, need_pattern: bool) -> torch.Tensor:
    """GPT-2 block: LN, causal multi-head attention, residual, LN, MLP (c_fc, act, c_proj), residual."""
    attn = block.attn
    h = emit("hook_resid_pre", h)
    q, k, v = attn.c_attn(block.ln_1(h)).split(attn.split_size, dim=-1)
    b, L, _ = q.shape
    v = emit("attn.hook_v", v.view(b, L, attn.num_heads, attn.head_dim))
    q, k = (t.view(b, L, attn.num_heads, attn.head_dim) for t in (q, k))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scale = attn.head_dim**-0.5 if attn.scale_attn_weights else 1.0
    if attn.scale_attn_by_inverse_layer_idx:
        scale /= float(layer + 1)
    allowed = torch.ones(L, L, dtype=torch.bool, device=h.device).tril()
    if mask is not None:
        # A padding query attends to itself alone: a fully masked row would be NaN, and NaN values at
        # padding positions would poison real rows through 0·NaN in the next layer.
        eye = torch.eye(L, dtype=torch.bool, device=h.device)
        allowed = allowed & mask[:, None, None, :].bool() | eye
    if need_pattern:
        scores = (q @ k.transpose(-1, -2)).float() * scale
        scores = scores.masked_fill(~allowed, -torch.inf)
        pattern = emit("attn.hook_pattern", scores.softmax(-1).to(v.dtype))
        z = pattern @ v
    else:
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    z = z.transpose(1, 2).reshape(b, L, -1)
    h = emit("hook_resid_mid", h + emit("hook_attn_out", attn.c_proj(z)))
    mlp = block.mlp
    pre = emit("mlp.hook_pre", mlp.c_fc(block.ln_2(h)))
    post = emit("mlp.hook_post", mlp.act(pre))
    return emit("hook_resid_post", h + emit("hook_mlp_out", mlp.c_proj(post)))
