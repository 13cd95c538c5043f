"""Hidden attention on the tracer's output of real Hugging Face mixers: it reconstructs y and post."""

import pytest
import torch
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from mambascope.ssm import block_bias, hidden_attention
from mambascope.trace import mixer_params, trace


def _model(kind):
    torch.manual_seed(0)
    if kind == "mamba":
        cfg = MambaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, state_size=4, conv_kernel=3,
                          time_step_rank=3)
        model = MambaForCausalLM(cfg)
    else:
        cfg = Mamba2Config(vocab_size=50, hidden_size=16, num_hidden_layers=2, state_size=4, head_dim=4,
                           num_heads=8, n_groups=2, chunk_size=8, conv_kernel=3)
        model = Mamba2ForCausalLM(cfg)
    return model.eval()


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_traced_layers_are_reconstructed(kind):
    model = _model(kind)
    ids = torch.randint(0, 50, (2, 21))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, -5:] = 0
    tr = trace(model, ids, attention_mask=mask)
    valid = mask.bool()
    for layer in range(2):
        units, params = tr.layer(layer), mixer_params(model, layer)
        u, y = units["mixer.hook_ssm_input"], units["mixer.hook_y"]
        alpha = hidden_attention(units, params, "s6+D", attention_mask=mask)  # [b, C, L, L]
        if kind == "mamba2":  # heads → their channels
            alpha = alpha.repeat_interleave(params.head_dim, dim=1)
        rebuilt = torch.einsum("bdts,bsd->btd", alpha, u)
        assert _rel(rebuilt[valid], y[valid]) < 1e-5
        M = hidden_attention(units, params, "block", attention_mask=mask)
        post = torch.einsum("bdts,bsd->btd", M, units["mixer.hook_x"]) + block_bias(
            units, params, attention_mask=mask).transpose(1, 2)
        assert _rel(post[valid], units["mixer.hook_post"][valid]) < 1e-5
