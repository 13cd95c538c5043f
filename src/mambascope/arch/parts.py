"""Building blocks shared by the architecture adapters: Mamba-1 / Mamba-2 mixers, attention, MLPs.

Each function mirrors the Hugging Face pure-PyTorch forward (transformers 5.x) operation by operation,
so that the traced logits equal the model's own.  ``emit(unit, tensor)`` records a unit and returns
it, possibly edited by an intervention; downstream computation uses what it returns.  The SSM state
``mixer.hook_ssm_state`` is emitted only when the tracer asks for it (``emit.state_positions``): then
the scan runs in segments ending at those positions, and each segment starts from the state emit returned.
``emit.knockouts`` (``mambascope.ssm.knockout``) remove chosen source tokens' terms from the scan output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mambascope.arch.base import Emit
from mambascope.arch.lrp_mode import LRPRules, activation, held, lrp_rules, product, silu
from mambascope.arch.units import STATE_UNIT
from mambascope.ssm.knockout import s6_knockout_terms, ssd_knockout_terms
from mambascope.ssm.scan import selective_scan, ssd_scan

# scan(segment, initial state or None) -> (y of the segment [b, len, ...], state after its last position)
SegmentScan = Callable[[slice, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


def masked(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero padding positions (HF ``apply_mask_to_padding_states``; state-spaces/mamba#66)."""
    return t if mask is None else (t * mask[:, :, None]).to(t.dtype)


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Depthwise causal conv over positions. x [b, L, C], weight [C, 1, K] -> [b, L, C].

    With a decoding ``cache`` (``mambascope.arch.base.DecodeCache``) the conv continues from
    ``cache["conv"]``, the K-1 inputs before x (zeros before the first token, as the padding), and leaves
    there the K-1 inputs up to x's end; the valid part of the conv over window ‖ x is x's output.
    """
    if cache is not None:
        return _windowed_conv(x, weight, bias, cache)
    L = x.shape[1]
    out = F.conv1d(x.transpose(1, 2).to(weight.dtype), weight, bias, padding=weight.shape[-1] - 1,
                   groups=weight.shape[0])
    return out[:, :, :L].transpose(1, 2).to(x.dtype)


def _windowed_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   cache: dict[str, torch.Tensor]) -> torch.Tensor:
    K = weight.shape[-1]
    window = cache.get("conv")
    if window is None:
        window = x.new_zeros(x.shape[0], K - 1, x.shape[2])
    full = torch.cat([window.to(x.dtype), x], dim=1)
    cache["conv"] = full[:, full.shape[1] - (K - 1):]
    out = F.conv1d(full.transpose(1, 2).to(weight.dtype), weight, bias, groups=weight.shape[0])
    return out.transpose(1, 2).to(x.dtype)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """t in fp32 where HF computes in fp32 (``.float()``), but fp64 kept fp64, so an fp64 model stays fp64."""
    return t if t.dtype == torch.float64 else t.float()


def weightless_rms(t: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) over the last axis in fp32, back in t's dtype (FalconMamba's B, C, Δ norms)."""
    x = at_least_fp32(t)
    return (x * held(torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps), "norm")).type_as(t)


def scan_through_states(scan: SegmentScan, length: int, emit: Emit) -> torch.Tensor:
    """y [b, length, ...] of a scan cut after each of ``emit.state_positions``, emitting the state there.

    Each segment starts from the state ``emit.state`` returned at the end of the previous one, so an
    edit of the state at p changes every output after p and none up to p; unedited, the pieces
    concatenate to the whole scan (h_t depends on the past only through h_{t-1}).
    """
    ys, state, start = [], None, 0
    for k, p in enumerate(emit.state_positions):
        y, state = scan(slice(start, p + 1), state)
        ys.append(y)
        state = emit.state(STATE_UNIT, k, state)
        start = p + 1
    if start < length:
        ys.append(scan(slice(start, length), state)[0])
    return torch.cat(ys, dim=1)


