"""Bamba (Mamba-2 mixers and attention, each followed by a SwiGLU MLP) traced against its own forward."""

import pytest
import torch
from transformers import BambaConfig, BambaForCausalLM

from family_check import check_against_model, check_patterns, padded_batch, stress
from mambascope.arch import UnsupportedFeature, adapter

CONFIGS = [
    dict(attn_layer_indices=[1]),
    dict(attn_layer_indices=[0, 2], num_key_value_heads=4, mamba_n_groups=1, mamba_conv_bias=False,
         mamba_proj_bias=True, attention_bias=True, mlp_bias=True, mamba_chunk_size=8, time_step_limit=(0.4, 1.2)),
    dict(attn_layer_indices=None),  # no attention at all
]


def _model(**kw):
    torch.manual_seed(0)
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=40, mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=3,
                mamba_chunk_size=16, pad_token_id=0)
    return stress(BambaForCausalLM(BambaConfig(**{**base, **kw})))


@pytest.mark.parametrize("kw", CONFIGS)
def test_bamba_equals_model(kw):
    model = _model(**kw)
    check_against_model(model)
    ad = adapter(model)
    kinds = [ad.layer_kind(layer) for layer in range(3)]
    attn = kw["attn_layer_indices"] or []
    assert kinds == ["attention" if layer in attn else "mamba2" for layer in range(3)]
    if attn:
        ids, mask = padded_batch()
        check_patterns(model, ids, mask)


def test_bamba_hook_names_say_the_layer_kind():
    ad = adapter(_model(**CONFIGS[0]))
    assert "mixer.hook_post" in ad.units(0) and "attn.hook_pattern" not in ad.units(0)
    assert "attn.hook_pattern" in ad.units(1) and "mixer.hook_post" not in ad.units(1)
    assert all("mlp.hook_post" in ad.units(layer) for layer in range(3))
    assert ad.ssm_layers() == [0, 2]
    with pytest.raises(ValueError, match="attention layer"):
        ad.mixer_params(1)


def test_bamba_rejects_a_non_silu_mixer():
    with pytest.raises(UnsupportedFeature, match="hidden_act='gelu'"):
        adapter(_model(**CONFIGS[0], hidden_act="gelu"))
