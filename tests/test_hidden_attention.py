"""Hidden attention (docs/design.md §4) against independent computations: the loop reference mixers and scans of
``mambascope.ssm.reference``, autograd Jacobians of those loops, and the fp64 result of the same inputs."""

import dataclasses

import pytest
import torch

from mambascope.ssm.hidden_attention import (
    AttentionMemoryError,
    attention_plan,
    block_bias,
    hidden_attention,
    s6_attention,
    ssd_attention,
)
from mambascope.ssm.reference import (
    causal_conv,
    hidden_attention_loops,
    mamba1_scan,
    mamba2_scan,
    random_mixer,
    silu,
)

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

# (arch, random_mixer kwargs): Mamba-1, Mamba-2 with one and two groups and head_dim 2..4.
ARCHS = [
    ("mamba", dict(d_inner=6, d_state=4, conv_kernel=4)),
    ("mamba2", dict(d_inner=8, d_state=4, head_dim=2, n_groups=1, conv_kernel=4)),
    ("mamba2", dict(d_inner=12, d_state=3, head_dim=3, n_groups=2, conv_kernel=3)),
    ("mamba2", dict(d_inner=8, d_state=5, head_dim=4, n_groups=2, conv_kernel=2)),
]
ARCH_IDS = ["mamba1", "mamba2-g1-p2", "mamba2-g2-p3", "mamba2-g2-p4"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|: relative to the tensor's scale (elementwise ratios blow up near 0)."""
    return ((a.to(b.dtype) - b).abs().max() / b.abs().max()).item()


def per_channel_alpha(alpha: torch.Tensor, params) -> torch.Tensor:
    """[b, E, L, L] from s6 output: Mamba-2 heads repeated over their channels."""
    return alpha if params.arch == "mamba" else alpha.repeat_interleave(params.head_dim, dim=1)


def per_channel_D(params) -> torch.Tensor:
    return params.D if params.arch == "mamba" else params.D.repeat_interleave(params.head_dim)


def apply(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """out[b, t, e] = Σ_s M[b, e, t, s]·v[b, s, e]."""
    return torch.einsum("bets,bse->bte", M, v.to(M.dtype))


# ------------------------------------------------------------------------------------ reconstruction


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("pad", [(0, 0), (5, 3)], ids=["nopad", "leftright-pad"])
@pytest.mark.parametrize(("arch", "kw"), ARCHS, ids=ARCH_IDS)
def test_reconstruction(arch, kw, pad, dtype):
    layer, params, mask = random_mixer(arch, length=21, pad=pad, dtype=dtype, seed=1, **kw)
    u, y = layer["mixer.hook_ssm_input"], layer["mixer.hook_y"]
    alpha = hidden_attention(layer, params, "s6", attention_mask=mask)
    assert alpha.dtype == dtype
    D = per_channel_D(params)
    assert rel_err(apply(per_channel_alpha(alpha, params), u) + D * u, y) <= TOL[dtype]
    alpha_d = hidden_attention(layer, params, "s6+D", attention_mask=mask)
    assert rel_err(apply(per_channel_alpha(alpha_d, params), u), y) <= TOL[dtype]
    # block: post = M·x + bias, the whole mixer from the pre-conv x.
    M = hidden_attention(layer, params, "block", attention_mask=mask)
    bias = block_bias(layer, params, attention_mask=mask)
    post = layer["mixer.hook_post"]
    assert rel_err(apply(M, layer["mixer.hook_x"]) + bias.transpose(1, 2), post) <= TOL[dtype]
    # The bias term is not negligible: without it the reconstruction fails.
    assert rel_err(apply(M, layer["mixer.hook_x"]), post) > 1e3 * TOL[dtype]


def test_padded_keys_get_zero_attention():
    for arch, kw in ARCHS[:2]:
        layer, params, mask = random_mixer(arch, length=16, pad=(4, 3), **kw)
        keys_padded = mask == 0  # [b, L]
        for kind in ("s6", "s6+D", "block"):
            a = hidden_attention(layer, params, kind, attention_mask=mask)
            cols = a.transpose(2, 3)[keys_padded.unsqueeze(1).expand(-1, a.shape[1], -1)]
            assert cols.numel() > 0 and bool((cols == 0).all()), (arch, kind)
            unmasked = hidden_attention(layer, params, kind)
            assert bool((unmasked.transpose(2, 3)[keys_padded.unsqueeze(1).expand(-1, a.shape[1], -1)] != 0).any())


# ------------------------------------------------------------------------------- structure, autograd


@pytest.mark.parametrize(("arch", "kw"), ARCHS[:3], ids=ARCH_IDS[:3])
def test_causal_zeros_and_diagonal(arch, kw):
    layer, params, _ = random_mixer(arch, length=19, outputs=False, seed=2, **kw)
    alpha = hidden_attention(layer, params, "s6")
    upper = torch.ones(19, 19, dtype=torch.bool).triu(1)
    assert bool((alpha[..., upper] == 0).all())  # exactly zero, not just small
    dt, B, C = layer["mixer.hook_dt"], layer["mixer.hook_B"], layer["mixer.hook_C"]
    if arch == "mamba":
        expected = (C * B).sum(-1, keepdim=True) * dt  # α_d[t,t] = C_t·B_t·Δ_t,d   [b, L, E]
    else:
        group = torch.arange(params.n_heads) // (params.n_heads // params.n_groups)
        expected = (C * B).sum(-1)[:, :, group] * dt  # [b, L, H]
    diag = alpha.diagonal(dim1=-2, dim2=-1).transpose(1, 2)
    assert rel_err(diag, expected) <= 1e-6


@pytest.mark.parametrize(("arch", "kw"), ARCHS[:3], ids=ARCH_IDS[:3])
def test_alpha_is_the_jacobian_of_the_scan(arch, kw):
    """α_e[t, s] + D δ_ts = ∂y_t,e/∂u_s,e of the loop recurrence with Δ, B, C held fixed."""
    layer, params, _ = random_mixer(arch, batch=1, length=9, dtype=torch.float64, outputs=False, seed=3, **kw)
    dt, B, C = layer["mixer.hook_dt"], layer["mixer.hook_B"], layer["mixer.hook_C"]
    scan = mamba1_scan if arch == "mamba" else mamba2_scan
    u = torch.randn(1, 9, params.d_inner, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda v: scan(v, dt, params.A, B, C, params.D), u)
    J = J[0, :, :, 0].diagonal(dim1=1, dim2=3)  # [t, s, e]: same channel only
    alpha = per_channel_alpha(hidden_attention(layer, params, "s6+D"), params)[0]  # [e, t, s]
    assert rel_err(alpha.permute(1, 2, 0), J) <= 1e-12
    # and nothing leaks across channels of different heads / channels (α is per channel).
    Jfull = torch.autograd.functional.jacobian(lambda v: scan(v, dt, params.A, B, C, params.D), u)[0, :, :, 0]
    same = torch.eye(params.d_inner, dtype=torch.bool)
    assert bool((Jfull.permute(1, 3, 0, 2)[~same] == 0).all())


@pytest.mark.parametrize(("arch", "kw"), ARCHS[:3], ids=ARCH_IDS[:3])
def test_block_is_the_jacobian_of_the_linearised_mixer(arch, kw):
    """M = ∂post/∂x with σ(conv), the gate (and Mamba-2's RMSNorm scale) frozen at their traced values."""
    layer, params, mask = random_mixer(arch, length=10, pad=(3, 2), dtype=torch.float64, seed=4, **kw)
    conv, z, y = layer["mixer.hook_conv"], layer["mixer.hook_gate_pre"], layer["mixer.hook_y"]
    sig_m = torch.sigmoid(conv) * mask[..., None]
    gate = silu(z)
    if arch == "mamba2":
        G = params.n_groups
        v = (y * gate).reshape(*y.shape[:2], G, -1)
        r = torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + params.norm_eps)
        gate = params.norm_weight * (gate.reshape(v.shape) * r).reshape(y.shape)
    scan = mamba1_scan if arch == "mamba" else mamba2_scan
    dt, B, C = layer["mixer.hook_dt"], layer["mixer.hook_B"], layer["mixer.hook_C"]

    def linear_post(x):
        u = sig_m * causal_conv(x, params.conv_weight, None)  # conv bias lives in the bias term
        return gate * scan(u, dt, params.A, B, C, params.D)

    x = layer["mixer.hook_x"]
    J = torch.autograd.functional.jacobian(linear_post, x, vectorize=True)  # [b, t, e, b', j, e']
    J = J.diagonal(dim1=0, dim2=3).diagonal(dim1=1, dim2=3)  # [t, j, b, e]
    J = J * mask.T[None, :, :, None]  # padded x are zero inputs: their columns are defined as 0
    M = hidden_attention(layer, params, "block", attention_mask=mask)  # [b, e, t, j]
    assert rel_err(M.permute(2, 3, 0, 1), J) <= 1e-12


# -------------------------------------------------------------------------------- loop reference


@pytest.mark.parametrize("L", [1, 2, 13, 30, 37])
def test_matches_loop_reference_mamba1(L):
    """Prime L pads the blocked kernel, composite L uses a divisor; L = 1, 2 degenerate."""
    layer, params, _ = random_mixer("mamba", batch=2, length=L, d_inner=5, d_state=6, outputs=False,
                                    dtype=torch.float64, seed=L)
    dt, B, C = layer["mixer.hook_dt"], layer["mixer.hook_B"], layer["mixer.hook_C"]
    ref = hidden_attention_loops(dt, params.A, B, C)
    assert rel_err(hidden_attention(layer, params, "s6"), ref) <= 1e-12
    for Q in (1, 3, 4, L):  # every block size, including padding (3, 4) and a single block (L)
        assert rel_err(s6_attention(dt, params.A, B, C, block_size=Q), ref) <= 1e-12
    fp32 = s6_attention(dt.float(), params.A.float(), B.float(), C.float())
    assert fp32.dtype == torch.float32 and rel_err(fp32, ref) <= 1e-5


@pytest.mark.parametrize(("arch", "kw"), ARCHS[1:], ids=ARCH_IDS[1:])
def test_matches_loop_reference_mamba2(arch, kw):
    layer, params, _ = random_mixer(arch, length=23, outputs=False, dtype=torch.float64, seed=5, **kw)
    dt, B, C = layer["mixer.hook_dt"], layer["mixer.hook_B"], layer["mixer.hook_C"]
    ref = hidden_attention_loops(dt, params.A, B, C)
    assert rel_err(hidden_attention(layer, params, "s6"), ref) <= 1e-12
    group = torch.arange(params.n_heads) // (params.n_heads // params.n_groups)
    assert rel_err(ssd_attention(dt, params.A, B[:, :, group], C[:, :, group]), ref) <= 1e-12
    heads = [params.n_heads - 1, 0]
    sub = hidden_attention(layer, params, "s6", channels=heads)
    assert torch.equal(sub, hidden_attention(layer, params, "s6")[:, heads])


# ------------------------------------------------------------------------------ rows and channels


@pytest.mark.parametrize("kind", ["s6", "s6+D", "block"])
@pytest.mark.parametrize(("arch", "kw"), ARCHS[:3], ids=ARCH_IDS[:3])
def test_rows_equal_rows_of_full_matrix(arch, kw, kind):
    L = 17
    layer, params, mask = random_mixer(arch, length=L, pad=(3, 4), seed=6, **kw)
    full = hidden_attention(layer, params, kind, attention_mask=mask)
    for t in range(L):  # every query position, one at a time: first and last included
        row = hidden_attention(layer, params, kind, rows=[t], attention_mask=mask)
        assert row.shape == (*full.shape[:2], 1, L)
        torch.testing.assert_close(row[:, :, 0], full[:, :, t], rtol=1e-5, atol=1e-6 * full.abs().max().item())
    order = [L - 1, 0, 5, 5, -1, -L]  # any order, repeats, negative indices from the end
    rows = hidden_attention(layer, params, kind, rows=order, attention_mask=mask)
    torch.testing.assert_close(rows, full[:, :, [L - 1, 0, 5, 5, L - 1, 0]],
                               rtol=1e-5, atol=1e-6 * full.abs().max().item())
    channels = [3, 1, -1]
    n = full.shape[1]
    sub = hidden_attention(layer, params, kind, rows=torch.tensor([0, L - 1]), channels=channels,
                           attention_mask=mask)
    torch.testing.assert_close(sub, full[:, [3, 1, n - 1]][:, :, [0, L - 1]],
                               rtol=1e-5, atol=1e-6 * full.abs().max().item())
    if kind == "block":
        bias = block_bias(layer, params, attention_mask=mask)
        torch.testing.assert_close(block_bias(layer, params, rows=[0, -1], channels=channels, attention_mask=mask),
                                   bias[:, [3, 1, n - 1]][:, :, [0, L - 1]])


# -------------------------------------------------------------------------------- reductions


def reduce_full(full: torch.Tensor, how: str) -> torch.Tensor:
    if how == "mean":
        return full.mean(1)
    if how == "absmean":
        return full.abs().mean(1)
    # each channel's row scaled to unit L1 norm; all-zero rows (padded queries, 0/0) count as 0
    return (full / full.abs().sum(-1, keepdim=True)).nan_to_num(0.0).mean(1)


@pytest.mark.parametrize("kind", ["s6", "s6+D", "block"])
@pytest.mark.parametrize(("arch", "kw"), ARCHS[:3], ids=ARCH_IDS[:3])
def test_chunked_reductions_equal_reductions_of_full(arch, kw, kind):
    L = 20
    layer, params, mask = random_mixer(arch, length=L, pad=(2, 5), seed=7, **kw)
    full = hidden_attention(layer, params, kind, attention_mask=mask)
    one = attention_plan(layer, params, kind, reduce="mean", attention_mask=mask, max_bytes=1 << 40)
    assert one.n_chunks == 1
    # a budget of about two channels' work forces several chunks
    small = one.result_bytes + one.fixed_bytes + 2 * one.unit_bytes + 8
    plan = attention_plan(layer, params, kind, reduce="mean", attention_mask=mask, max_bytes=small)
    assert plan.chunk == 2 and plan.n_chunks >= 2 and plan.n_chunks == -(-full.shape[1] // 2)
    for how in ("mean", "absmean", "normalized"):
        red = hidden_attention(layer, params, kind, reduce=how, attention_mask=mask, max_bytes=small)
        assert red.shape == (2, L, L)
        torch.testing.assert_close(red, reduce_full(full, how), rtol=1e-5, atol=1e-7)
        rows = [0, 7, L - 1]
        red_rows = hidden_attention(layer, params, kind, reduce=how, rows=rows, attention_mask=mask,
                                    max_bytes=small)
        torch.testing.assert_close(red_rows, reduce_full(full, how)[:, rows], rtol=1e-5, atol=1e-7)
    # the normalized rows have unit L1 norm per channel, so their channel mean has L1 norm ≤ 1
    nrm = hidden_attention(layer, params, kind, reduce="normalized", attention_mask=mask)
    assert float(nrm.abs().sum(-1).max()) <= 1 + 1e-5
    # full matrices written chunk by chunk equal the one-chunk result
    small_full = attention_plan(layer, params, kind, attention_mask=mask, max_bytes=1 << 40)
    budget = small_full.result_bytes + small_full.fixed_bytes + small_full.unit_bytes + 8
    assert attention_plan(layer, params, kind, attention_mask=mask, max_bytes=budget).chunk == 1
    assert torch.equal(hidden_attention(layer, params, kind, attention_mask=mask, max_bytes=budget), full)


# ------------------------------------------------------------------------------ long sequences


@pytest.mark.parametrize(("arch", "kw"), ARCHS[:3], ids=ARCH_IDS[:3])
def test_long_sequence_large_decay_is_finite_and_accurate(arch, kw):
    L = 8192
    kw = dict(kw, d_inner=kw["d_inner"] // 2 if arch == "mamba" else kw["d_inner"])
    layer, params, _ = random_mixer(arch, batch=1, length=L, outputs=False, dt_scale=30.0, seed=8,
                                    dtype=torch.float64, **kw)
    params = dataclasses.replace(params, A=params.A * 20)  # |Δ·A| up to ~1e4 per step
    rows = [0, 1, 4095, L - 2, L - 1]
    ref = hidden_attention(layer, params, "s6", rows=rows, channels=[0, 1])  # fp64
    layer32 = {k: v.float() for k, v in layer.items()}
    params32 = dataclasses.replace(params, A=params.A.float(), D=params.D.float())
    got = hidden_attention(layer32, params32, "s6+D", rows=rows, channels=[0, 1])
    assert bool(torch.isfinite(got).all())
    got[:, :, torch.arange(len(rows)), torch.tensor(rows)] -= params32.D[[0, 1]].view(1, 2, 1)  # s6+D − D
    assert rel_err(got, ref) <= 1e-5
    red = hidden_attention(layer32, params32, "s6", rows=[L - 1], reduce="normalized", channels=[0, 1])
    assert bool(torch.isfinite(red).all()) and red.abs().sum() > 0


def test_long_sequence_fp32_precision_of_segment_sums():
    """At L = 2048 with a large accumulated Σ Δ, fp32 must match fp64 to 1e-6: forming Σ_{s<k≤t} Δ as a
    difference of fp32 prefix sums loses ~4e-5 here (checked when this test was written)."""
    g = torch.Generator().manual_seed(9)
    L, c, N = 2048, 3, 8
    dt = torch.nn.functional.softplus(torch.randn(1, L, c, generator=g, dtype=torch.float64)) * 2
    A = -torch.exp(2 * torch.randn(c, N, generator=g, dtype=torch.float64))
    A[:, 0] = -1e-3  # one slowly decaying state keeps long-range attention alive
    B, C = (torch.randn(1, L, N, generator=g, dtype=torch.float64) for _ in range(2))
    ref = s6_attention(dt, A, B, C)
    got = s6_attention(dt.float(), A.float(), B.float(), C.float())
    assert bool(torch.isfinite(got).all()) and rel_err(got, ref) <= 1e-6
    rows = torch.tensor([0, 1000, L - 1])
    assert rel_err(s6_attention(dt.float(), A.float(), B.float(), C.float(), rows=rows), ref[:, :, rows]) <= 1e-6
    dt2, A2 = dt[..., :1].expand(1, L, 2), -torch.tensor([1e-3, 3.0], dtype=torch.float64)
    B2, C2 = B[:, :, None, :].expand(1, L, 2, N), C[:, :, None, :].expand(1, L, 2, N)
    ref2 = ssd_attention(dt2, A2, B2, C2)
    assert rel_err(ssd_attention(dt2.float(), A2.float(), B2.float(), C2.float()), ref2) <= 1e-6


# ------------------------------------------------------------------------------------ bad input


def test_bad_input_errors():
    layer, params, _ = random_mixer("mamba", length=12, outputs=False)
    with pytest.raises(ValueError, match=r"unknown hidden-attention kind 'attn'.*s6, s6\+D, block"):
        hidden_attention(layer, params, "attn")
    gpt = dataclasses.replace(params, arch="gpt2")
    with pytest.raises(ValueError, match="needs a Mamba"):
        hidden_attention(layer, gpt, "s6")
    with pytest.raises(TypeError, match="MixerParams"):
        hidden_attention(layer, object(), "s6")
    for bad in (12, -13, [0, 99]):
        with pytest.raises(IndexError, match=r"query row -?\d+ out of range"):
            hidden_attention(layer, params, "s6", rows=bad)
    with pytest.raises(IndexError, match="channel 6 out of range"):
        hidden_attention(layer, params, "s6", channels=[6])
    with pytest.raises(ValueError, match="empty channel selection"):
        hidden_attention(layer, params, "s6", channels=[], reduce="mean")
    with pytest.raises(TypeError, match="integers"):
        hidden_attention(layer, params, "s6", rows=[0.5])
    with pytest.raises(ValueError, match="unknown reduce 'sum'"):
        hidden_attention(layer, params, "s6", reduce="sum")
    with pytest.raises(KeyError, match=r"mixer\.hook_conv"):
        hidden_attention({k: v for k, v in layer.items() if k != "mixer.hook_conv"}, params, "block")
    with pytest.raises(KeyError, match=r"mixer\.hook_B"):
        hidden_attention({"mixer.hook_dt": layer["mixer.hook_dt"]}, params, "s6")
    with pytest.raises(ValueError, match="attention_mask must be"):
        hidden_attention(layer, params, "s6", attention_mask=torch.ones(2, 5))
    layer2, params2, _ = random_mixer("mamba2", length=12, outputs=False)
    with pytest.raises(ValueError, match="do not match its params"):
        hidden_attention(layer2, params, "s6")
    with pytest.raises(IndexError, match="head 4 out of range"):
        hidden_attention(layer2, params2, "s6", channels=[4])  # 6 channels / head_dim 2 = 3 heads
    with pytest.raises(AttentionMemoryError) as err:
        hidden_attention(layer, params, "s6", max_bytes=10_000)
    msg = str(err.value)
    assert "GB" in msg and "rows=" in msg and "channels=" in msg and "reduce=" in msg and "[2, 6, 12, 12]" in msg
    with pytest.raises(MemoryError, match="channels="):  # AttentionMemoryError is a MemoryError
        hidden_attention(layer, params, "s6", reduce="mean", rows=[3], max_bytes=100)
    # a request that fits the same budget with an option from the message succeeds
    plan = attention_plan(layer, params, "s6", reduce="mean", rows=[3], max_bytes=1 << 30)
    assert plan.result_shape == (2, 1, 12)
    assert hidden_attention(layer, params, "s6", reduce="mean", rows=[3],
                            max_bytes=plan.result_bytes + plan.fixed_bytes + plan.unit_bytes).shape == (2, 1, 12)
