"""Zamba2 (Mamba-2 layers, some after a shared attention + MLP block with LoRA adapters) against its own forward."""

import pytest
import torch
from transformers import Zamba2Config, Zamba2ForCausalLM

from family_check import check_against_model, check_patterns, padded_batch, stress
from mambascope.arch import adapter

TYPES = ["mamba", "hybrid", "mamba", "hybrid", "hybrid"]
CONFIGS = [
    dict(layers_block_type=TYPES),
    dict(layers_block_type=TYPES, num_mem_blocks=2, use_shared_attention_adapter=True, use_mem_rope=True,
         add_bias_linear=True, mamba_ngroups=1, use_conv_bias=False, time_step_min=0.5),
]


def _model(**kw):
    torch.manual_seed(0)
    base = dict(vocab_size=97, hidden_size=32, num_attention_heads=4, intermediate_size=40, mamba_d_state=8,
                mamba_d_conv=3, n_mamba_heads=8, mamba_ngroups=2, chunk_size=16, adapter_rank=4, pad_token_id=0,
                num_hidden_layers=len(kw["layers_block_type"]))
    return stress(Zamba2ForCausalLM(Zamba2Config(**{**base, **kw})))


@pytest.mark.parametrize("kw", CONFIGS)
def test_zamba2_equals_model(kw):
    model = _model(**kw)
    check_against_model(model)
    ids, mask = padded_batch()
    check_patterns(model, ids, mask)
    ad = adapter(model)
    assert [ad.layer_kind(i) for i in range(5)] == ["mamba2"] * 5
    assert ["attn.hook_pattern" in ad.units(i) for i in range(5)] == [t == "hybrid" for t in TYPES]
