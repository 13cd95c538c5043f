"""Mamba-2 (``Mamba2ForCausalLM``): RMSNorm, SSD mixer with gated RMSNorm, residual; final RMSNorm."""

from __future__ import annotations

import torch
from torch import nn

from mambascope.arch.base import Context, Emit
from mambascope.arch.mamba import MambaAdapter
from mambascope.arch.parts import mamba2_mixer


class Mamba2Adapter(MambaAdapter):
    model_type = "mamba2"
    hf_class = "Mamba2ForCausalLM"

    def parts(self, layer: int) -> tuple[str, ...]:
        return ("mamba2",)

    def run_mixer(self, mixer: nn.Module, hidden: torch.Tensor, ctx: Context, emit: Emit) -> torch.Tensor:
        return mamba2_mixer(mixer, hidden, ctx.mask, emit, cache=ctx.part_cache(mixer))
