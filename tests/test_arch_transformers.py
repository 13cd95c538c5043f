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


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_transformer_baselines_have_head_attention_neurons(family):
    """Heads are the attention neurons of every transformer family (grouped-query included): the pattern
    is the model's eager softmax, and per-head value writes rebuild the attention output."""
    from mambascope.attention_neurons import MambaAttentionNeurons

    model = _llama(**LLAMA[1]) if family == "llama" else _neox()
    ids, mask = padded_batch()
    an = MambaAttentionNeurons(model)
    methods = ["attention_weighted", "gradient_guided", "rollout"]
    data = an.extract_attention_vectors(ids, [0, 1], attention_mask=mask, methods=methods)
    assert data.unit == "head" and data.n_units[1] == 4 and not data.errors
    model.set_attn_implementation("eager")
    with torch.no_grad():
        hf = model(ids, attention_mask=mask, output_attentions=True, use_cache=False).attentions
    valid = mask.bool()
    for layer in (0, 1):
        got = data[layer]["attention_matrix"].permute(0, 2, 1, 3)[valid]
        assert (got - hf[layer].permute(0, 2, 1, 3)[valid]).abs().max() < 1e-5
        assert an.create_mamba_neurons(data, "attention_weighted")[layer]["activation_per_row"].shape == (3, 4)
    tr = trace(model, ids, ["attn.hook_v", "attn.hook_pattern", "hook_attn_out"])
    ad = adapter(model)
    o_proj = ad.out_projs(1)["attn.hook_z"]
    v = tr["blocks.1.attn.hook_v"]
    v = v.repeat_interleave(4 // v.shape[2], dim=2)
    out = torch.einsum("bhts,bshp,hpd->btd", tr["blocks.1.attn.hook_pattern"], v, ad.head_write_weights(1))
    out = out + (o_proj.bias if o_proj.bias is not None else 0.0)
    assert (out - tr["blocks.1.hook_attn_out"]).abs().max() <= 1e-5 * tr["blocks.1.hook_attn_out"].abs().max()
    with pytest.raises(ValueError, match="Mamba-only"):
        an.extract_attention_vectors(ids, [0], methods=["block"])
