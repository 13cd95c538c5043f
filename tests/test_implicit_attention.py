"""Implicit attention of the whole mixer (ssm/implicit_attention.py): exact against the model's own forward
(hand-made hooks on in_proj and out_proj), the ablations against explicit matrices, the layer maps as exact
decompositions of the mixer / attention output, and the rollout against a loop."""

import copy

import pytest
import torch
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from mambascope import load_model
from mambascope.arch import adapter
from mambascope.attribution.layer_maps import layer_map, layer_maps, rollout_map
from mambascope.ssm import hidden_attention
from mambascope.ssm.implicit_attention import (
    implicit_attention,
    implicit_extra,
    layer_token_map,
    residual_rollout,
    token_contributions,
)
from mambascope.trace import head_write_weights, mixer_params, trace

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _random(kind):
    torch.manual_seed(0)
    if kind == "mamba":
        cfg = MambaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, state_size=4, conv_kernel=3,
                          time_step_rank=3, use_conv_bias=True)
        return MambaForCausalLM(cfg).eval()
    cfg = Mamba2Config(vocab_size=50, hidden_size=16, num_hidden_layers=2, state_size=4, head_dim=4, num_heads=8,
                       n_groups=2, chunk_size=8, conv_kernel=3)
    return Mamba2ForCausalLM(cfg).eval()


def _rel(a, b):
    return float(((a - b).abs().max() / b.abs().max()).detach())


