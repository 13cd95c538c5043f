"""Exact hidden attention of the selective scan (docs/design.md §4).

Mamba-1, channel d, s ≤ t (Ali et al. 2024, "The Hidden Attention of Mamba Models", eq. 9–11, with the
Euler B̄ = Δ·B of the released kernels):

    α_d[t, s] = Σ_n C[t, n] · exp(A[d, n] · Σ_{k=s+1..t} Δ[k, d]) · B[s, n] · Δ[s, d],   α_d[t, s] = 0 for s > t

so that y[t, d] = Σ_s α_d[t, s]·u[s, d] + D[d]·u[t, d].  Mamba-2, head h (its group g's B and C):

    α_h[t, s] = (C_t · B_s) · exp(A_h · Σ_{k=s+1..t} Δ[k, h]) · Δ[s, h].

``block`` (Zimerman et al. 2024, "Explaining Modern Gated-Linear RNNs via a Unified Implicit Attention
Formulation") is the whole mixer as one linear map per channel from the pre-conv x to ``post``:

    post_t = Σ_j M[t, j]·x_j + bias_t,   M = diag(g)·(α + D)·diag(σ(conv)·mask)·Conv

with Conv the depthwise causal conv as a banded Toeplitz matrix, SiLU(c) = c·σ(c) read as a data-dependent
diagonal, g = SiLU(z) (Mamba-1) or norm_weight·rsqrt(mean_group((y·SiLU z)²) + eps)·SiLU(z) (Mamba-2, the
gated RMSNorm's per-token scale folded into the gate), and the conv bias's contribution in ``bias``
(:func:`block_bias`).

Numerics: every decay is exp of a segment sum Σ_{k=s+1..t} Δ_k·A ≤ 0, so it underflows to 0 and never
overflows; the segment sums come from fp64 prefix sums of Δ whose differences are rounded once, relative
to the difference itself (never exp(cum_t)/exp(cum_s)).  Work is in fp32, or fp64 for fp64 inputs, on the
inputs' device.  See docs/hidden_attention.md for the memory model.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mambascope.ssm.params import MixerParams
from mambascope.ssm.scan import selective_scan, ssd_scan

KINDS = ("s6", "s6+D", "block")
REDUCTIONS = ("mean", "absmean", "normalized")
# Working memory (beyond the result) one call may use when max_bytes is not given: enough for large
# channel chunks on a GPU, small enough that a channel reduction at L=4096 stays near 1 GB.
DEFAULT_WORK_BYTES = 1 << 30

IndexLike = int | slice | range | Sequence[int] | Tensor | None

__all__ = [
    "DEFAULT_WORK_BYTES", "KINDS", "REDUCTIONS", "AttentionMemoryError", "AttentionPlan", "attention_plan",
    "available_bytes", "block_bias", "hidden_attention", "output_gate", "s6_attention", "ssd_attention",
]


class AttentionMemoryError(MemoryError):
    """A hidden-attention request whose result (plus one chunk of work) would not fit in memory."""


# --------------------------------------------------------------------------------------------- kernels


def _work_dtype(*tensors: Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _pairwise_diff(a: Tensor, rows: Tensor | None, dtype: torch.dtype) -> Tensor:
    """d[..., i, s] = a[..., t_i] − a[..., s] for fp64 ``a`` [..., L]; t_i = rows[i] (or every t).

    Returned in ``dtype``.  In fp32, rounding the two prefix sums to fp32 first would make the error
    scale with the sums (≈ eps·Σ_{k≤t}Δ), swamping short segments late in a long sequence; splitting
    a = hi + lo into two fp32 parts keeps the error relative to the difference itself.
    """
    if dtype == torch.float64:
        at = a if rows is None else a[..., rows]
        return at.unsqueeze(-1) - a.unsqueeze(-2)
    hi = a.float()
    lo = (a - hi.double()).float()
    hit, lot = (hi, lo) if rows is None else (hi[..., rows], lo[..., rows])
    d = hit.unsqueeze(-1) - hi.unsqueeze(-2)
    return d.add_(lot.unsqueeze(-1)).sub_(lo.unsqueeze(-2))


@contextlib.contextmanager
def _ieee_matmul(t: Tensor) -> Iterator[None]:
    """fp32 matmuls at full precision on CUDA: TF32 (10-bit mantissa), if the user enabled it, would break
    the 1e-5 reconstruction.  CPU matmuls are always IEEE fp32."""
    if t.device.type != "cuda" or t.dtype != torch.float32:
        yield
        return
    m = torch.backends.cuda.matmul
    name, exact = ("fp32_precision", "ieee") if hasattr(m, "fp32_precision") else ("allow_tf32", False)
    prev = getattr(m, name)
    setattr(m, name, exact)
    try:
        yield
    finally:
        setattr(m, name, prev)


def _causal(rows: Tensor | None, L: int, device: torch.device) -> Tensor:
    """Boolean [R, L] (or [L, L]): key s is visible from query t iff s ≤ t."""
    t = torch.arange(L, device=device) if rows is None else rows
    return torch.arange(L, device=device) <= t.unsqueeze(-1)


def block_size_for(L: int) -> int:
    """Block length Q of the Mamba-1 full kernel: ≈ √L (a divisor of L when one is near).

    The kernel's temporaries grow as L·Q·N (diagonal blocks) + L·(L/Q)·N (off-diagonal factors), which is
    smallest at Q = √L; a divisor avoids padding and the extra copy of the cropped result.
    """
    r = math.sqrt(L)
    divisors = [q for q in range(max(1, math.ceil(r / 2)), int(2 * r) + 1) if L % q == 0]
    if divisors:
        return min(divisors, key=lambda q: abs(q - r))
    return 2 ** round(math.log2(r))


def s6_attention(
    dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, rows: Tensor | None = None, block_size: int | None = None,
) -> Tensor:
    """Mamba-1 hidden attention α of every given channel (no D, no mask).

    dt [b, L, c] (Δ of the chosen channels); A [c, N]; B, C [b, L, N].  Returns α [b, c, L, L], or
    [b, c, R, L] for ``rows`` (a LongTensor of R query positions in 0..L-1; only those rows are computed).
    Formula: module docstring (Ali et al. 2024).  ``block_size`` overrides :func:`block_size_for` (tests).
    """
    if dt.dim() != 3 or A.dim() != 2 or A.shape[0] != dt.shape[2] or B.shape != C.shape or B.dim() != 3:
        raise ValueError(f"s6_attention wants dt [b,L,c], A [c,N], B, C [b,L,N]; got dt {tuple(dt.shape)}, "
                         f"A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}")
    wd = _work_dtype(dt, A, B, C)
    dtT = dt.transpose(1, 2).to(wd)
    P = dt.transpose(1, 2).double().cumsum(-1)
    A, B, C = A.to(device=dt.device, dtype=wd), B.to(wd), C.to(wd)
    if rows is not None:
        return _s6_rows(dtT, P, A, B, C, rows.to(dt.device))
    return _s6_full(dtT, P, A, B, C, block_size or block_size_for(dt.shape[1]))


def _s6_rows(dt: Tensor, P: Tensor, A: Tensor, B: Tensor, C: Tensor, rows: Tensor) -> Tensor:
    """Rows of α directly: dt [b,c,L] (work dtype), P [b,c,L] fp64 prefix sums of Δ, A [c,N], B,C [b,L,N]."""
    c, L = dt.shape[1:]
    S = _pairwise_diff(P, rows, dt.dtype).clamp_min_(0)  # Σ_{k=s+1..t} Δ_k; clamp zeroes s > t (masked below)
    E = S.unsqueeze(-1) * A.view(1, c, 1, 1, -1)  # [b, c, R, L, N], ≤ 0
    del S
    E.exp_().mul_((C[:, rows].unsqueeze(2) * B.unsqueeze(1)).unsqueeze(1))
    alpha = E.sum(-1).mul_(dt.unsqueeze(2))
    return alpha.masked_fill_(~_causal(rows, L, dt.device), 0)


def _s6_full(dt: Tensor, P: Tensor, A: Tensor, B: Tensor, C: Tensor, Q: int, out: Tensor | None = None) -> Tensor:
    """Full α [b, c, L, L] by blocks of Q positions, the SSD chunking (Dao & Gu 2024, §6) applied to α itself.

    For t in block i, s in block j < i, the segment splits at the block edges e_j (last of block j) and
    i0−1 (just before block i), all three pieces ≥ 0, so
        α[t, s] = Σ_n Ĉ[t, n] · G[i, j, n] · B̂[s, n]
    with Ĉ = C·exp(A·(P_t − P_{i0−1})), G = exp(A·(P_{i0−1} − P_{e_j})), B̂ = Δ_s·B_s·exp(A·(P_{e_j} − P_s)):
    one batched matmul of rank N per block pair instead of L²·N exponentials.  Each factor is ≤ 1 and at
    least the product, so a representable α is never lost to underflow of a factor.  Diagonal blocks
    (segments that cannot be split) take exp of the segment sums directly.  ``out`` [b, c, L, L] receives
    the result when given (saves one copy).
    """
    b, c, L = dt.shape
    N = A.shape[-1]
    wd = dt.dtype
    nb = -(-L // Q)
    Lp = nb * Q
    pad = Lp - L
    if pad:  # Δ = 0, B = C = 0 on the tail: no decay, no contribution; cropped at the end
        dt = F.pad(dt, (0, pad))
        P = torch.cat([P, P[..., -1:].expand(b, c, pad)], dim=-1)
        B, C = F.pad(B, (0, 0, 0, pad)), F.pad(C, (0, 0, 0, pad))
    Pq = P.reshape(b, c, nb, Q)
    dtq = dt.reshape(b, c, nb, Q)
    Bq, Cq = B.reshape(b, 1, nb, Q, N), C.reshape(b, 1, nb, Q, N)
    # Diagonal blocks: exp of the in-block segment sums, contracted over n.
    S = _pairwise_diff(Pq, None, wd).clamp_min_(0)  # [b, c, nb, Q(t), Q(s)]
    E = S.unsqueeze(-1) * A.view(1, c, 1, 1, 1, N)
    del S
    E.exp_().mul_(Cq.unsqueeze(-2) * Bq.unsqueeze(-3))
    diag = E.sum(-1).mul_(dtq.unsqueeze(-2))
    del E
    diag.masked_fill_(~_causal(None, Q, dt.device), 0)
    if nb == 1:
        alpha = diag.view(b, c, Q, Q)
    else:
        A4 = A.view(1, c, 1, 1, N)
        P_end = Pq[..., -1]  # P at the last position of each block [b, c, nb]
        P_before = F.pad(P_end[..., :-1], (1, 0))  # P just before each block (0 before the first)
        C_hat = torch.exp((Pq - P_before.unsqueeze(-1)).to(wd).unsqueeze(-1) * A4).mul_(Cq)
        B_hat = torch.exp((P_end.unsqueeze(-1) - Pq).to(wd).unsqueeze(-1) * A4).mul_(Bq).mul_(dtq.unsqueeze(-1))
        gap = (P_before.unsqueeze(-1) - P_end.unsqueeze(-2)).clamp_min_(0).to(wd)  # [b, c, i, j]
        G = torch.exp(gap.unsqueeze(-1) * A4)  # [b, c, i, j, N]
        G.masked_fill_(~torch.ones(nb, nb, dtype=torch.bool, device=dt.device).tril(-1).unsqueeze(-1), 0)
        # left[b, c, j, i, q, n] = Ĉ[i, q, n]·G[i, j, n]: batch over (b, c, j), rows (i, q), contract n.
        left = torch.empty(b, c, nb, nb, Q, N, dtype=wd, device=dt.device)  # contiguous for the view below
        torch.mul(G.transpose(2, 3).unsqueeze(-2), C_hat.unsqueeze(2), out=left)
        with _ieee_matmul(left):
            Y = torch.matmul(left.view(b * c * nb, nb * Q, N), B_hat.view(b * c * nb, Q, N).transpose(1, 2))
        del left
        Y = Y.view(b, c, nb, nb, Q, Q)  # [b, c, j, i, q, k]
        torch.diagonal(Y, dim1=2, dim2=3).add_(diag.permute(0, 1, 3, 4, 2))
        blocks = Y.permute(0, 1, 3, 4, 2, 5)  # [b, c, i, q, j, k]
        if out is not None and not pad:
            out.view(b, c, nb, Q, nb, Q).copy_(blocks)
            return out
        alpha = blocks.reshape(b, c, Lp, Lp)
    if pad:
        alpha = alpha[..., :L, :L]
    if out is not None:
        return out.copy_(alpha)
    return alpha.contiguous()


def ssd_attention(dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, rows: Tensor | None = None) -> Tensor:
    """Mamba-2 hidden attention α of every given head (no D, no mask).

    dt [b, L, h]; A [h]; B, C [b, L, h, N], each head's group already selected (``B[:, :, head // (H/G)]``).
    Returns α [b, h, L, L] (or [b, h, R, L] for ``rows``).  Formula: module docstring (Dao & Gu 2024, SSD
    "attention" form; Ali et al. 2024).
    """
    if dt.dim() != 3 or A.shape != dt.shape[2:] or B.dim() != 4 or B.shape != C.shape or B.shape[2] != dt.shape[2]:
        raise ValueError(f"ssd_attention wants dt [b,L,h], A [h], B, C [b,L,h,N]; got dt {tuple(dt.shape)}, "
                         f"A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}")
    wd = _work_dtype(dt, A, B, C)
    rows = None if rows is None else rows.to(dt.device)
    logdecay = dt.transpose(1, 2).double().cumsum(-1) * A.to(dt.device).double().unsqueeze(-1)  # [b, h, L]
    return _ssd(dt.transpose(1, 2).to(wd), logdecay, B.to(wd), C.to(wd), rows)


def _ssd(dt: Tensor, logdecay: Tensor, B: Tensor, C: Tensor, rows: Tensor | None) -> Tensor:
    """dt [b,h,L] (work dtype), logdecay [b,h,L] fp64 = A_h·Σ_{k≤t}Δ_k, B, C [b,L,h,N] → [b,h,R,L]."""
    L = dt.shape[-1]
    E = _pairwise_diff(logdecay, rows, dt.dtype).clamp_max_(0).exp_()  # exp(A·Σ_{k=s+1..t}Δ_k), s ≤ t
    Cr = C if rows is None else C[:, rows]
    with _ieee_matmul(B):
        CB = torch.einsum("brhn,bshn->bhrs", Cr, B)
    E.mul_(CB).mul_(dt.unsqueeze(2))
    return E.masked_fill_(~_causal(rows, L, dt.device), 0)


# --------------------------------------------------------------------------------------- layer inputs


def _check_kind(kind: str, params: MixerParams) -> None:
    if not isinstance(params, MixerParams):
        raise TypeError(f"params must be a MixerParams (mambascope.trace.mixer_params), got {type(params).__name__}")
    if kind not in KINDS:
        raise ValueError(f"unknown hidden-attention kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if params.arch not in ("mamba", "mamba2"):
        raise ValueError(f"hidden attention kind {kind!r} needs a Mamba-1 or Mamba-2 mixer, got arch "
                         f"{params.arch!r}; transformer layers have real attention (attn.hook_pattern)")


def need_units(layer: Mapping[str, Tensor], *names: str, what: str = "hidden attention") -> list[Tensor]:
    """The layer's tensors ``names`` (unit names without ``blocks.{l}.``); KeyError naming the missing ones."""
    missing = [n for n in names if n not in layer]
    if missing:
        raise KeyError(f"{what} needs the layer tensors {', '.join(missing)} (unit names without "
                       f"'blocks.{{l}}.'); got {', '.join(sorted(layer)) or 'none'}")
    return [layer[n] for n in names]


