"""Slow, obviously-correct loop implementations of the Mamba mixers and of their hidden attention.

For tests and benchmarks only: every function here follows the recurrence literally (a Python loop over
positions, decays as products of ``exp(Δ·A)``), so it shares no code and no numerical trick with the fast
kernels in :mod:`mambascope.ssm.hidden_attention` or :mod:`mambascope.ssm.scan`.

Sources: Gu & Dao 2023 (Mamba, Alg. 2; B̄ = Δ·B as in the released kernels), Dao & Gu 2024 (Mamba-2, SSD),
and Hugging Face ``transformers`` ``MambaMixer`` / ``Mamba2Mixer`` / ``MambaRMSNormGated`` (torch paths),
whose conventions (causal depthwise conv = ``conv1d(padding=K-1)[:L]``, padding mask applied to the mixer
input and to the conv output, gated RMSNorm over groups of ``E / n_groups`` channels) are copied here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mambascope.ssm.params import MixerParams


def silu(x: Tensor) -> Tensor:
    """x·σ(x), written out so the reference does not depend on ``F.silu``."""
    return x * torch.sigmoid(x)


def causal_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Depthwise causal convolution, one tap at a time.

    out[b, t, e] = bias[e] + Σ_{k=0..K-1} weight[e, k] · x[b, t-(K-1)+k, e]   (x = 0 before position 0),
    which is ``F.conv1d(x, weight[:, None], bias, padding=K-1, groups=E)[..., :L]`` as in HF's
    ``causal_conv1d_fn``.  x [b, L, E], weight [E, K], bias [E] or None → [b, L, E].
    """
    b, L, E = x.shape
    K = weight.shape[1]
    out = torch.zeros_like(x) if bias is None else bias.to(x.dtype).expand(b, L, E).clone()
    for k in range(K):
        shift = K - 1 - k  # tap k reads the input `shift` positions back
        if shift < L:
            out[:, shift:] += weight[:, k].to(x.dtype) * x[:, : L - shift]
    return out


def mamba1_scan(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                initial_state: Tensor | None = None, states: list[Tensor] | None = None) -> Tensor:
    """Mamba-1 recurrence, one position at a time (Gu & Dao 2023, Alg. 2; B̄ = Δ·B).

    u, dt [b, L, E]; A [E, N]; B, C [b, L, N]; D [E].  h_t = exp(Δ_t·A) ⊙ h_{t-1} + Δ_t·B_t·u_t,
    y_t = C_t·h_t + D·u_t → y [b, L, E], from h_{-1} = ``initial_state`` [b, E, N] (default 0).
    ``states``, when given, receives h_t [b, E, N] for every t.
    """
    b, L, E = u.shape
    h = torch.zeros(b, E, A.shape[1], dtype=u.dtype, device=u.device) if initial_state is None else initial_state
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1) + D * u[:, t])
        if states is not None:
            states.append(h)
    return torch.stack(ys, dim=1)


def mamba2_scan(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                initial_state: Tensor | None = None, states: list[Tensor] | None = None) -> Tensor:
    """Mamba-2 recurrence per head, one position at a time (Dao & Gu 2024, eq. 1 with scalar A_h).

    u [b, L, E] (E = H·head_dim, channel e in head e // head_dim); dt [b, L, H]; A, D [H];
    B, C [b, L, G, N], head h reads group h // (H/G).  Per head: h_t = exp(Δ_t·A_h)·h_{t-1} + Δ_t·u_t ⊗ B_t,
    y_t = h_t·C_t + D_h·u_t → y [b, L, E], from h_{-1} = ``initial_state`` [b, H, head_dim, N] (default 0).
    ``states``, when given, receives h_t [b, H, head_dim, N] for every t.
    """
    b, L, E = u.shape
    H = dt.shape[2]
    P = E // H
    group = torch.arange(H, device=u.device) // (H // B.shape[2])
    state = initial_state
    if state is None:
        state = torch.zeros(b, H, P, B.shape[3], dtype=u.dtype, device=u.device)
    ys = []
    for t in range(L):
        ut = u[:, t].reshape(b, H, P)
        Bt, Ct = B[:, t, group], C[:, t, group]  # [b, H, N]
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = decay * state + (dt[:, t, :, None] * ut)[..., None] * Bt[:, :, None, :]
        ys.append(((state * Ct[:, :, None, :]).sum(-1) + D[:, None] * ut).reshape(b, E))
        if states is not None:
            states.append(state)
    return torch.stack(ys, dim=1)


