"""The Mamba-1 scan with a hand-written backward (ssm/s6_scan.py) against the loop reference's autograd.

The reference (``ssm.reference.mamba1_scan``) is a Python loop over positions whose gradients come from
PyTorch's autograd; the scan under test computes its backward by hand.  In float64 both must agree to
1e-10 (outputs and gradients w.r.t. u, Δ, A, B, C and the initial state), whatever the chunking, with left
padding and with an initial state.  In float32 the outputs must agree with the float64 reference within a
bound derived from the arithmetic.
"""

from __future__ import annotations

import pytest
import torch

from mambascope.models.train import _training_scan, hf_selective_scan
from mambascope.ssm import selective_scan
from mambascope.ssm.reference import mamba1_scan, random_mixer

F64 = torch.float64


def _inputs(b: int = 2, L: int = 13, E: int = 5, N: int = 4, seed: int = 0, pad: int = 0,
            dtype: torch.dtype = F64) -> dict[str, torch.Tensor]:
    """u, dt, A, B, C of a random Mamba-1 layer (u = SiLU(conv)·mask, so padding is zero as in the model), h0."""
    layer, params, _ = random_mixer("mamba", batch=b, length=L, d_inner=E, d_state=N, seed=seed, pad=(pad, 0),
                                    dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    return {"u": layer["mixer.hook_ssm_input"], "dt": layer["mixer.hook_dt"], "A": params.A,
            "B": layer["mixer.hook_B"], "C": layer["mixer.hook_C"],
            "h0": torch.randn(b, E, N, generator=g, dtype=F64).to(dtype)}


def _grads(fn, inputs: dict[str, torch.Tensor], use_h0: bool, seed: int = 2):
    """(y, h_last, gradients of Σ w·y + Σ w'·h_last w.r.t. u, Δ, A, B, C[, h0]) of ``fn``."""
    names = ["u", "dt", "A", "B", "C"] + (["h0"] if use_h0 else [])
    leaves = {k: inputs[k].clone().requires_grad_() for k in names}
    y, last = fn(**leaves)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(y.shape, generator=g, dtype=F64).to(y.dtype)
    w_last = torch.randn(last.shape, generator=g, dtype=F64).to(y.dtype)
    grads = torch.autograd.grad((y * w).sum() + (last * w_last).sum(), [leaves[k] for k in names])
    return y, last, dict(zip(names, grads, strict=True))


def _reference(u, dt, A, B, C, h0=None):
    states: list[torch.Tensor] = []
    y = mamba1_scan(u, dt, A, B, C, torch.zeros(u.shape[-1], dtype=u.dtype), initial_state=h0, states=states)
    return y, states[-1]


def _fast(u, dt, A, B, C, h0=None):
    return selective_scan(u, dt, A, B, C, initial_state=h0, return_state=True)


@pytest.mark.parametrize("use_h0,pad", [(False, 0), (True, 0), (False, 4), (True, 4)])
def test_outputs_and_gradients_equal_the_loop_reference_fp64(use_h0, pad):
    inputs = _inputs(pad=pad)
    if pad:
        assert bool((inputs["u"][0, :pad] == 0).all()) and bool((inputs["dt"][0, :pad] > 0).all())
    y_ref, last_ref, g_ref = _grads(_reference, inputs, use_h0)
    y, last, g = _grads(_fast, inputs, use_h0)
    assert y.dtype == F64
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, last_ref, rtol=1e-10, atol=1e-10)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-10, atol=1e-10, msg=f"gradient w.r.t. {name}")


def test_gradcheck_with_initial_state():
    x = _inputs(b=2, L=7, E=3, N=4, pad=2)
    args = tuple(x[k].clone().requires_grad_() for k in ("u", "dt", "A", "B", "C", "h0"))
    assert torch.autograd.gradcheck(lambda *a: _fast(*a), args)


def test_gradients_of_only_some_inputs_and_of_the_output_alone():
    # Analyses differentiate w.r.t. a subset (e.g. only u); the backward must skip the rest correctly.
    x = _inputs(L=9)
    for wanted in (["u"], ["dt", "A"], ["B"], ["C"]):
        leaves = {k: x[k].clone().requires_grad_(k in wanted) for k in ("u", "dt", "A", "B", "C")}
        ref = {k: x[k].clone().requires_grad_(k in wanted) for k in ("u", "dt", "A", "B", "C")}
        y = selective_scan(**leaves)
        y_ref = _reference(**ref)[0]
        got = torch.autograd.grad(y.square().sum(), [leaves[k] for k in wanted])
        exp = torch.autograd.grad(y_ref.square().sum(), [ref[k] for k in wanted])
        for k, a, b in zip(wanted, got, exp, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"gradient w.r.t. {k}")


def _fp32_bound(x: dict[str, torch.Tensor], L: int, N: int) -> torch.Tensor:
    """|y32 − y64| ≤ γ·Y with Y the scan of |u|, |B|, |C| (every partial sum's magnitude bounded by Y).

    Each output is a sum over ≤ L positions and N states of products of ≤ L + 4 rounded factors (the decays
    exp(Δ·A) and Δ·u·B·C), so its relative rounding error is at most (L + N + 8)·ε₃₂ to first order.
    """
    y_abs = _reference(x["u"].abs(), x["dt"], x["A"], x["B"].abs(), x["C"].abs())[0]
    return (L + N + 8) * torch.finfo(torch.float32).eps * y_abs