def _as_index(sel: IndexLike, n: int, what: str, device: torch.device) -> Tensor:
    """Validated LongTensor of indices into 0..n-1; negative indices count from the end (Python style)."""
    if sel is None:
        return torch.arange(n, device=device)
    if isinstance(sel, slice):
        sel = range(n)[sel]
    if isinstance(sel, bool) or (isinstance(sel, Tensor) and sel.dtype == torch.bool):
        raise TypeError(f"{what} indices must be integers, not booleans")
    t = torch.as_tensor(sel if not isinstance(sel, range) else list(sel), device=device)
    if t.numel() == 0:
        raise ValueError(f"empty {what} selection: pass at least one index (or None for all {n})")
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"{what} indices must be integers, got {t.dtype}")
    t = t.reshape(-1).long()
    bad = (t < -n) | (t >= n)
    if bool(bad.any()):
        raise IndexError(f"{what} {int(t[bad][0])} out of range: valid are 0..{n - 1} (or -{n}..-1 from the end)")
    return t % n


@dataclass
class _Layer:
    """One layer's inputs, validated and converted once (work dtype, device, [b, unit, L] layout)."""

    arch: str
    wd: torch.dtype
    b: int
    L: int
    E: int
    H: int
    P: int
    dtT: Tensor  # Δ [b, U, L], U = E (Mamba-1) or H (Mamba-2)
    cum: Tensor  # fp64 [b, U, L]: Mamba-1 Σ_{k≤t}Δ_k; Mamba-2 A_h·Σ_{k≤t}Δ_k
    A: Tensor
    D: Tensor
    B: Tensor  # Mamba-1 [b, L, N]; Mamba-2 [b, L, G, N]
    C: Tensor
    mask: Tensor | None  # [b, L] work dtype


