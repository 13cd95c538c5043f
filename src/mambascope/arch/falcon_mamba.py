"""FalconMamba (``FalconMambaForCausalLM``): Mamba-1 with weightless RMS norms on Δ_low, B and C
after x_proj (``mixer_rms_eps``); otherwise the Mamba-1 block."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from mambascope.arch.base import Context, Emit
from mambascope.arch.mamba import MambaAdapter
from mambascope.arch.parts import mamba1_mixer, weightless_rms


class FalconMambaAdapter(MambaAdapter):
    model_type = "falcon_mamba"
    hf_class = "FalconMambaForCausalLM"

    def run_mixer(self, mixer: nn.Module, hidden: torch.Tensor, ctx: Context, emit: Emit) -> torch.Tensor:
        norm = partial(weightless_rms, eps=mixer.rms_eps)
        return mamba1_mixer(mixer, hidden, ctx.mask, emit, bcdt_norms=(norm, norm, norm))
