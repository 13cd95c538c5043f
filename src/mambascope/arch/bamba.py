"""Bamba (``BambaForCausalLM``): each layer is a Mamba-2 mixer or rotary attention (``attn_layer_indices``),
then a SwiGLU MLP: RMSNorm, mixer | attention, residual, RMSNorm, MLP, residual.

Neurons: ``mixer.hook_post`` on Mamba layers, ``mlp.hook_post`` (act(gate)·up, down_proj's input) on
attention layers; the MLP after a mixer is traced (``mlp.*``) but the layer's neuron is the mixer's.
"""

from __future__ import annotations

import torch
from torch import nn

from mambascope.arch.base import Adapter, Context, Emit
from mambascope.arch.llama import rotary_tables
from mambascope.arch.lrp_mode import normalize
from mambascope.arch.parts import gated_mlp, llama_attention, mamba2_mixer


class BambaAdapter(Adapter):
    model_type = "bamba"
    hf_class = "BambaForCausalLM"

    def check_supported(self) -> None:
        self.require_silu(self.config.hidden_act, "Bamba", "Mamba-2")

    def parts(self, layer: int) -> tuple[str, ...]:
        first = "mamba2" if self.config.layers_block_type[layer] == "linear_attention" else "attn"
        return (first, "gated_mlp")

    def embed(self, input_ids: torch.Tensor, ctx: Context) -> torch.Tensor:
        h = self.model.model.embed_tokens(input_ids)
        rotary_tables(self.model.model.rotary_emb, h, ctx)
        return h

    def run_block(self, layer: int, h: torch.Tensor, ctx: Context, emit: Emit) -> torch.Tensor:
        block = self.blocks()[layer]
        h = emit("hook_resid_pre", h)
        x = normalize(block.input_layernorm, h)
        if block.block_type == "linear_attention":
            post = mamba2_mixer(block.mamba, x, ctx.mask, emit, cache=ctx.part_cache(block.mamba))
            out = emit("hook_mixer_out", block.mamba.out_proj(post.to(block.mamba.out_proj.weight.dtype)))
        else:
            attn = block.self_attn
            z = llama_attention(attn, x, (ctx.extra["cos"], ctx.extra["sin"]), ctx.mask, emit,
                                layer in ctx.need_pattern, ctx.part_cache(attn))
            out = emit("hook_attn_out", attn.o_proj(z))
        h = emit("hook_resid_mid", h + out)
        mlp = block.feed_forward
        out = gated_mlp(normalize(block.pre_ff_layernorm, h), mlp.gate_proj, mlp.up_proj, mlp.down_proj,
                        mlp.act_fn, emit)
        return emit("hook_resid_post", h + emit("hook_mlp_out", out))

    def final_norm(self) -> nn.Module:
        return self.model.model.final_layernorm

    def mixer(self, layer: int) -> nn.Module:
        return self.blocks()[layer].mamba

    def out_projs(self, layer: int) -> dict[str, nn.Module]:
        block = self.blocks()[layer]
        first = {"mixer.hook_post": block.mamba.out_proj} if block.block_type == "linear_attention" else {
            "attn.hook_z": block.self_attn.o_proj}
        return {**first, "mlp.hook_post": block.feed_forward.down_proj}
