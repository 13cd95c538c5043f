"""Jamba (``JambaForCausalLM``): each layer is a Mamba-1 mixer (with RMSNorms on Δ_low, B, C after x_proj)
or attention without position embeddings, then a SwiGLU MLP or a top-k softmax-routed MoE of SwiGLU
experts (``expert_layer_period``/``offset``): RMSNorm, mixer | attention, residual, RMSNorm, MLP | MoE, residual.

Neurons: ``mixer.hook_post`` on Mamba layers, ``mlp.hook_post`` on attention layers (SwiGLU: act(gate)·up;
MoE: [b, L, X, F], zero where a token is not routed to the expert).
"""

from __future__ import annotations

import torch
from torch import nn

from mambascope.arch.base import Adapter, Context, Emit
from mambascope.arch.lrp_mode import normalize
from mambascope.arch.parts import gated_mlp, llama_attention, mamba1_mixer, moe_with_router


class JambaAdapter(Adapter):
    model_type = "jamba"
    hf_class = "JambaForCausalLM"

    def check_supported(self) -> None:
        self.require_silu(self.config.hidden_act, "Jamba", "Mamba-1")

    def _moe(self, layer: int) -> bool:
        return self.config.layers_num_experts[layer] > 1

    def parts(self, layer: int) -> tuple[str, ...]:
        first = "mamba" if self.config.layer_types[layer] == "linear_attention" else "attn"
        return (first, "gated_moe" if self._moe(layer) else "gated_mlp")

    def embed(self, input_ids: torch.Tensor, ctx: Context) -> torch.Tensor:
        return self.model.model.embed_tokens(input_ids)

    def run_block(self, layer: int, h: torch.Tensor, ctx: Context, emit: Emit) -> torch.Tensor:
        block = self.blocks()[layer]
        h = emit("hook_resid_pre", h)
        x = normalize(block.input_layernorm, h)
        if self.parts(layer)[0] == "mamba":
            mixer = block.mamba
            post = mamba1_mixer(mixer, x, ctx.mask, emit,
                                bcdt_norms=(mixer.dt_layernorm, mixer.b_layernorm, mixer.c_layernorm))
            out = emit("hook_mixer_out", mixer.out_proj(post.to(mixer.out_proj.weight.dtype)))
        else:
            z = llama_attention(block.self_attn, x, None, ctx.mask, emit, layer in ctx.need_pattern)
            out = emit("hook_attn_out", block.self_attn.o_proj(z))
        h = emit("hook_resid_mid", h + out)
        x = normalize(block.pre_ff_layernorm, h)
        ff = block.feed_forward
        if self._moe(layer):
            experts = ff.experts
            out = moe_with_router(ff.router, x, experts.gate_up_proj, experts.down_proj, experts.act_fn, True, emit)
        else:
            out = gated_mlp(x, ff.gate_proj, ff.up_proj, ff.down_proj, ff.act_fn, emit)
        return emit("hook_resid_post", h + emit("hook_mlp_out", out))

    def final_norm(self) -> nn.Module:
        return self.model.model.final_layernorm

    def mixer(self, layer: int) -> nn.Module:
        return self.blocks()[layer].mamba

    def out_projs(self, layer: int) -> dict[str, nn.Module]:
        block = self.blocks()[layer]
        first = {"mixer.hook_post": block.mamba.out_proj} if self.parts(layer)[0] == "mamba" else {
            "attn.hook_z": block.self_attn.o_proj}
        return first if self._moe(layer) else {**first, "mlp.hook_post": block.feed_forward.down_proj}

    def neuron_write_weights(self, layer: int) -> torch.Tensor:
        """MoE layers: [d_model, X·F], expert x's neuron f in column x·F + f."""
        self.check_layer(layer)
        if self.parts(layer)[0] == "attn" and self._moe(layer):
            down = self.blocks()[layer].feed_forward.experts.down_proj.detach()  # [X, D, F]
            return down.permute(1, 0, 2).reshape(down.shape[1], -1)
        return super().neuron_write_weights(layer)
