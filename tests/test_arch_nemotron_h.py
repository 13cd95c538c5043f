"""Nemotron-H (Mamba-2, attention, MLP and MoE layers) traced against its own forward."""

import pytest
import torch
from transformers import NemotronHConfig, NemotronHForCausalLM

from family_check import check_against_model, check_patterns, padded_batch, stress
from mambascope.arch import UnsupportedFeature, adapter
from mambascope.trace import trace

PATTERN = ["linear_attention", "moe", "full_attention", "mlp", "linear_attention"]
CONFIGS = [
    dict(layers_block_type=PATTERN),
    dict(layers_block_type=PATTERN[::-1], n_groups=1, use_conv_bias=False, use_bias=True, mlp_bias=True,
         attention_bias=True, mlp_hidden_act="silu", moe_latent_size=16, n_routed_experts=6, n_group=2,
         topk_group=1, norm_topk_prob=False, routed_scaling_factor=2.5, time_step_min=0.5),
    dict(layers_block_type=["linear_attention", "mlp"] * 2),
]


def _model(**kw):
    torch.manual_seed(0)
    base = dict(vocab_size=97, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                intermediate_size=40, mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=8,
                conv_kernel=3, chunk_size=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=12,
                moe_shared_expert_intermediate_size=16, pad_token_id=0)
    model = stress(NemotronHForCausalLM(NemotronHConfig(**{**base, **kw})))
    with torch.no_grad():  # a fresh router's correction bias is 0: make it matter
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.1)
    return model


@pytest.mark.parametrize("kw", CONFIGS)
def test_nemotron_h_equals_model(kw):
    model = _model(**kw)
    check_against_model(model)
    ad = adapter(model)
    expected = {"linear_attention": "mamba2", "full_attention": "attention", "mlp": "mlp", "moe": "moe"}
    assert [ad.layer_kind(i) for i in range(ad.n_layers)] == [expected[t] for t in kw["layers_block_type"]]
    if "full_attention" in kw["layers_block_type"]:
        ids, mask = padded_batch()
        check_patterns(model, ids, mask)


def test_moe_routing_is_the_models_own_and_neurons_only_on_routed_tokens():
    model = _model(**CONFIGS[0])
    ids, mask = padded_batch()
    seen = {}
    experts = model.model.layers[1].mixer.experts
    hook = experts.register_forward_hook(lambda m, args, out: seen.update(index=args[1], weight=args[2]))
    with torch.no_grad():
        model(ids, attention_mask=mask, use_cache=False)
    hook.remove()
    tr = trace(model, ids, attention_mask=mask, names="blocks.1.mlp.*")
    route = tr["blocks.1.mlp.hook_route"].reshape(-1, 4)
    theirs = torch.zeros_like(route).scatter(-1, seen["index"], seen["weight"].float())
    assert torch.allclose(route, theirs, atol=1e-6)
    post = tr["blocks.1.mlp.hook_post"].reshape(-1, 4, 12)
    assert bool((post[route == 0] == 0).all()) and bool((post[route > 0] != 0).any())
    assert adapter(model).neuron_write_weights(1).shape == (32, 4 * 12)


def test_nemotron_h_rejects_sliding_window():
    with pytest.raises(UnsupportedFeature, match="sliding_window"):
        adapter(_model(**CONFIGS[0], sliding_window=8))
