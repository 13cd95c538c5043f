"""Mamba-1 (``MambaForCausalLM``): RMSNorm, selective-scan mixer, residual; final RMSNorm."""

from __future__ import annotations

import torch
from torch import nn

from mambascope.arch.base import Adapter, Context, Emit
from mambascope.arch.lrp_mode import normalize
from mambascope.arch.parts import at_least_fp32, mamba1_mixer


class MambaAdapter(Adapter):
    model_type = "mamba"
    hf_class = "MambaForCausalLM"

    def blocks(self) -> nn.ModuleList:
        return self.model.backbone.layers

    def parts(self, layer: int) -> tuple[str, ...]:
        return ("mamba",)

    def embed(self, input_ids: torch.Tensor, ctx: Context) -> torch.Tensor:
        return self.model.backbone.embeddings(input_ids)

    def run_mixer(self, mixer: nn.Module, hidden: torch.Tensor, ctx: Context, emit: Emit) -> torch.Tensor:
        return mamba1_mixer(mixer, hidden, ctx.mask, emit, cache=ctx.part_cache(mixer))

    def run_block(self, layer: int, h: torch.Tensor, ctx: Context, emit: Emit) -> torch.Tensor:
        block = self.blocks()[layer]
        h = emit("hook_resid_pre", h)
        residual = at_least_fp32(h) if block.residual_in_fp32 else h
        post = self.run_mixer(block.mixer, normalize(block.norm, h.to(block.norm.weight.dtype)), ctx, emit)
        out = emit("hook_mixer_out", block.mixer.out_proj(post.to(block.mixer.out_proj.weight.dtype)))
        return emit("hook_resid_post", residual + out)

    def final_norm(self) -> nn.Module:
        return self.model.backbone.norm_f

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        norm = self.final_norm()
        return self.model.lm_head(normalize(norm, h.to(norm.weight.dtype)))

    def mixer(self, layer: int) -> nn.Module:
        return self.blocks()[layer].mixer

    def out_projs(self, layer: int) -> dict[str, nn.Module]:
        return {"mixer.hook_post": self.mixer(layer).out_proj}
