"""A MoE layer's census: each expert's neurons counted over the tokens routed to it (Nemotron-H)."""

import torch
from transformers import NemotronHConfig, NemotronHForCausalLM

from family_check import stress
from mambascope.data import load_corpus, tokenize_windows
from mambascope.pipeline import census_pass


def test_each_expert_is_censused_over_its_routed_tokens(small_tokenizer):
    torch.manual_seed(0)
    special = small_tokenizer.eos_token_id
    config = NemotronHConfig(vocab_size=len(small_tokenizer), hidden_size=32,
                             layers_block_type=["linear_attention", "moe", "full_attention"], mamba_num_heads=4,
                             mamba_head_dim=16, ssm_state_size=8, n_groups=1, chunk_size=16, num_attention_heads=4,
                             num_key_value_heads=4, head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=12, moe_shared_expert_intermediate_size=16,
                             bos_token_id=special, eos_token_id=special, pad_token_id=special)
    model = stress(NemotronHForCausalLM(config))
    windows = tokenize_windows(load_corpus("builtin", "validation").texts[:200], small_tokenizer, 32,
                               max_tokens=32 * 8).ids
    out = census_pass(model, small_tokenizer, windows, batch_size=4, progress=False)
    assert set(out["layers"]) == {"0"} and set(out["skipped_layers"]) == {"1", "2"}
    experts = out["moe_layers"]["1"]["experts"]

    # independent reference: the model's own experts module sees its input and routing
    seen = {}
    moe = model.model.layers[1].mixer
    hook = moe.experts.register_forward_hook(lambda m, args, o: seen.update(h=args[0], index=args[1]))
    with torch.no_grad():
        model(windows, use_cache=False)
    hook.remove()
    counted = (windows != special).reshape(-1)  # BOS (= EOS here) is excluded from every statistic
    for x in range(4):
        routed = (seen["index"] == x).any(-1) & counted
        assert experts[str(x)]["tokens"] == int(routed.sum())
        active = moe.experts.act_fn(torch.nn.functional.linear(seen["h"][routed], moe.experts.up_proj[x])) > 0
        torch.testing.assert_close(torch.tensor(experts[str(x)]["activation_frequency"], dtype=torch.float64),
                                   active.double().mean(0), atol=1e-9, rtol=0)
