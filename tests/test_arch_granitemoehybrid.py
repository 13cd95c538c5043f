"""Granite-4.0-H (Mamba-2 or attention, then gated experts + shared MLP, μP multipliers) against its own forward."""

import pytest
import torch
from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

from family_check import check_against_model, check_patterns, padded_batch, stress
from mambascope.arch import adapter

TYPES = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
CONFIGS = [
    dict(layer_types=TYPES),
    # no experts (shared MLP only), rotary attention, μP multipliers, biases, one group
    dict(layer_types=TYPES[::-1], num_local_experts=0, position_embedding_type="rope", embedding_multiplier=3.0,
         residual_multiplier=0.4, logits_scaling=2.5, attention_multiplier=0.2, attention_bias=True,
         mamba_n_groups=1, mamba_conv_bias=False, mamba_proj_bias=True, time_step_limit=(0.3, 1.5)),
    dict(layer_types=TYPES, position_embedding_type="rope", num_experts_per_tok=1, residual_multiplier=0.5),
]


def _model(**kw):
    torch.manual_seed(0)
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=12, shared_intermediate_size=20, num_local_experts=4, num_experts_per_tok=2,
                mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=3, mamba_chunk_size=16,
                pad_token_id=0)
    return stress(GraniteMoeHybridForCausalLM(GraniteMoeHybridConfig(**{**base, **kw})))


@pytest.mark.parametrize("kw", CONFIGS)
def test_granitemoehybrid_equals_model(kw):
    model = _model(**kw)
    check_against_model(model)
    ids, mask = padded_batch()
    check_patterns(model, ids, mask)
    ad = adapter(model)
    assert [ad.layer_kind(i) for i in range(4)] == ["mamba2" if t == "linear_attention" else "attention"
                                                   for t in kw["layer_types"]]
    moe = kw.get("num_local_experts", 4) > 0
    assert ("mlp.hook_route" in ad.units(0)) == moe
    width = 4 * 12 if moe else 20
    attn_layer = kw["layer_types"].index("full_attention")
    assert ad.neuron_write_weights(attn_layer).shape == (32, width)