def _own_forward(model, ids, layer):
    """(x-branch, out_proj input, out_proj output) of ``layer`` from the model's own forward, by hooks."""
    mixer = model.backbone.layers[layer].mixer
    got = {}

    def on_in_proj(module, args, out):
        E = mixer.intermediate_size
        got["x"] = out[..., :E] if isinstance(model, MambaForCausalLM) else out[..., E:2 * E]

    def on_out_proj_input(module, args):
        got["post"] = args[0].detach().clone()

    def on_out_proj(module, args, out):
        got["out"] = out.detach().clone()

    handles = [mixer.in_proj.register_forward_hook(on_in_proj),
               mixer.out_proj.register_forward_pre_hook(on_out_proj_input),
               mixer.out_proj.register_forward_hook(on_out_proj)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return got["x"], got["post"], got["out"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_operator_reproduces_out_proj_input(kind, dtype):
    model = _random(kind).to(dtype)
    if kind == "mamba2":  # a conv bias and a non-trivial norm weight, so every term is exercised
        with torch.no_grad():
            for block in model.backbone.layers:
                block.mixer.norm.weight.uniform_(0.5, 1.5)
    ids = torch.randint(0, 50, (2, 19), generator=torch.Generator().manual_seed(1))
    tr = trace(model, ids)
    for layer in range(2):
        x, post, _ = _own_forward(model, ids, layer)
        units, params = tr.layer(layer), mixer_params(model, layer)
        omega = implicit_attention(units, params)
        extra = implicit_extra(units, params)
        rebuilt = torch.einsum("betj,bje->bte", omega, x.to(omega)) + extra
        # HF's Mamba-2 RMSNorms compute in fp32 even in an fp64 model: its own post is fp32-accurate there
        tol = TOL[dtype] if (kind, dtype) != ("mamba2", torch.float64) else 1e-6
        assert _rel(rebuilt, post) < tol, (kind, dtype, layer)
        # and the traced post from the traced x-branch, in the work dtype throughout
        traced = torch.einsum("betj,bje->bte", omega, units["mixer.hook_x"].to(omega)) + extra
        assert _rel(traced, units["mixer.hook_post"]) < TOL[dtype]
        assert bool((omega.triu(1) == 0).all())  # causal


def _explicit(units, params, variant):
    """diag(g)·α·diag(σ(c))·T with every factor an explicit [L, L] matrix per channel (loops over taps)."""
    E, L = params.d_inner, units["mixer.hook_x"].shape[1]
    alpha = hidden_attention(units, params, "s6")[0]
    if params.arch == "mamba2":
        alpha = alpha.repeat_interleave(params.head_dim, dim=0)
    T = torch.zeros(E, L, L, dtype=alpha.dtype)
    w = params.conv_weight.to(alpha.dtype)
    K = w.shape[1]
    for s in range(L):
        for j in range(max(0, s - K + 1), s + 1):
            T[:, s, j] = w[:, K - 1 - (s - j)]
    conv = units["mixer.hook_conv"][0].to(alpha.dtype)
    sig = torch.diag_embed(torch.sigmoid(conv).T)
    from mambascope.ssm import output_gate
    z = units["mixer.hook_gate_pre"].to(alpha.dtype)
    g = torch.diag_embed(output_gate(units["mixer.hook_y"].to(alpha.dtype), z * torch.sigmoid(z), params)[0].T)
    eye = torch.eye(L, dtype=alpha.dtype).expand(E, L, L)
    g, sig, T = (eye if variant == v else m for v, m in (("no_gate", g), ("no_act", sig), ("no_conv", T)))
    return g @ alpha @ sig @ T


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
@pytest.mark.parametrize("variant", ["full", "no_conv", "no_gate", "no_act"])
def test_variants_against_explicit_matrices(kind, variant):
    model = _random(kind).double()
    ids = torch.randint(0, 50, (1, 13), generator=torch.Generator().manual_seed(2))
    units, params = trace(model, ids).layer(1), mixer_params(model, 1)
    got = implicit_attention(units, params, variant)[0]
    assert _rel(got, _explicit(units, params, variant)) < 1e-12
    if variant != "full":
        assert _rel(got, implicit_attention(units, params)[0]) > 1e-3  # an ablation changes the operator
    rows = implicit_attention(units, params, variant, rows=[3, 12], channels=[1, 5])
    assert torch.allclose(rows[0], got[[1, 5]][:, [3, 12]], rtol=0, atol=1e-14)


def test_padding_mask():
    model = _random("mamba2").double()
    ids = torch.randint(0, 50, (2, 15), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    tr = trace(model, ids, attention_mask=mask)
    units, params = tr.layer(0), mixer_params(model, 0)
    omega = implicit_attention(units, params, attention_mask=mask)
    post = torch.einsum("betj,bje->bte", omega, units["mixer.hook_x"]) + implicit_extra(units, params,
                                                                                        attention_mask=mask)
    valid = mask.bool()
    assert _rel(post[valid], units["mixer.hook_post"][valid]) < 1e-10
    assert bool((omega[0][..., :4] == 0).all())  # padded keys contribute nothing


@pytest.mark.parametrize("name", ["tiny-mamba", "tiny-mamba2"])
def test_layer_map_decomposes_the_mixer_output(name):
    model, _ = load_model(name)
    model = copy.deepcopy(model).double()
    ids = torch.randint(0, model.config.vocab_size, (1, 21), generator=torch.Generator().manual_seed(4))
    tr = trace(model, ids)
    layer = 1
    units, params = tr.layer(layer), mixer_params(model, layer)
    _, _, out = _own_forward(model, ids, layer)
    terms = token_contributions(units, params)  # [b, i, j, d_model]
    bias = model.backbone.layers[layer].mixer.out_proj.bias
    extra = implicit_extra(units, params) @ params.out_proj_weight.T.double()
    rebuilt = terms.sum(2) + extra + (0 if bias is None else bias)
    assert _rel(rebuilt, out) < 1e-6  # HF's fp32 residual / norms in an fp64 model bound this
    assert _rel(rebuilt, units["hook_mixer_out"]) < 1e-10  # the traced forward stays fp64
    cmap = layer_token_map(units, params)
    assert _rel(cmap, terms.norm(dim=-1)) < 1e-14
    chunked = layer_token_map(units, params, max_bytes=1)  # one query row per chunk
    assert torch.equal(chunked, cmap)
    assert bool((cmap[0].triu(1) == 0).all()) and bool((cmap >= 0).all())
    assert torch.allclose(layer_map(model, ids, layer), cmap, rtol=1e-12, atol=0)
    assert torch.allclose(layer_map(model, ids, layer, rows=[20, -1, 3]), cmap[:, [20, 20, 3]], rtol=1e-12, atol=0)


def test_attention_map_decomposes_the_attention_output():
    model, _ = load_model("tiny-gpt")
    model = copy.deepcopy(model).double()
    ids = torch.randint(0, model.config.vocab_size, (1, 17), generator=torch.Generator().manual_seed(5))
    tr = trace(model, ids, ["blocks.1.attn.hook_pattern", "blocks.1.attn.hook_v", "blocks.1.hook_attn_out"])
    A, v = tr["blocks.1.attn.hook_pattern"], tr["blocks.1.attn.hook_v"]
    W = head_write_weights(model, 1)
    bias = model.transformer.h[1].attn.c_proj.bias
    # token j's term Σ_h A_h[i, j]·v_{j,h}·W_O^h, by an explicit loop over heads
    terms = sum(A[:, h, :, :, None] * (v[:, :, h] @ W[h])[:, None] for h in range(A.shape[1]))
    assert _rel(terms.sum(2) + bias, tr["blocks.1.hook_attn_out"]) < 1e-12
    from mambascope.ssm.implicit_attention import attention_token_map
    assert _rel(attention_token_map(A, v, W), terms.norm(dim=-1)) < 1e-12
    assert _rel(attention_token_map(A, v, W, rows=[5, 16]), terms.norm(dim=-1)[:, [5, 16]]) < 1e-12


def test_rollout_against_a_loop():
    g = torch.Generator().manual_seed(6)
    maps = [torch.rand(2, 6, 6, generator=g, dtype=torch.float64).tril() for _ in range(3)]
    maps[1][0, 2] = 0  # an all-zero row stays the identity's
    L = 6
    R = torch.eye(L, dtype=torch.float64).expand(2, L, L).clone()
    for c in maps:
        step = torch.zeros(2, L, L, dtype=torch.float64)
        for b in range(2):
            for i in range(L):
                s = float(c[b, i].sum())
                row = [(float(c[b, i, j]) / s if s > 0 else 0.0) + (1.0 if i == j else 0.0) for j in range(L)]
                step[b, i] = torch.tensor(row, dtype=torch.float64) / sum(row)
        R = step @ R
    got = residual_rollout(maps)
    assert _rel(got, R) < 1e-14
    assert torch.allclose(got.sum(-1), torch.ones(2, L, dtype=torch.float64))


@pytest.mark.parametrize("name", ["tiny-mamba", "tiny-mamba2", "tiny-gpt", "tiny-hybrid"])
def test_model_maps_every_token_mixing_layer(name):
    model, _ = load_model(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
    maps = layer_maps(model, ids)
    assert sorted(maps) == list(range(adapter(model).n_layers))
    for c in maps.values():
        assert c.shape == (2, 12, 12) and bool(torch.isfinite(c).all())
    R = rollout_map(model, ids)
    assert torch.allclose(R.sum(-1), torch.ones(2, 12), atol=1e-5)
    with pytest.raises(ValueError, match="variant"):
        layer_maps(model, ids, variant="no_softmax")
    with pytest.raises(IndexError, match="out of range"):
        layer_maps(model, ids, layers=[0, 99])