def _prepare(layer: Mapping[str, Tensor], params: MixerParams, attention_mask: Tensor | None) -> _Layer:
    dt, B, C = need_units(layer, "mixer.hook_dt", "mixer.hook_B", "mixer.hook_C")
    wd = _work_dtype(dt, B, C)
    dev = dt.device
    if dt.dim() != 3:
        raise ValueError(f"mixer.hook_dt must be [batch, L, units], got shape {tuple(dt.shape)}")
    b, L, U = dt.shape
    E, P = params.d_inner, params.head_dim
    if params.arch == "mamba":
        H = E
        ok = U == E and B.shape == (b, L, params.d_state) and C.shape == B.shape
        want = f"dt [b,L,{E}], B, C [b,L,{params.d_state}]"
    else:
        H = params.n_heads
        ok = U == H and B.shape == (b, L, params.n_groups, params.d_state) and C.shape == B.shape
        want = f"dt [b,L,{H}], B, C [b,L,{params.n_groups},{params.d_state}]"
    if not ok:
        raise ValueError(f"{params.arch} layer tensors do not match its params: want {want}, got dt "
                         f"{tuple(dt.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}")
    mask = None
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (b, L):
            raise ValueError(f"attention_mask must be [batch, L] = [{b}, {L}], got {tuple(attention_mask.shape)}")
        mask = attention_mask.to(device=dev, dtype=wd)
    A = params.A.to(device=dev, dtype=wd)
    cum = dt.transpose(1, 2).double().cumsum(-1)
    if params.arch == "mamba2":
        cum = cum * params.A.to(dev).double().unsqueeze(-1)
    return _Layer(params.arch, wd, b, L, E, H, P, dt.transpose(1, 2).to(wd), cum, A,
                  params.D.to(device=dev, dtype=wd), B.to(wd), C.to(wd), mask)