def mamba1_mixer(mixer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None, emit: Emit,
                 bcdt_norms: tuple[Callable, Callable, Callable] | None = None,
                 cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Mamba-1 mixer (in_proj, conv, S6 scan, gate) from its normed input [b, L, D]; returns ``post`` [b, L, E].

    ``bcdt_norms``: (Δ_low, B, C) normalisers applied after x_proj, as FalconMamba and Jamba do.
    ``cache``: the mixer's decoding state (conv window, SSM state), read as the start and updated.
    """
    x, z = mixer.in_proj(masked(hidden, mask)).chunk(2, dim=-1)
    x = emit("mixer.hook_x", x)
    z = emit("mixer.hook_gate_pre", z)
    conv = emit("mixer.hook_conv", causal_conv(x, mixer.conv1d.weight, mixer.conv1d.bias, cache))
    u = emit("mixer.hook_ssm_input", masked(silu(conv), mask))
    dt_low, B, C = torch.split(
        mixer.x_proj(u), [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size], dim=-1
    )
    if bcdt_norms is not None:
        dt_low, B, C = (norm(t) for norm, t in zip(bcdt_norms, (dt_low, B, C), strict=True))
    dt_bias = mixer.dt_proj.bias
    dt = dt_low @ mixer.dt_proj.weight.T
    dt = emit("mixer.hook_dt", F.softplus(dt if dt_bias is None else dt + dt_bias.to(dt.dtype)))
    B = emit("mixer.hook_B", B)
    C = emit("mixer.hook_C", C)
    A = -torch.exp(mixer.A_log.float())
    dt, B, C = (held(t, "ssm") for t in (dt, B, C))  # LRP: the scan linear in u
    if cache is not None:
        y, cache["ssm"] = selective_scan(u, dt, A, B, C, initial_state=cache.get("ssm"), return_state=True)
    elif emit.state_positions is None:
        y = selective_scan(u, dt, A, B, C)
    else:
        def scan(s: slice, h: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            return selective_scan(u[:, s], dt[:, s], A, B[:, s], C[:, s], initial_state=h, return_state=True)

        y = scan_through_states(scan, u.shape[1], emit)
    if emit.knockouts:  # the terms the knocked-out sources wrote into the state, removed from the outputs
        y = y - s6_knockout_terms(u, dt, A, B, C, emit.knockouts)
    y = emit("mixer.hook_y", y + u * at_least_fp32(mixer.D))
    gate = emit("mixer.hook_gate", silu(z))
    return emit("mixer.hook_post", product(torch.mul, y, gate))


def gated_rms_norm(y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, groups: int,
                   eps: float) -> torch.Tensor:
    """weight ⊙ RMSNorm over each of ``groups`` channel groups of y ⊙ SiLU(z), in fp32 (HF MambaRMSNormGated)."""
    gated = product(torch.mul, at_least_fp32(y), gate)
    grouped = gated.reshape(*gated.shape[:-1], groups, -1)
    normed = grouped * held(torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps), "norm")
    return weight * normed.reshape(gated.shape).to(weight.dtype)


def mamba2_mixer(mixer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None, emit: Emit, *,
                 in_scale: float = 1.0, proj_scale: torch.Tensor | None = None, rms_norm: bool = True,
                 norm_before_gate: bool = False, cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Mamba-2 mixer (in_proj, conv over x‖B‖C, SSD scan, gate) from its normed input; returns ``post``.

    Falcon-H1's μP options: ``in_scale`` multiplies the input, ``proj_scale`` [E + conv_dim + H] the
    in_proj output; ``rms_norm=False`` gates with y ⊙ SiLU(z) and no norm; ``norm_before_gate`` applies
    the grouped RMSNorm to y before the gate instead of to y ⊙ SiLU(z).  ``cache``: the mixer's decoding
    state (conv window over x‖B‖C, SSM state), read as the start and updated.
    """
    E, G, N, H = mixer.intermediate_size, mixer.n_groups, mixer.ssm_state_size, mixer.num_heads
    proj = mixer.in_proj(masked(hidden, mask) * in_scale)
    if proj_scale is not None:
        proj = proj * proj_scale
    z, xBC, dt_raw = proj.split([E, mixer.conv_dim, H], dim=-1)
    x, B_raw, C_raw = xBC.split([E, G * N, G * N], dim=-1)
    x = emit("mixer.hook_x", x)
    z = emit("mixer.hook_gate_pre", z)
    conv = causal_conv(torch.cat([x, B_raw, C_raw], dim=-1), mixer.conv1d.weight, mixer.conv1d.bias, cache)
    conv_x, conv_BC = conv.split([E, 2 * G * N], dim=-1)
    conv_x = emit("mixer.hook_conv", conv_x)
    u = emit("mixer.hook_ssm_input", masked(silu(conv_x), mask))
    B, C = masked(silu(conv_BC), mask).split([G * N, G * N], dim=-1)
    dt = F.softplus(dt_raw + mixer.dt_bias.to(dt_raw.dtype))
    dt = emit("mixer.hook_dt", torch.clamp(dt, *mixer.time_step_limit))
    B = emit("mixer.hook_B", B.reshape(*B.shape[:2], G, N))
    C = emit("mixer.hook_C", C.reshape(*C.shape[:2], G, N))
    A = -torch.exp(mixer.A_log.float())
    dt, B, C = (held(t, "ssm") for t in (dt, B, C))  # LRP: the scan linear in x
    u_heads = u.reshape(*u.shape[:2], H, mixer.head_dim)
    if cache is not None:
        y, cache["ssm"] = ssd_scan(u_heads, dt, A, B, C, chunk_size=min(mixer.chunk_size, u.shape[1]),
                                   initial_state=cache.get("ssm"), return_state=True)
    elif emit.state_positions is None:
        y = ssd_scan(u_heads, dt, A, B, C, chunk_size=mixer.chunk_size)
    else:
        def scan(s: slice, h: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            # equal chunks of at most chunk_size: a short segment is not padded to a whole chunk
            n = s.stop - s.start
            chunk = -(-n // -(-n // mixer.chunk_size))
            return ssd_scan(u_heads[:, s], dt[:, s], A, B[:, s], C[:, s], chunk_size=chunk,
                            initial_state=h, return_state=True)

        y = scan_through_states(scan, u.shape[1], emit)
    if emit.knockouts:
        y = y - ssd_knockout_terms(u_heads, dt, A, B, C, emit.knockouts)
    y = y + at_least_fp32(mixer.D)[:, None] * at_least_fp32(u_heads)
    y = emit("mixer.hook_y", y.reshape(*u.shape[:2], E))
    gate = emit("mixer.hook_gate", silu(at_least_fp32(z)))
    if not rms_norm:
        return emit("mixer.hook_post", product(torch.mul, y, gate))
    norm = mixer.norm
    # Every family's gated RMSNorm normalises groups of E / n_groups channels.
    if norm_before_gate:
        ones = torch.ones_like(gate)
        post = product(torch.mul, gated_rms_norm(y, ones, norm.weight, G, norm.variance_epsilon), gate)
        return emit("mixer.hook_post", post.to(norm.weight.dtype))
    return emit("mixer.hook_post", gated_rms_norm(y, gate, norm.weight, G, norm.variance_epsilon))


def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of the first ``cos.shape[-1]`` dims of q, k [b, L, H, dh] (HF ``apply_rotary_pos_emb``)."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    dim = cos.shape[-1]

    def one(t: torch.Tensor) -> torch.Tensor:
        rot = t[..., :dim]
        half = torch.cat((-rot[..., dim // 2:], rot[..., : dim // 2]), dim=-1)
        # HF's rot·cos + rotate_half(rot)·sin, the sum made in place and no concatenation with an empty rest:
        # the same values with fewer [b, L, H, dh] temporaries, which at small widths cost as much as the math
        out = (rot * cos).add_(half * sin)
        return out if dim == t.shape[-1] else torch.cat((out, t[..., dim:]), dim=-1)

    return one(q), one(k)


def _score_dtype(q: torch.Tensor) -> torch.dtype:
    """Attention scores in fp32, or fp64 for an fp64 model."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, emit: Emit,
              scale: float, need_pattern: bool, cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal softmax attention. q [b, L, H, dh], k and v [b, L, H_kv, dh] (grouped-query when H_kv < H).

    ``cache``: the decoding state; the (emitted) keys and values of earlier tokens, ``cache["k"]``,
    ``cache["v"]`` [b, t, H_kv, dh], precede this call's and the new ones are appended (no padding mask then).
    Returns ``attn.hook_z`` [b, L, H·dh], the input of the output projection.
    """
    b, L, H, _ = q.shape
    q = emit("attn.hook_q", q)
    k = emit("attn.hook_k", k)
    v = emit("attn.hook_v", v)
    if cache is not None:
        k, v = (torch.cat([cache[name], t], dim=1) if name in cache else t for name, t in (("k", k), ("v", v)))
        cache["k"], cache["v"] = k, v
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    rules = lrp_rules()
    explicit = need_pattern or rules is not None
    if not explicit and mask is None and k.shape[2] == L:
        # the model's own path: fused attention with the causal flag, the key/value heads shared by their
        # query groups inside the kernel (as HF does without a mask); no [L, L] tensor is made at all
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] < H)
    else:
        rep = H // k.shape[1]
        k, v = (t.repeat_interleave(rep, dim=1) if rep > 1 else t for t in (k, v))
        allowed = _allowed(L, k.shape[2], mask, q.device)
        if explicit:
            z = _explicit_attention(q, k, v, allowed, emit, scale, rules)
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    z = emit("attn.hook_z", z.transpose(1, 2))
    return z.reshape(b, L, -1)


def _allowed(L: int, Lk: int, mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """[L, Lk] (or [b, 1, L, Lk] with a padding mask) bool: which keys each query may attend to, causally."""
    allowed = torch.ones(L, Lk, dtype=torch.bool, device=device).tril(Lk - L)
    if mask is not None:
        # A padding query attends to itself alone: a fully masked row would be NaN, and NaN values at
        # padding positions would poison real rows through 0·NaN in the next layer.
        eye = torch.eye(L, dtype=torch.bool, device=device)
        allowed = allowed & mask[:, None, None, :].bool() | eye
    return allowed


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, emit: Emit,
                        scale: float, rules: LRPRules | None) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask)·v with the pattern [b, H, L, Lk] made and emitted (``attn.hook_pattern``);
    q, k, v [b, H, ·, dh].  In LRP mode the AttnLRP rules apply to the two products."""
    b, H, L, _ = q.shape
    Lk = k.shape[2]
    # scale and mask fused into the score matmul (baddbmm): at these sizes every extra pass over the
    # [b, H, L, L] scores costs as much as the matmul itself
    bias = torch.zeros(allowed.shape, device=q.device, dtype=_score_dtype(q)).masked_fill_(~allowed, -torch.inf)
    if bias.dim() == 4:  # per-row padding mask [b, 1, L, L]
        bias = bias.expand(b, H, L, Lk).reshape(b * H, L, Lk)
    qf, kf = (t.to(_score_dtype(q)).reshape(b * H, t.shape[2], -1) for t in (q, k))

    def scores_of(qq: torch.Tensor, kk: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(bias, qq, kk.transpose(1, 2), alpha=scale)

    # LRP (AttnLRP): the uniform rule on the bilinear q·kᵀ and pattern·v, the softmax's own gradient
    scores = product(scores_of, qf, kf, "attnlrp").view(b, H, L, Lk)
    pattern = emit("attn.hook_pattern", torch.softmax(scores, -1).to(v.dtype))
    if rules is not None and rules.attention == "cp":
        pattern = pattern.detach()  # CP-LRP: relevance flows through the values only
    return product(torch.matmul, pattern, v, "attnlrp")


def gated_mlp(x: torch.Tensor, gate_proj: Callable, up_proj: Callable, down_proj: Callable, act: Callable,
              emit: Emit) -> torch.Tensor:
    """SwiGLU-style MLP: down(act(gate(x)) · up(x)); the neuron ``mlp.hook_post`` is down's input."""
    pre = emit("mlp.hook_pre", gate_proj(x))
    pre_linear = emit("mlp.hook_pre_linear", up_proj(x))
    return down_proj(emit("mlp.hook_post", product(torch.mul, activation(act, pre), pre_linear)))


def plain_mlp(x: torch.Tensor, up_proj: Callable, down_proj: Callable, act: Callable, emit: Emit) -> torch.Tensor:
    """down(act(up(x))); the neuron ``mlp.hook_post`` is down's input."""
    return down_proj(emit("mlp.hook_post", activation(act, emit("mlp.hook_pre", up_proj(x)))))


def llama_attention(attn: nn.Module, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None,
                    mask: torch.Tensor | None, emit: Emit, need_pattern: bool,
                    cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Llama-style attention (q_proj, k_proj, v_proj, optional rotary, o_proj) on its normed input x [b, L, D].

    Returns the output projection's input ``attn.hook_z`` flattened to [b, L, H·dh].
    """
    b, L, _ = x.shape
    q, k, v = (proj(x).view(b, L, -1, attn.head_dim) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    if rotary is not None:
        q, k = rotate(q, k, *rotary)
    return attention(q, k, v, mask, emit, attn.scaling, need_pattern, cache)


def routed_experts(x: torch.Tensor, top_weights: torch.Tensor, top_index: torch.Tensor, up: torch.Tensor,
                   down: torch.Tensor, act: Callable, gated: bool, emit: Emit) -> torch.Tensor:
    """Top-k mixture of experts from the model's own routing decisions, every expert computed densely.

    x [b, L, D]; top_weights, top_index [b, L, k] (the router's output); up [X, F, D] (or [X, 2F, D]
    holding gate ‖ up when ``gated``); down [X, D, F].  Units: ``mlp.hook_route`` [b, L, X] the weight
    each expert's output gets (0 where the token is not routed to it); ``mlp.hook_pre`` (and
    ``mlp.hook_pre_linear``) [b, L, X, F] every expert's pre-activation; ``mlp.hook_post`` [b, L, X, F]
    the experts' neurons (input of their down projection), zero where the token is not routed to the
    expert, so an expert's neurons are counted over the tokens routed to it.
    Returns Σ_x route[x] · down_x(post_x)  [b, L, D] (HF's per-expert loop, in one einsum).
    """
    X = up.shape[0]
    route = torch.zeros(*x.shape[:2], X, dtype=top_weights.dtype, device=x.device)
    route = emit("mlp.hook_route", route.scatter(-1, top_index, top_weights))
    routed = torch.zeros_like(route, dtype=torch.bool).scatter(-1, top_index, True)
    h = torch.einsum("bld,xfd->blxf", x, up.to(x.dtype))
    if gated:
        gate, lin = h.chunk(2, dim=-1)
        post = act(emit("mlp.hook_pre", gate)) * emit("mlp.hook_pre_linear", lin)
    else:
        post = act(emit("mlp.hook_pre", h))
    post = emit("mlp.hook_post", post * routed[..., None])
    return torch.einsum("blxf,xdf,blx->bld", post, down.to(post.dtype), route.to(post.dtype))


def moe_with_router(router: Callable, x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act: Callable,
                    gated: bool, emit: Emit) -> torch.Tensor:
    """:func:`routed_experts` with the routing of the model's own router module, called as HF does on
    the flattened tokens and returning ``(logits, top_k_weights, top_k_index)``."""
    _, weights, index = router(x.reshape(-1, x.shape[-1]))
    k = index.shape[-1]
    out = routed_experts(x, weights.view(*x.shape[:2], k), index.view(*x.shape[:2], k), up, down, act, gated, emit)
    return out.to(x.dtype)
