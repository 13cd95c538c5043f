"""Selective scans of Mamba-1 (S6) and Mamba-2 (SSD), in pure PyTorch.

Both return the scan output *without* the skip term D·u; the caller adds it, so that the tracer can
expose y exactly as the model computes it.  Decays are formed in log space (Δ·A ≤ 0) and only ever
exponentiated as non-positive sums, so long sequences and large Δ·A underflow to 0 instead of
overflowing (never ratios of cumulative products).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambascope.ssm.s6_scan import s6_scan


def selective_scan(
    u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, *,
    parallel: bool | None = None, initial_state: torch.Tensor | None = None, return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1 scan (Gu & Dao 2023, Alg. 2, with B̄ = Δ·B as in the released kernels).

    h_t = exp(Δ_t·A) ⊙ h_{t-1} + Δ_t·B_t·u_t,   y_t = C_t · h_t,   h_{-1} = ``initial_state`` (default 0).

    Args: u, dt [b, L, E]; A [E, N]; B, C [b, L, N]; initial_state [b, E, N] or None.
    Returns y [b, L, E] in fp32 (fp64 if u is fp64), and with ``return_state`` also h_{L-1} [b, E, N],
    so that a sequence scanned in segments, each starting from the last one's state, is the whole scan.
    The default is the sequential recurrence of :func:`mambascope.ssm.s6_scan.s6_scan`, one fused in-place
    multiply-add per step with a hand-written O(L) backward: every gradient (training, the gradient-based
    analyses) goes through it.  ``parallel``: a log-depth (Hillis–Steele) scan instead, the default only on
    CUDA when autograd need not see the scan (its autograd graph keeps O(L log L) intermediates).
    """
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, dt, A, B, C = (t.to(dtype) for t in (u, dt, A, B, C))
    h0 = None if initial_state is None else initial_state.to(dtype)
    if parallel is None:
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (u, dt, A, B, C, h0))
        parallel = u.is_cuda and not needs_grad
    if not parallel:
        y, last = s6_scan(u, dt, A, B, C, h0)
        return (y, last) if return_state else y
    # Position-major [L, b, E, N] keeps each step's slice contiguous.
    log_decay = (dt.unsqueeze(-1) * A).transpose(0, 1)
    inputs = ((dt * u).unsqueeze(-1) * B.unsqueeze(2)).transpose(0, 1)
    if h0 is not None:
        # h_0 = exp(Δ_0·A) ⊙ h_{-1} + x_0: fold the initial state into the first input
        first = inputs[0] + log_decay[0].exp() * h0
        inputs = torch.cat([first[None], inputs[1:]])
    states = _doubling_scan(log_decay, inputs)
    y = torch.einsum("lben,bln->ble", states, C)
    return (y, states[-1]) if return_state else y


def _doubling_scan(log_decay: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Inclusive scan of the affine maps h ↦ exp(a)·h + x along dim 0 in ⌈log2 L⌉ steps."""
    a, x = log_decay, inputs
    step = 1
    while step < a.shape[0]:  # out of place, so autograd can differentiate through it
        x = torch.cat([x[:step], x[step:] + a[step:].exp() * x[:-step]])
        a = torch.cat([a[:step], a[step:] + a[:-step]])
        step *= 2
    return x


def segment_sum(a: torch.Tensor) -> torch.Tensor:
    """S[..., t, s] = Σ_{k=s+1..t} a[..., k] for s ≤ t, −inf above the diagonal.

    A difference of cumulative sums taken in float64 and rounded once, so its error is relative to the
    segment itself even when the running sums grow large (an fp32 difference would not be).
    """
    Q = a.shape[-1]
    cum = a.double().cumsum(-1)
    sums = (cum[..., :, None] - cum[..., None, :]).to(a.dtype)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril()
    return sums.masked_fill(~causal, -torch.inf)


def ssd_scan(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, *,
    chunk_size: int = 64, initial_state: torch.Tensor | None = None, return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2 state-space dual scan, chunked (Dao & Gu 2024, §6 "SSD algorithm").

    h_t = exp(Δ_t·A_h)·h_{t-1} + Δ_t·B_t ⊗ x_t,  y_t = C_t · h_t, per head h;  h_{-1} = ``initial_state``
    (default 0; it enters as the first chunk's start state, as in the released ``mamba_chunk_scan``).

    Args: x [b, L, H, P]; dt [b, L, H]; A [H]; B, C [b, L, G, N] (head h reads group h // (H/G));
    initial_state [b, H, P, N] or None.  Returns y [b, L, H, P] in fp32 (fp64 for fp64 x), and with
    ``return_state`` also h_{L-1} [b, H, P, N].
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    b, L, H, P = x.shape
    G = B.shape[2]
    x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
    B = B.repeat_interleave(H // G, dim=2)
    C = C.repeat_interleave(H // G, dim=2)
    pad = (-L) % chunk_size
    if pad:
        # Zero Δ on the padded tail: decay 1 and no input, so earlier states are untouched.
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    nc = (L + pad) // chunk_size
    x, dt, B, C = (t.reshape(b, nc, chunk_size, *t.shape[2:]) for t in (x, dt, B, C))

    a = (dt * A).permute(0, 3, 1, 2)  # [b, H, c, Q]
    a_cum = a.cumsum(-1)
    xdt = x * dt.unsqueeze(-1)
    # Within each chunk: the quadratic (attention-like) form.
    decay = segment_sum(a).exp()  # [b, H, c, Q, Q]
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * decay
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)
    # Across chunks: each chunk's contribution to the state at its end, then a short recurrence.
    to_end = (a_cum[..., -1:] - a_cum).exp()  # [b, H, c, Q]
    chunk_states = torch.einsum("bcshn,bhcs,bcshp->bchpn", B, to_end, xdt)
    chunk_decay = a_cum[..., -1].exp()  # [b, H, c]
    state = torch.zeros_like(chunk_states[:, 0]) if initial_state is None else initial_state.to(dtype)
    starts = []
    for c in range(nc):
        starts.append(state)
        state = chunk_decay[:, :, c, None, None] * state + chunk_states[:, c]
    start_states = torch.stack(starts, dim=1)  # [b, c, H, P, N]
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, start_states, a_cum.exp())
    y = y.reshape(b, nc * chunk_size, H, P)[:, :L]
    # the padded tail has decay 1 and no input, so the last chunk's end state is h_{L-1}
    return (y, state) if return_state else y