def _alpha_units(lay: _Layer, units: Tensor, rows: Tensor | None, out: Tensor | None = None) -> Tensor:
    """α [b, u, R, L] of Mamba-1 channels / Mamba-2 heads ``units``."""
    if lay.arch == "mamba":
        dt, cum, A = lay.dtT[:, units], lay.cum[:, units], lay.A[units]
        if rows is not None:
            return _s6_rows(dt, cum, A, lay.B, lay.C, rows)
        return _s6_full(dt, cum, A, lay.B, lay.C, block_size_for(lay.L), out=out)
    group = units // (lay.H // lay.B.shape[2])
    return _ssd(lay.dtT[:, units], lay.cum[:, units], lay.B[:, :, group], lay.C[:, :, group], rows)


def _add_diag(alpha: Tensor, values: Tensor, rows: Tensor | None) -> None:
    """α[:, u, t, t] += values[u] (in place), for the full matrix or for the query rows."""
    if rows is None:
        alpha.diagonal(dim1=-2, dim2=-1).add_(values.view(1, -1, 1))
    else:
        r = torch.arange(rows.numel(), device=alpha.device)
        alpha[:, :, r, rows] += values.view(1, -1, 1)


def _block_gates(layer: Mapping[str, Tensor], params: MixerParams, lay: _Layer) -> tuple[Tensor, Tensor]:
    """(g [b, E, L] row gate, σ(conv)·mask [b, E, L] key diagonal) of the ``block`` map."""
    (conv,) = need_units(layer, "mixer.hook_conv")
    sig = torch.sigmoid(conv.to(lay.wd))
    if lay.mask is not None:
        sig = sig * lay.mask.unsqueeze(-1)
    # SiLU(z) from z itself when traced: HF applies SiLU to z in fp32 (Mamba-2 norm) / model dtype.
    if "mixer.hook_gate_pre" in layer:
        z = layer["mixer.hook_gate_pre"].to(lay.wd)
        gate = z * torch.sigmoid(z)
    else:
        (gate,) = need_units(layer, "mixer.hook_gate")
        gate = gate.to(lay.wd)
    if lay.arch == "mamba2":
        (y,) = need_units(layer, "mixer.hook_y")
        gate = output_gate(y.to(lay.wd), gate, params)
    return gate.transpose(1, 2).contiguous(), sig.transpose(1, 2).contiguous()


