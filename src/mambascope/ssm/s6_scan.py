"""The Mamba-1 selective scan as one autograd node: a sequential forward and a hand-written reverse scan.

Autograd through a scan written in PyTorch ops keeps one node per position (a loop) or O(L log L)
intermediates (a doubling scan), and its backward moves far more memory than the arithmetic needs.  This
module does what the released CUDA kernel does (``selective_scan_bwd`` in state-spaces/mamba): the forward
runs the recurrence once and keeps only the states h_t; the backward runs the recurrence for ∂L/∂h_t
backwards in time and forms each position's gradients in closed form as it passes.  Memory is
O(L·b·E·N) for the states (two states without autograd) plus three [b, N, E] work buffers; each
direction is one Python loop over the L positions.

Forward (Gu & Dao 2023, Alg. 2, B̄ = Δ·B):  a_t = Δ_t ⊗ A,  x_t = (Δ_t·u_t) ⊗ B_t,
h_t = exp(a_t) ⊙ h_{t-1} + x_t,  y_t[e] = Σ_n C_t[n]·h_t[e, n],  h_{-1} = initial state (0 if None).

Backward, with G_t = ∂L/∂h_t (total derivative):
G_t = gy_t ⊗ C_t + exp(a_{t+1}) ⊙ G_{t+1}  (G_{L-1} also gets the last state's gradient);
∂L/∂x_t = G_t;  ∂L/∂a_t = G_t ⊙ exp(a_t) ⊙ h_{t-1};  ∂L/∂h_{-1} = exp(a_0) ⊙ G_0;  ∂L/∂C_t = Σ_e gy_t[e]·h_t[e];
then the chain rule through a_t = Δ_t·A and x_t = Δ_t·u_t·B_t.  Decays are only ever exp(Δ·A) ≤ 1 of a
single step, never ratios, so nothing overflows for long L or large Δ·A.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

# ATen's grain size (at::internal::GRAIN_SIZE): elementwise ops on fewer elements gain nothing from threads
SMALL_SLICE = 1 << 15


@contextmanager
def _loop_threads(work: Tensor) -> Iterator[None]:
    """One intra-op thread while the loops run on CPU [b, N, E] slices (``work``) of at most ``SMALL_SLICE``
    elements.

    Each position costs a handful of ops on its slice; on a slice this small, waking a second thread for
    every op costs more than the op (batch 8, E 256, N 16, L 128 on 2 cores: 17 ms with two threads,
    9 ms with one; ``benchmarks/bench_scan_threads.py``), and a busy second core stalls every op.
    """
    threads = torch.get_num_threads()
    if threads == 1 or work.device.type != "cpu" or work.numel() > SMALL_SLICE:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _S6Scan(torch.autograd.Function):
    """Position-major, state-dimension-major inputs, all contiguous and of one dtype:
    u, dt [L, b, 1, E]; At = Aᵀ [N, E]; B, C [L, b, N, 1]; h0 [b, N, E] or None → y [L, b, E], h_{L-1} [b, N, E].

    E is the innermost axis of every [.., N, E] buffer, so the outer products Δ⊗A and (Δu)⊗B broadcast
    along whole rows of E (vectorised) rather than along the short N.  Both directions do all the work of
    one position on its [b, N, E] slice before moving on, so that slice stays in the core's cache; a pass
    over the whole [L, b, N, E] per operation instead runs at memory speed and took 1.1–1.2× as long per
    training step (measured side by side).
    """

    @staticmethod
    def forward(ctx, u: Tensor, dt: Tensor, At: Tensor, B: Tensor, C: Tensor,  # type: ignore[override]
                h0: Tensor | None) -> tuple[Tensor, Tensor]:
        L, b, _, E = u.shape
        save = any(ctx.needs_input_grad)
        # with autograd every h_t is kept for the backward; without, only the last two
        states = u.new_empty(L if save else 2, b, At.shape[0], E)
        decay = u.new_empty(b, At.shape[0], E)
        dtu = dt * u
        y = u.new_empty(L, b, 1, E)
        h = h0
        with _loop_threads(decay):
            for t in range(L):
                h_t = states[t if save else t % 2]
                torch.mul(B[t], dtu[t], out=h_t)  # x_t = (Δ_t u_t) ⊗ B_t
                if h is not None:
                    h_t.addcmul_(torch.mul(dt[t], At, out=decay).exp_(), h)
                torch.matmul(C[t].transpose(-1, -2), h_t, out=y[t])  # Σ_n C_t[n]·h_t[n, e]
                h = h_t
        if save:
            ctx.save_for_backward(u, dt, At, B, C, h0, states)
        ctx.set_materialize_grads(False)
        return y.squeeze(2), h.clone()

    @staticmethod
    def backward(ctx, gy: Tensor | None, g_last: Tensor | None):  # type: ignore[override]
        u, dt, At, B, C, h0, states = ctx.saved_tensors
        L, b, N, E = states.shape
        need_u, need_dt, need_A, need_B, need_C, need_h0 = ctx.needs_input_grad
        gy = None if gy is None else gy.unsqueeze(2).contiguous()  # [L, b, 1, E]
        dtu = dt * u if need_B else None
        GB = states.new_zeros(L, b, 1, E) if need_u or need_dt else None  # Σ_n ∂L/∂x_t[n, e]·B_t[n]
        ga_dt = states.new_zeros(L, b, 1, E) if need_dt else None  # Σ_n ∂L/∂a_t[n, e]·A[e, n]
        gB = torch.zeros_like(B) if need_B else None
        gC = torch.zeros_like(C) if need_C else None
        gA_sum = states.new_zeros(b, N, E) if need_A else None  # Σ_t ∂L/∂a_t·Δ_t, summed over b at the end
        G = states.new_zeros(b, N, E) if g_last is None else g_last.clone()  # ∂L/∂h_t, from t = L-1 down
        decay, decay_next, ga = states.new_empty(3, b, N, E)
        with _loop_threads(G):
            for t in range(L - 1, -1, -1):
                if t < L - 1:
                    G.mul_(decay_next)  # exp(a_{t+1}) ⊙ G_{t+1}
                if gy is not None:
                    G.addcmul_(C[t], gy[t])  # + gy_t ⊗ C_t
                    if need_C:
                        torch.matmul(states[t], gy[t].transpose(-1, -2), out=gC[t])  # Σ_e gy_t[e]·h_t[n, e]
                torch.mul(dt[t], At, out=decay).exp_()
                if GB is not None:
                    torch.matmul(B[t].transpose(-1, -2), G, out=GB[t])
                if need_B:
                    torch.matmul(G, dtu[t].transpose(-1, -2), out=gB[t])  # Σ_e ∂L/∂x_t[n, e]·Δ_t[e]·u_t[e]
                h_prev = states[t - 1] if t > 0 else h0
                if (need_dt or need_A) and h_prev is not None:
                    torch.mul(G, decay, out=ga).mul_(h_prev)  # ∂L/∂a_t = G_t ⊙ exp(a_t) ⊙ h_{t-1}
                    if need_A:
                        gA_sum.addcmul_(ga, dt[t])
                    if need_dt:
                        torch.sum(ga.mul_(At), 1, keepdim=True, out=ga_dt[t])
                decay, decay_next = decay_next, decay
        # the chain rule through a_t = Δ_t·A and x_t = Δ_t·u_t·B_t
        gu = GB * dt if need_u else None
        gdt = torch.addcmul(ga_dt, GB, u) if need_dt else None
        gA = gA_sum.sum(0) if need_A else None
        g_h0 = decay_next * G if need_h0 else None  # ∂L/∂h_{-1} = exp(a_0) ⊙ G_0
        return gu, gdt, gA, gB, gC, g_h0


def s6_scan(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
            initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mamba-1 scan with an O(L) hand-written backward (see the module docstring for the formulas).

    u, dt [b, L, E]; A [E, N]; B, C [b, L, N]; initial_state [b, E, N] or None; all of one floating dtype.
    Returns (y [b, L, E] without the skip term D·u, h_{L-1} [b, E, N]), differentiable in every input.
    """
    # to the layouts of _S6Scan (copies of the [b, L, E] inputs, small next to the [L, b, N, E] states)
    u, dt = (t.transpose(0, 1).unsqueeze(2).contiguous() for t in (u, dt))
    B, C = (t.transpose(0, 1).unsqueeze(-1).contiguous() for t in (B, C))
    h0 = None if initial_state is None else initial_state.transpose(1, 2).contiguous()
    y, last = _S6Scan.apply(u, dt, A.T.contiguous(), B, C, h0)
    return y.transpose(0, 1), last.transpose(1, 2)
