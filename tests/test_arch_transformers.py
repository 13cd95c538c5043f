"""GPT-NeoX (Pythia) and Llama traced against their own forward, with and without optional features."""

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from family_check import check_against_model, check_patterns, padded_batch, stress
from mambascope.arch import adapter
from mambascope.trace import trace

NEOX = [
    dict(),  # Pythia's defaults: parallel residual, rotary on a quarter of each head
    dict(use_parallel_residual=False, rotary_pct=1.0, attention_bias=False, hidden_act="relu"),
]
LLAMA = [
    dict(),  # multi-head attention
    dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True, hidden_act="gelu"),  # grouped-query, biases
    dict(num_key_value_heads=1, head_dim=12, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                              "rope_theta": 500.0}),
]


def _neox(**kw):
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, **kw)
    return stress(GPTNeoXForCausalLM(cfg))


def _llama(**kw):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=40, **kw)
    return stress(LlamaForCausalLM(cfg))


@pytest.mark.parametrize("kw", NEOX)
def test_gpt_neox_equals_model(kw):
    model = _neox(**kw)
    check_against_model(model)
    ids, mask = padded_batch()
    check_patterns(model, ids, mask)
    units = adapter(model).units(0)
    assert ("hook_resid_mid" in units) == (not model.config.use_parallel_residual)


@pytest.mark.parametrize("kw", LLAMA)
def test_llama_equals_model(kw):
    model = _llama(**kw)
    check_against_model(model)
    ids, mask = padded_batch()
    check_patterns(model, ids, mask)


def test_llama_neuron_is_swiglu_product():
    model = _llama()
    tr = trace(model, torch.randint(0, 97, (2, 9)), names="blocks.1.mlp.*")
    act = model.model.layers[1].mlp.act_fn
    units = tr.layer(1)
    assert torch.allclose(units["mlp.hook_post"], act(units["mlp.hook_pre"]) * units["mlp.hook_pre_linear"])
    assert adapter(model).neuron_write_weights(1).shape == (32, 40)
    assert adapter(model).head_write_weights(1).shape == (4, 8, 32)