def output_gate(y: Tensor, gate: Tensor, params: MixerParams) -> Tensor:
    """The per-channel factor e [b, L, E] with post = e ⊙ y, given y and SiLU(z) [b, L, E].

    Mamba-1, and Mamba-2 mixers without a norm (Falcon-H1): e = SiLU(z).
    Mamba-2 (HF MambaRMSNormGated): e = norm_weight ⊙ SiLU(z) ⊙ r with the
    per-token, per-group scale r = rsqrt(mean_group((y ⊙ SiLU z)²) + eps) read as a diagonal.
    """
    if params.arch != "mamba2" or params.norm_weight is None:
        return gate
    b, L, E = y.shape
    v = (y * gate).reshape(b, L, params.n_groups, -1)
    r = torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + params.norm_eps)
    norm_w = params.norm_weight.to(device=gate.device, dtype=gate.dtype)
    return norm_w * (gate.reshape(v.shape) * r).reshape(b, L, E)


def conv_toeplitz_right(W: Tensor, weight: Tensor) -> Tensor:
    """W · T for W [b, c, R, L] and T the causal depthwise conv of taps ``weight`` [c, K] as a Toeplitz
    matrix: (W·T)[t, j] = Σ_k W[t, j+k]·weight[K−1−k] (conv output j+k reads input j through tap K−1−k)."""
    K, L = weight.shape[1], W.shape[-1]
    out = W * weight[:, K - 1].view(1, -1, 1, 1)
    for k in range(1, min(K, L)):  # K ≤ 4 taps, not a loop over positions
        out[..., : L - k].addcmul_(W[..., k:], weight[:, K - 1 - k].view(1, -1, 1, 1))
    return out


