"""Falcon-H1 (parallel Mamba-2 and attention, SwiGLU MLP, μP multipliers) traced against its own forward."""

import pytest
import torch
from transformers import FalconH1Config, FalconH1ForCausalLM

from family_check import check_against_model, check_patterns, padded_batch, stress
from mambascope.arch import UnsupportedFeature, adapter
from mambascope.ssm import block_bias, hidden_attention
from mambascope.trace import trace

MULTIPLIERS = dict(embedding_multiplier=2.0, lm_head_multiplier=0.5, key_multiplier=0.7,
                   attention_in_multiplier=1.3, attention_out_multiplier=0.6, ssm_in_multiplier=1.5,
                   ssm_out_multiplier=0.8, ssm_multipliers=[0.9, 1.2, 0.8, 1.1, 1.4], mlp_multipliers=[1.3, 0.7])
CONFIGS = [
    dict(),  # defaults: no mixer norm (y ⊙ SiLU z)
    dict(mamba_rms_norm=True, mamba_norm_before_gate=False, **MULTIPLIERS),
    dict(mamba_rms_norm=True, mamba_norm_before_gate=True, mamba_n_groups=1, attention_bias=True, mlp_bias=True,
         projectors_bias=True, mamba_proj_bias=True, mamba_conv_bias=False, time_step_limit=(0.3, 1.5)),
]


def _model(**kw):
    torch.manual_seed(0)
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=40, mamba_d_ssm=48, mamba_n_heads=6, mamba_d_head=8, mamba_n_groups=2,
                mamba_d_state=8, mamba_d_conv=3, mamba_chunk_size=16, pad_token_id=0)
    return stress(FalconH1ForCausalLM(FalconH1Config(**{**base, **kw})))


@pytest.mark.parametrize("kw", CONFIGS)
def test_falcon_h1_equals_model(kw):
    model = _model(**kw)
    check_against_model(model)
    ids, mask = padded_batch()
    check_patterns(model, ids, mask)
    units = adapter(model).units(0)
    assert {"mixer.hook_post", "attn.hook_pattern", "mlp.hook_post", "hook_resid_mid"} <= set(units)


@pytest.mark.parametrize("kw", CONFIGS[:2])
def test_falcon_h1_hidden_attention_reproduces_post(kw):
    """The block hidden attention (with Falcon-H1's gate, normed or not) maps the pre-conv x to post."""
    model = _model(**kw)
    tr = trace(model, torch.randint(1, 97, (2, 12)))
    layer = tr.layer(1)
    params = adapter(model).mixer_params(1)
    M = hidden_attention(layer, params, "block")  # [b, E, L, L]
    recon = torch.einsum("bets,bse->bte", M, layer["mixer.hook_x"]) + block_bias(layer, params).transpose(1, 2)
    post = layer["mixer.hook_post"]
    assert (recon - post).abs().max() <= 1e-4 * post.abs().max()


def test_falcon_h1_norm_before_gate_has_no_hidden_attention_params():
    with pytest.raises(UnsupportedFeature, match="mamba_norm_before_gate"):
        adapter(_model(**CONFIGS[2])).mixer_params(0)