def test_fp32_outputs_equal_the_reference_to_rounding():
    L, N = 40, 6
    x = _inputs(b=3, L=L, E=7, N=N, pad=5)
    y64 = _reference(x["u"], x["dt"], x["A"], x["B"], x["C"])[0]
    y32 = selective_scan(*(x[k].float() for k in ("u", "dt", "A", "B", "C")))
    with torch.no_grad():
        y32_nograd = selective_scan(*(x[k].float() for k in ("u", "dt", "A", "B", "C")))
    assert y32.dtype == torch.float32
    bound = _fp32_bound(x, L, N)
    assert bool(((y32.double() - y64).abs() <= bound).all())
    assert torch.equal(y32, y32_nograd)  # autograd or not, the same arithmetic


@pytest.mark.parametrize("use_h0,pad", [(False, 0), (True, 0), (True, 4)])
def test_forward_without_autograd_equals_the_loop_reference_fp64(use_h0, pad):
    """The forward without autograd (two states kept, not L) against the loop reference: outputs and last state."""
    x = _inputs(b=3, L=17, E=6, N=5, pad=pad)
    h0 = x["h0"] if use_h0 else None
    y_ref, last_ref = _reference(x["u"], x["dt"], x["A"], x["B"], x["C"], h0)
    with torch.no_grad():
        y, last = _fast(x["u"], x["dt"], x["A"], x["B"], x["C"], h0)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, last_ref, rtol=1e-12, atol=1e-12)


def test_training_scan_matches_transformers_reference():
    """``hf_selective_scan`` (the scan ``train-tiny`` swaps in) against transformers' own scan, outputs and
    gradients of every input (with D, z, Δ bias, softplus and the last state), to fp32 rounding."""
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan

    b, E, L, N = 2, 6, 30, 4

    def inputs() -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        shapes = [(b, E, L), (b, E, L), (E, N), (b, N, L), (b, N, L), (E,), (b, E, L), (E,)]
        ts = [torch.randn(s, generator=g) for s in shapes]
        ts[2] = -ts[2].exp()
        return [t.requires_grad_() for t in ts]

    results = []
    for fn in (mamba_selective_scan, hf_selective_scan):
        u, dt, A, B, C, D, z, bias = args = inputs()
        out, last = fn(u, dt, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, return_last_state=True)
        grads = torch.autograd.grad(out.sin().sum() + last.sum(), args)
        results.append((out, last, grads))
    (o1, l1, g1), (o2, l2, g2) = results
    # Each value is a float32 sum over at most b·L positions (Σ over the batch for A, D, Δ bias) of products
    # accumulated along ≤ L + N + 8 rounded operations, so both differ from the exact value by at most
    # (b·L + L + N + 8)·ε₃₂ times the magnitude, taken as the tensor's max |·| (seen: ≤ 25 ε here).
    eps = torch.finfo(torch.float32).eps
    for name, a, c in zip(("y", "last state", "u", "dt", "A", "B", "C", "D", "z", "delta_bias"),
                          (o2, l2, *g2), (o1, l1, *g1), strict=True):
        bound = (b * L + L + N + 8) * eps * float(c.abs().max())
        assert float((a - c).abs().max()) <= bound, f"{name}: {float((a - c).abs().max())} > {bound}"


def test_training_scan_is_swapped_in_only_inside_the_context():
    from transformers.models.mamba import modeling_mamba

    original = modeling_mamba.mamba_selective_scan
    with _training_scan("mamba"):
        assert modeling_mamba.mamba_selective_scan is hf_selective_scan
    assert modeling_mamba.mamba_selective_scan is original


@pytest.mark.parametrize("small_slice", [0, 1 << 30])
def test_small_slices_run_on_one_thread_and_give_the_same_result(monkeypatch, small_slice):
    """With the loops on one thread (every slice small) or on all threads (none small), outputs and gradients
    equal the loop reference, and the caller's thread count is restored after the forward and the backward."""
    from mambascope.ssm import s6_scan

    seen: list[int] = []
    real_mul = torch.Tensor.mul_

    def spy(self, *args, **kwargs):  # the backward loop's first op each step: the threads it runs on
        seen.append(torch.get_num_threads())
        return real_mul(self, *args, **kwargs)

    monkeypatch.setattr(s6_scan, "SMALL_SLICE", small_slice)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inputs = _inputs(b=2, L=9, E=6, N=3, pad=2)
        y_ref, last_ref, g_ref = _grads(_reference, inputs, True)
        monkeypatch.setattr(torch.Tensor, "mul_", spy)
        y, last, g = _grads(_fast, inputs, True)
        monkeypatch.undo()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert seen and set(seen) == ({1} if small_slice else {2})
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, last_ref, rtol=1e-10, atol=1e-10)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-10, atol=1e-10, msg=f"gradient w.r.t. {name}")