def _block_rows(lay: _Layer, params: MixerParams, channels: Tensor, rows: Tensor | None,
                gate: Tensor, sig: Tensor) -> Tensor:
    """M [b, c, R, L] of the ``block`` map for ``channels``: diag(g)·(α + D)·diag(σ(conv)·m)·Conv."""
    if lay.arch == "mamba":
        alpha = _alpha_units(lay, channels, rows)
        D = lay.D[channels]
    else:
        heads = channels // lay.P
        uniq, inverse = torch.unique(heads, return_inverse=True)  # one α per head, shared by its channels
        alpha = _alpha_units(lay, uniq, rows)[:, inverse]
        D = lay.D[heads]
    _add_diag(alpha, D, rows)
    alpha.mul_(sig[:, channels].unsqueeze(2))  # W[t, s] = (α + D)[t, s]·σ(c_s)·m_s
    M = conv_toeplitz_right(alpha, params.conv_weight.to(device=alpha.device, dtype=lay.wd)[channels])
    g = gate[:, channels] if rows is None else gate[:, channels][..., rows]
    return M.mul_(g.unsqueeze(-1))


# ----------------------------------------------------------------------------------------- memory


def available_bytes(device: torch.device | str) -> int:
    """Memory a new tensor on ``device`` can use: free + PyTorch-cached memory on CUDA, MemAvailable on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        import psutil  # optional; not a dependency

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class AttentionPlan(NamedTuple):
    """How :func:`hidden_attention` will run a request (all sizes in bytes)."""

    result_shape: tuple[int, ...]
    result_bytes: int
    fixed_bytes: int  # prepared inputs and per-chunk temporaries shared by all channels
    unit_bytes: int  # working memory per channel (head) in a chunk
    available: int  # max_bytes, or the device's available memory
    chunk: int  # channels (heads) per chunk
    n_chunks: int


def _plan(lay: _Layer, kind: str, n_units: int, R: int, full: bool, reduce: str | None,
          max_bytes: int | None, N: int, device: torch.device) -> AttentionPlan:
    es = 8 if lay.wd == torch.float64 else 4
    b, L = lay.b, lay.L
    shape = (b, R, L) if reduce else (b, n_units, R, L)
    result = es * math.prod(shape)
    # Element counts of the temporaries, upper bounds read off the kernels above.
    if lay.arch == "mamba" and full:
        Q = block_size_for(L)
        nb = -(-L // Q)
        Lp = nb * Q
        unit = 3 * Lp * Lp + Lp * Q * (N + 2) + nb * Lp * N + 3 * Lp * N + nb * nb * N
        fixed = Lp * Q * N + 2 * Lp * N
    elif lay.arch == "mamba":
        unit, fixed = R * L * (N + 2), R * L * N
    else:
        unit, fixed = 5 * R * L, 0
    if kind == "block":
        unit += 3 * R * L
        fixed += 2 * lay.E * L
    if reduce:
        unit += R * L
    unit_bytes = es * b * unit
    fixed_bytes = es * b * fixed + (8 + es) * b * lay.dtT.shape[1] * L  # + prepared Δ and fp64 prefix sums
    available = int(max_bytes) if max_bytes is not None else available_bytes(device)
    work = available - result - fixed_bytes
    if work < unit_bytes:
        options = []
        if R == L:
            options.append("rows=[...] (only some query positions)")
        if n_units > 1:
            options.append("channels=[...] (a subset)")
        if reduce is None:
            options.append("reduce='mean'|'absmean'|'normalized' (one [b, L, L] channel reduction)")
        source = "max_bytes" if max_bytes is not None else f"available {device.type} memory"
        raise AttentionMemoryError(
            f"hidden attention kind={kind!r} would need {result / 1e9:.2f} GB for its result "
            f"{list(shape)} ({str(lay.wd).replace('torch.', '')}) plus at least "
            f"{(fixed_bytes + unit_bytes) / 1e9:.2f} GB of working memory, more than the "
            f"{available / 1e9:.2f} GB of {source}. "
            + ("Ask for less: " + "; or ".join(options) + "." if options else "Pass a larger max_bytes.")
        )
    if max_bytes is None:
        work = min(work // 2, DEFAULT_WORK_BYTES)  # leave room for the rest of the program
    chunk = max(1, min(n_units, work // unit_bytes))
    return AttentionPlan(shape, result, fixed_bytes, unit_bytes, available, chunk, -(-n_units // chunk))


def _units_for(kind: str, params: MixerParams) -> tuple[int, str]:
    if kind == "block" or params.arch == "mamba":
        return params.d_inner, "channel"
    return params.n_heads, "head"


def attention_plan(
    layer: Mapping[str, Tensor], params: MixerParams, kind: str = "s6", *, channels: IndexLike = None,
    rows: IndexLike = None, reduce: str | None = None, attention_mask: Tensor | None = None,
    max_bytes: int | None = None,
) -> AttentionPlan:
    """The result size and channel chunking :func:`hidden_attention` would use (raises the same errors)."""
    return _setup(layer, params, kind, channels, rows, reduce, attention_mask, max_bytes)[-1]


def _setup(
    layer: Mapping[str, Tensor], params: MixerParams, kind: str, channels: IndexLike, rows: IndexLike,
    reduce: str | None, attention_mask: Tensor | None, max_bytes: int | None,
) -> tuple[_Layer, Tensor, Tensor | None, AttentionPlan]:
    _check_kind(kind, params)
    if reduce is not None and reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduce {reduce!r}; valid: None, {', '.join(map(repr, REDUCTIONS))}")
    lay = _prepare(layer, params, attention_mask)
    dev = lay.dtT.device
    n_units, what = _units_for(kind, params)
    units = _as_index(channels, n_units, what, dev)
    row_idx = None if rows is None else _as_index(rows, lay.L, "query row", dev)
    R = lay.L if row_idx is None else row_idx.numel()
    plan = _plan(lay, kind, units.numel(), R, row_idx is None, reduce, max_bytes, params.d_state, dev)
    return lay, units, row_idx, plan


# ------------------------------------------------------------------------------------------ public


def hidden_attention(
    layer: Mapping[str, Tensor], params: MixerParams, kind: str = "s6", *, channels: IndexLike = None,
    rows: IndexLike = None, reduce: str | None = None, attention_mask: Tensor | None = None,
    max_bytes: int | None = None,
) -> Tensor:
    """Exact hidden attention of one Mamba mixer layer.

    layer: the traced tensors of the layer keyed by unit name without ``blocks.{l}.`` (see
      ``Trace.layer``): ``mixer.hook_dt``, ``mixer.hook_B``, ``mixer.hook_C`` for every kind; ``block``
      also needs ``mixer.hook_conv`` and ``mixer.hook_gate_pre`` (or ``mixer.hook_gate``), and on Mamba-2
      ``mixer.hook_y`` (for the RMSNorm scale).
    params: the layer's :class:`~mambascope.ssm.params.MixerParams`.
    kind: ``"s6"`` α; ``"s6+D"`` α + diag(D); ``"block"`` the map M from pre-conv x to ``post`` (per channel,
      Mamba-2 too); its bias term is :func:`block_bias`, so ``post = M·x + bias``.
    channels: Mamba-1 channels, Mamba-2 heads (s6, s6+D) or channels (block); default all; negative
      indices count from the end.
    rows: query positions (int, sequence, slice or LongTensor; negative from the end); only these rows are
      computed.
    reduce: ``"mean"`` (mean over the chosen channels), ``"absmean"`` (mean of |·|) or ``"normalized"``
      (mean over channels of each channel's row divided by that row's L1 norm Σ_s|α[t, s]|; all-zero rows
      stay 0); computed chunk by chunk, never holding all channels.
    attention_mask: [b, L], 1 = token, 0 = padding (left or right); padded key columns are zero.
    max_bytes: memory the call may use (result + work); default the device's available memory, with work
      capped at :data:`DEFAULT_WORK_BYTES`.

    Returns fp32 (fp64 for fp64 inputs) on the inputs' device: [b, C', L, L], [b, C', R, L] with rows,
    [b, L, L] / [b, R, L] with reduce.  Raises ValueError (unknown kind/reduce, non-Mamba params, shapes),
    KeyError (missing tensors), IndexError (row/channel out of range), AttentionMemoryError (too large).
    """
    lay, units, row_idx, plan = _setup(layer, params, kind, channels, rows, reduce, attention_mask, max_bytes)
    if kind == "block":
        gate, sig = _block_gates(layer, params, lay)
    out = torch.zeros(plan.result_shape, dtype=lay.wd, device=lay.dtT.device)
    for start in range(0, units.numel(), plan.chunk):
        idx = units[start:start + plan.chunk]
        target = None if reduce else out[:, start:start + plan.chunk]
        if kind == "block":
            a = _block_rows(lay, params, idx, row_idx, gate, sig)
        else:
            a = _alpha_units(lay, idx, row_idx, out=target)
            if kind == "s6+D":
                _add_diag(a, lay.D[idx], row_idx)
        if lay.mask is not None:
            a.mul_(lay.mask.view(lay.b, 1, 1, lay.L))  # padded keys: zero attention
        if reduce is None:
            if a.data_ptr() != target.data_ptr():
                target.copy_(a)
        elif reduce == "mean":
            out += a.sum(1)
        elif reduce == "absmean":
            out += a.abs_().sum(1)
        else:
            norm = a.abs().sum(-1, keepdim=True)
            out += a.div_(torch.where(norm > 0, norm, torch.ones_like(norm))).sum(1)
        del a
    if reduce:
        out /= units.numel()
    return out


def block_bias(
    layer: Mapping[str, Tensor], params: MixerParams, *, channels: IndexLike = None, rows: IndexLike = None,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """The conv-bias term of the ``block`` map: post[t, e] = Σ_j M_e[t, j]·x[j, e] + bias[e, t].

    bias_e[t] = g_e[t] · Σ_s (α + D)[t, s] · σ(conv_s)·m_s · conv_bias[e], evaluated with the O(L) scans of
    :mod:`mambascope.ssm.scan` on the input σ(conv)·m·conv_bias (zero when the conv has no bias).
    Returns [b, C', L] (or [b, C', R] with rows), same dtype rules as :func:`hidden_attention`.
    """
    lay, units, row_idx, _ = _setup(layer, params, "block", channels, rows, None, attention_mask, 1 << 62)
    gate, sig = _block_gates(layer, params, lay)
    beta = params.conv_bias
    # v = σ(conv)·m·conv_bias: the part of u that does not depend on x.
    v = sig * (0.0 if beta is None else beta.to(device=sig.device, dtype=lay.wd).view(1, -1, 1))
    v = v.transpose(1, 2)  # [b, L, E]
    dt = lay.dtT.transpose(1, 2)
    if lay.arch == "mamba":
        y = selective_scan(v, dt, lay.A, lay.B, lay.C) + lay.D * v
    else:
        y = ssd_scan(v.reshape(lay.b, lay.L, lay.H, lay.P), dt, lay.A, lay.B, lay.C).reshape(lay.b, lay.L, lay.E)
        y = y + lay.D.repeat_interleave(lay.P) * v
    bias = (gate * y.transpose(1, 2))[:, units]
    return bias if row_idx is None else bias[..., row_idx]
