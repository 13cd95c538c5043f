"""Jamba (Mamba-1 mixers with Δ/B/C norms, attention, SwiGLU MLP and MoE) traced against its own forward."""

import pytest
import torch
from transformers import JambaConfig, JambaForCausalLM

from family_check import check_against_model, check_patterns, padded_batch, stress
from mambascope.arch import adapter

CONFIGS = [
    dict(),  # attention at layer 2, MoE at odd layers
    dict(attn_layer_period=2, attn_layer_offset=0, expert_layer_period=3, expert_layer_offset=0, num_experts=3,
         num_experts_per_tok=1, mamba_conv_bias=False, mamba_proj_bias=True, mamba_dt_rank=3),
    dict(num_experts=1, attn_layer_offset=3),  # no MoE anywhere
]


def _model(**kw):
    torch.manual_seed(0)
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=20, num_experts=4, num_experts_per_tok=2, expert_layer_period=2,
                expert_layer_offset=1, attn_layer_period=4, attn_layer_offset=2, mamba_d_state=8, mamba_d_conv=3,
                mamba_expand=2, pad_token_id=0)
    return stress(JambaForCausalLM(JambaConfig(**{**base, **kw})))


@pytest.mark.parametrize("kw", CONFIGS)
def test_jamba_equals_model(kw):
    model = _model(**kw)
    check_against_model(model)
    ad = adapter(model)
    cfg = model.config
    assert [ad.layer_kind(i) for i in range(4)] == ["mamba" if t == "linear_attention" else "attention"
                                                   for t in cfg.layer_types]
    assert [("mlp.hook_route" in ad.units(i)) for i in range(4)] == [n > 1 for n in cfg.layers_num_experts]
    if "full_attention" in cfg.layer_types:
        ids, mask = padded_batch()
        check_patterns(model, ids, mask)
