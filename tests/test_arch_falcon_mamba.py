"""FalconMamba (Mamba-1 with RMS-normalised B, C and Δ) traced against its own forward."""

import pytest
import torch
from transformers import FalconMambaConfig, FalconMambaForCausalLM

from family_check import check_against_model, stress
from mambascope.arch import adapter
from mambascope.ssm import hidden_attention
from mambascope.trace import trace

CONFIGS = [
    dict(hidden_size=32, state_size=8, expand=2, conv_kernel=4, time_step_rank=5),
    dict(hidden_size=24, state_size=4, expand=3, conv_kernel=2, time_step_rank=2, use_conv_bias=False,
         use_bias=True, mixer_rms_eps=1e-3),
]


def _model(**kw):
    torch.manual_seed(0)
    return stress(FalconMambaForCausalLM(FalconMambaConfig(vocab_size=97, num_hidden_layers=2, **kw)))


@pytest.mark.parametrize("kw", CONFIGS)
def test_falcon_mamba_equals_model(kw):
    check_against_model(_model(**kw))


def test_normed_B_C_reach_the_hidden_attention():
    """B and C are traced after their RMS norm, so the exact hidden attention still reproduces y."""
    model = _model(**CONFIGS[0])
    tr = trace(model, torch.randint(0, 97, (2, 16)))
    B = tr["blocks.1.mixer.hook_B"]
    assert torch.allclose(B.pow(2).mean(-1), torch.ones(B.shape[:2]), atol=1e-3)
    layer = tr.layer(1)
    alpha = hidden_attention(layer, adapter(model).mixer_params(1), "s6+D")
    y = torch.einsum("bdts,bsd->btd", alpha, layer["mixer.hook_ssm_input"])
    assert torch.allclose(y, layer["mixer.hook_y"], rtol=1e-4, atol=1e-5)