def _masked_conv(x: Tensor, conv_weight: Tensor, conv_bias: Tensor | None,
                 mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(x with padding zeroed, causal conv of it, u = SiLU(conv) with padding zeroed), as HF does."""
    m = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if mask is None else mask.to(x.dtype)
    x = x * m[..., None]
    conv = causal_conv(x, conv_weight, conv_bias)
    return x, conv, silu(conv) * m[..., None]


def mamba1_mixer(
    x: Tensor, z: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, dt: Tensor, B: Tensor, C: Tensor,
    A: Tensor, D: Tensor, mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Mamba-1 mixer from pre-conv x to ``post`` with Δ, B, C given (not recomputed from u).

    x, z, dt [b, L, E]; B, C [b, L, N]; A [E, N]; D [E]; mask [b, L] (1 = token) or None.
    h_t = exp(Δ_t·A) ⊙ h_{t-1} + Δ_t·B_t·u_t,  y_t = C_t·h_t + D·u_t,  post = y ⊙ SiLU(z).
    Returns the tracer's unit names (without ``blocks.{l}.``) mapped to [b, L, ...] tensors.
    """
    x, conv, u = _masked_conv(x, conv_weight, conv_bias, mask)
    y = mamba1_scan(u, dt, A, B, C, D)
    gate = silu(z)
    return {
        "mixer.hook_x": x, "mixer.hook_gate_pre": z, "mixer.hook_conv": conv, "mixer.hook_ssm_input": u,
        "mixer.hook_dt": dt, "mixer.hook_B": B, "mixer.hook_C": C, "mixer.hook_y": y,
        "mixer.hook_gate": gate, "mixer.hook_post": y * gate,
    }


def mamba2_mixer(
    x: Tensor, z: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, dt: Tensor, B: Tensor, C: Tensor,
    A: Tensor, D: Tensor, norm_weight: Tensor, norm_eps: float, mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Mamba-2 mixer from pre-conv x to ``post`` (the input of out_proj) with Δ, B, C given.

    x, z [b, L, E]; dt [b, L, H]; B, C [b, L, G, N]; A, D [H]; norm_weight [E]; E = H·head_dim.
    Head h reads group g = h // (H/G).  Per head: h_t = exp(Δ_t·A_h)·h_{t-1} + Δ_t·x_t ⊗ B_t,
    y_t = h_t·C_t + D_h·x_t;  post = norm_weight ⊙ v·rsqrt(mean_group(v²) + eps) with v = y ⊙ SiLU(z) and
    groups of E/G channels (HF ``MambaRMSNormGated``, norm_before_gate=False).
    """
    b, L, E = x.shape
    G = B.shape[2]
    x, conv, u = _masked_conv(x, conv_weight, conv_bias, mask)
    y = mamba2_scan(u, dt, A, B, C, D)
    gate = silu(z)
    v = (y * gate).reshape(b, L, G, E // G)
    normed = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + norm_eps)
    post = norm_weight * normed.reshape(b, L, E)
    return {
        "mixer.hook_x": x, "mixer.hook_gate_pre": z, "mixer.hook_conv": conv, "mixer.hook_ssm_input": u,
        "mixer.hook_dt": dt, "mixer.hook_B": B, "mixer.hook_C": C, "mixer.hook_y": y,
        "mixer.hook_gate": gate, "mixer.hook_post": post,
    }


def hidden_attention_loops(dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """Hidden attention by explicit loops over (s, t) with the decay as a running product of exp(Δ_k·A).

    Mamba-1: dt [b, L, E], A [E, N], B, C [b, L, N] → α [b, E, L, L].
    Mamba-2: dt [b, L, H], A [H], B, C [b, L, G, N] → α [b, H, L, L].
    α[t, s] = Σ_n C[t, n] · Π_{k=s+1..t} exp(Δ_k·A_n) · B[s, n] · Δ_s for s ≤ t, 0 above the diagonal
    (Ali et al. 2024, eq. 9–11).
    """
    b, L, U = dt.shape
    if A.dim() == 1:  # Mamba-2: one decay per head, B and C of the head's group
        group = torch.arange(U, device=dt.device) // (U // B.shape[2])
        A = A[:, None]
        B, C = B[:, :, group], C[:, :, group]  # [b, L, H, N]
    else:
        B, C = B[:, :, None, :], C[:, :, None, :]  # shared by all channels
    out = torch.zeros(b, U, L, L, dtype=dt.dtype, device=dt.device)
    for s in range(L):
        decay = torch.ones(b, U, A.shape[1], dtype=dt.dtype, device=dt.device)
        for t in range(s, L):
            if t > s:
                decay = decay * torch.exp(dt[:, t, :, None] * A)
            out[:, :, t, s] = (C[:, t] * decay * B[:, s]).sum(-1) * dt[:, s]
    return out


def random_mixer(
    arch: str, *, batch: int = 2, length: int = 24, d_inner: int = 6, d_state: int = 4, conv_kernel: int = 4,
    head_dim: int = 2, n_groups: int = 1, dt_scale: float = 1.0, pad: tuple[int, int] = (0, 0),
    dtype: torch.dtype = torch.float32, seed: int = 0, outputs: bool = True, device: str | torch.device = "cpu",
) -> tuple[dict[str, Tensor], MixerParams, Tensor | None]:
    """A random Mamba-1 (``"mamba"``) or Mamba-2 (``"mamba2"``) layer: (unit tensors, params, mask).

    Δ = dt_scale·softplus(N(0,1) − 1), A = −exp(N(0,1)), B, C, x, z ~ N(0,1), conv weight N(0,1)/√K,
    conv bias N(0, 0.5²), D ~ N(0,1); Mamba-2 adds a norm weight 1 + N(0, 0.1²) and eps 1e-5.
    ``pad = (left, right)``: batch row 0 gets ``left`` leading padding tokens, row 1 (if any) ``right``
    trailing ones; the mask is None when both are 0.  ``outputs=False`` skips the slow reference mixer
    and returns only the inputs (x, z, conv, dt, B, C), e.g. for benchmarks at long L.
    """
    if arch not in ("mamba", "mamba2"):
        raise ValueError(f"arch must be 'mamba' or 'mamba2', got {arch!r}")
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)

    b, L, E, N, K = batch, length, d_inner, d_state, conv_kernel
    H = E // head_dim if arch == "mamba2" else E
    x, z = randn(b, L, E), randn(b, L, E)
    conv_w, conv_b = randn(E, K) / K**0.5, 0.5 * randn(E)
    dt = dt_scale * F.softplus(randn(b, L, H) - 1.0)
    if arch == "mamba":
        A, D = -torch.exp(randn(E, N)), randn(E)
        B, C = randn(b, L, N), randn(b, L, N)
    else:
        A, D = -torch.exp(randn(H)), randn(H)
        B, C = randn(b, L, n_groups, N), randn(b, L, n_groups, N)
    norm_w = 1.0 + 0.1 * randn(E) if arch == "mamba2" else None
    mask = None
    if any(pad):
        mask = torch.ones(b, L, dtype=dtype, device=device)
        if pad[0]:
            mask[0, : pad[0]] = 0
        if pad[1] and b > 1:
            mask[1, L - pad[1]:] = 0
    params = MixerParams(
        arch, A, D, conv_w, conv_b, randn(max(E // 2, 1), E), d_inner=E, d_state=N,
        n_heads=H, head_dim=head_dim if arch == "mamba2" else 1, n_groups=n_groups if arch == "mamba2" else 1,
        norm_weight=norm_w, norm_eps=1e-5 if arch == "mamba2" else 0.0,
    )
    if outputs:
        if arch == "mamba":
            layer = mamba1_mixer(x, z, conv_w, conv_b, dt, B, C, A, D, mask)
        else:
            layer = mamba2_mixer(x, z, conv_w, conv_b, dt, B, C, A, D, norm_w, 1e-5, mask)
    else:
        xm = x if mask is None else x * mask[..., None]
        layer = {"mixer.hook_x": xm, "mixer.hook_gate_pre": z, "mixer.hook_conv": causal_conv(xm, conv_w, conv_b),
                 "mixer.hook_dt": dt, "mixer.hook_B": B, "mixer.hook_C": C}
    return layer, params, mask
