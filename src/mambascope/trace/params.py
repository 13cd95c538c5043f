"""Per-layer parameters that analyses need besides traced activations (A, D, conv, out_proj, norms).

Only ``trace/`` reads module internals; everything downstream receives these plain tensors.  The
record type :class:`~mambascope.ssm.params.MixerParams` belongs to ``ssm/`` (math on tensors), which
never imports ``trace/`` (docs/design.md §2).
"""

from __future__ import annotations

import torch
from torch import nn

from mambascope.ssm.params import MixerParams


def architecture(model: nn.Module) -> str:
    """``"mamba"``, ``"mamba2"`` or ``"gpt2"`` for a supported Hugging Face causal LM."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ("mamba", "mamba2", "gpt2"):
        return model_type
    raise ValueError(
        f"unsupported architecture {model_type!r}: mambascope supports MambaForCausalLM (mamba), "
        "Mamba2ForCausalLM (mamba2) and GPT2LMHeadModel (gpt2)"
    )


def n_layers(model: nn.Module) -> int:
    return model.config.num_hidden_layers if architecture(model) != "gpt2" else model.config.n_layer


def mixer_params(model: nn.Module, layer: int) -> MixerParams:
    """The mixer parameters of ``layer`` of a Mamba-1 or Mamba-2 model."""
    arch = architecture(model)
    if arch == "gpt2":
        raise ValueError("mixer_params needs a Mamba model; GPT-2 style models have no selective scan")
    count = n_layers(model)
    if not 0 <= layer < count:
        raise IndexError(f"layer {layer} out of range: the model has layers 0..{count - 1}")
    mixer = model.backbone.layers[layer].mixer
    A = -torch.exp(mixer.A_log.detach().float())
    conv_w = mixer.conv1d.weight.detach()[:, 0, :]
    conv_b = mixer.conv1d.bias.detach() if mixer.conv1d.bias is not None else None
    E = mixer.intermediate_size
    if arch == "mamba":
        return MixerParams(
            arch, A, mixer.D.detach(), conv_w, conv_b, mixer.out_proj.weight.detach(),
            d_inner=E, d_state=mixer.ssm_state_size, n_heads=E, head_dim=1, n_groups=1,
        )
    return MixerParams(
        arch, A, mixer.D.detach(), conv_w[:E], None if conv_b is None else conv_b[:E],
        mixer.out_proj.weight.detach(), d_inner=E, d_state=mixer.ssm_state_size, n_heads=mixer.num_heads,
        head_dim=mixer.head_dim, n_groups=mixer.n_groups, norm_weight=mixer.norm.weight.detach(),
        norm_eps=mixer.norm.variance_epsilon,
    )


def neuron_write_weights(model: nn.Module, layer: int) -> torch.Tensor:
    """[d_model, E]: column e is what neuron e writes into the residual stream per unit of activation.

    Mamba: out_proj weight.  GPT-2: the MLP's c_proj (a ``Conv1D`` storing [E, d_model], transposed here).
    """
    count = n_layers(model)
    if not 0 <= layer < count:
        raise IndexError(f"layer {layer} out of range: the model has layers 0..{count - 1}")
    if architecture(model) == "gpt2":
        return model.transformer.h[layer].mlp.c_proj.weight.detach().T
    return model.backbone.layers[layer].mixer.out_proj.weight.detach()


def head_write_weights(model: nn.Module, layer: int) -> torch.Tensor:
    """[H, d_head, d_model]: W_O of each attention head of a GPT-2 layer, so that
    hook_attn_out[t] = Σ_h Σ_s pattern_h[t, s] · v[s, h] · W_O[h] + c_proj.bias (c_proj is a ``Conv1D``, [in, out])."""
    if architecture(model) != "gpt2":
        raise ValueError("head_write_weights needs a GPT-2 style model; Mamba layers have no attention heads")
    count = n_layers(model)
    if not 0 <= layer < count:
        raise IndexError(f"layer {layer} out of range: the model has layers 0..{count - 1}")
    attn = model.transformer.h[layer].attn
    return attn.c_proj.weight.detach().reshape(attn.num_heads, attn.head_dim, -1)


def unembedding(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(final norm weight [d_model], unembedding W_U [V, d_model]) for direct logit effects."""
    final_norm = model.transformer.ln_f if architecture(model) == "gpt2" else model.backbone.norm_f
    return final_norm.weight.detach(), model.lm_head.weight.detach()
