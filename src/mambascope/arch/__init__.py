"""Architecture adapters: one module per Hugging Face family behind one interface (docs/design.md §10).

``adapter(model)`` returns the family's :class:`Adapter`, the only code that reads a family's module
internals; the rest of mambascope asks it for layer kinds, units, neurons and parameters.  To add a
family: write ``arch/<family>.py`` with an ``Adapter`` subclass and add it to ``ADAPTERS``
(docs/architectures.md).
"""

from __future__ import annotations

import torch
from torch import nn

from mambascope.arch.bamba import BambaAdapter
from mambascope.arch.base import Adapter, Context, UnsupportedFeature
from mambascope.arch.falcon_h1 import FalconH1Adapter
from mambascope.arch.falcon_mamba import FalconMambaAdapter
from mambascope.arch.gpt2 import GPT2Adapter
from mambascope.arch.gpt_neox import GPTNeoXAdapter
from mambascope.arch.granitemoehybrid import GraniteMoeHybridAdapter
from mambascope.arch.jamba import JambaAdapter
from mambascope.arch.llama import LlamaAdapter
from mambascope.arch.mamba import MambaAdapter
from mambascope.arch.mamba2 import Mamba2Adapter
from mambascope.arch.nemotron_h import NemotronHAdapter
from mambascope.arch.zamba2 import Zamba2Adapter
from mambascope.ssm.params import MixerParams

# config.model_type -> adapter, in the order error messages list them.
ADAPTERS: dict[str, type[Adapter]] = {
    cls.model_type: cls
    for cls in (MambaAdapter, Mamba2Adapter, GPT2Adapter, FalconMambaAdapter, GPTNeoXAdapter, LlamaAdapter,
                BambaAdapter, NemotronHAdapter, GraniteMoeHybridAdapter, JambaAdapter,
                FalconH1Adapter, Zamba2Adapter)
}
# model_type -> the causal-LM class mambascope traces (what ``load_model`` accepts).
SUPPORTED: dict[str, str] = {name: cls.hf_class for name, cls in ADAPTERS.items()}


def adapter(model: nn.Module) -> Adapter:
    """The adapter of a supported Hugging Face causal LM; ``ValueError`` naming the supported ones otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        supported = ", ".join(f"{cls} ({name})" for name, cls in SUPPORTED.items())
        raise ValueError(f"unsupported architecture {model_type!r}: mambascope supports {supported}")
    return ADAPTERS[model_type](model)


def architecture(model: nn.Module) -> str:
    """The model's family (``config.model_type``): ``"mamba"``, ``"mamba2"``, ``"gpt2"``, ... (see ``SUPPORTED``)."""
    return adapter(model).model_type


def is_transformer(arch: str) -> bool:
    """Whether family ``arch`` is a pure transformer (attention neurons are its heads)."""
    return arch in ADAPTERS and ADAPTERS[arch].transformer


def n_layers(model: nn.Module) -> int:
    return adapter(model).n_layers


def mixer_params(model: nn.Module, layer: int) -> MixerParams:
    """The mixer parameters of SSM layer ``layer`` (Mamba-1 or Mamba-2 mixer) as plain tensors."""
    return adapter(model).mixer_params(layer)


def neuron_write_weights(model: nn.Module, layer: int) -> torch.Tensor:
    """[d_model, E]: column e is what neuron e of ``layer`` writes into the residual stream per unit of activation.

    SSM layers: the mixer's out_proj.  MLP layers: the down projection (GPT-2's c_proj, transposed).
    """
    return adapter(model).neuron_write_weights(layer)


def head_write_weights(model: nn.Module, layer: int) -> torch.Tensor:
    """[H, d_head, d_model]: W_O of each attention head of an attention layer, so that
    hook_attn_out[t] = Σ_h Σ_s pattern_h[t, s] · v[s, h] · W_O[h] + bias."""
    return adapter(model).head_write_weights(layer)


def unembedding(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(final norm weight [d_model], unembedding W_U [V, d_model]) for direct logit effects."""
    return adapter(model).unembedding()


__all__ = ["ADAPTERS", "SUPPORTED", "Adapter", "Context", "MixerParams", "UnsupportedFeature", "adapter",
           "architecture", "head_write_weights", "is_transformer", "mixer_params", "n_layers", "neuron_write_weights",
           "unembedding"]
