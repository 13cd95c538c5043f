"""Granite-4.0-H (``GraniteMoeHybridForCausalLM``): each layer is a Mamba-2 mixer or attention (rotary
only when ``position_embedding_type="rope"``), then top-k gated experts plus a gated shared MLP (or the
shared MLP alone without experts), both residual writes scaled by ``residual_multiplier``; embeddings
scaled by ``embedding_multiplier``, logits divided by ``logits_scaling``, attention scaled by
``attention_multiplier``.

Neurons: ``mixer.hook_post`` on Mamba layers, ``mlp.hook_post`` (shared MLP without experts: act(gate)·up;
with experts: [b, L, X, F], zero off-route) on attention layers.
"""

from __future__ import annotations

import torch
from torch import nn

from mambascope.arch.base import Adapter, Context, Emit
from mambascope.arch.llama import rotary_tables
from mambascope.arch.parts import gated_mlp, llama_attention, mamba2_mixer, moe_with_router


def _halves(linear: nn.Module, which: int):
    """One half (0: gate, 1: up) of a fused gate‖up linear, as a function of x."""
    return lambda x: linear(x).chunk(2, dim=-1)[which]


class GraniteMoeHybridAdapter(Adapter):
    model_type = "granitemoehybrid"
    hf_class = "GraniteMoeHybridForCausalLM"

    def check_supported(self) -> None:
        self.require_silu(self.config.hidden_act, "Granite-4.0-H", "Mamba-2")

    def parts(self, layer: int) -> tuple[str, ...]:
        first = "mamba2" if self.blocks()[layer].mamba is not None else "attn"
        return (first, "gated_moe_shared" if self.blocks()[layer].has_experts else "gated_mlp")

    def embed(self, input_ids: torch.Tensor, ctx: Context) -> torch.Tensor:
        body = self.model.model
        h = body.embed_tokens(input_ids) * body.embedding_multiplier
        if body.rotary_emb is not None:
            rotary_tables(body.rotary_emb, h, ctx)
        return h

    def run_block(self, layer: int, h: torch.Tensor, ctx: Context, emit: Emit) -> torch.Tensor:
        block = self.blocks()[layer]
        h = emit("hook_resid_pre", h)
        x = block.input_layernorm(h)
        if block.mamba is not None:
            post = mamba2_mixer(block.mamba, x, ctx.mask, emit)
            out = emit("hook_mixer_out", block.mamba.out_proj(post.to(block.mamba.out_proj.weight.dtype)))
        else:
            rotary = (ctx.extra["cos"], ctx.extra["sin"]) if "cos" in ctx.extra else None
            z = llama_attention(block.self_attn, x, rotary, ctx.mask, emit, layer in ctx.need_pattern)
            out = emit("hook_attn_out", block.self_attn.o_proj(z))
        h = emit("hook_resid_mid", h + out * block.residual_multiplier)
        x = block.post_attention_layernorm(h)
        shared = block.shared_mlp
        if block.has_experts:
            experts = block.block_sparse_moe.experts
            out = moe_with_router(block.block_sparse_moe.router, x, experts.gate_up_proj, experts.down_proj,
                                  experts.act_fn, True, emit)
            pre = emit("mlp.hook_shared_pre", _halves(shared.input_linear, 0)(x))
            lin = emit("mlp.hook_shared_pre_linear", _halves(shared.input_linear, 1)(x))
            out = out + shared.output_linear(emit("mlp.hook_shared_post", shared.activation(pre) * lin))
        else:
            out = gated_mlp(x, _halves(shared.input_linear, 0), _halves(shared.input_linear, 1), shared.output_linear,
                            shared.activation, emit)
        return emit("hook_resid_post", h + emit("hook_mlp_out", out) * block.residual_multiplier)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return super().logits(h) / self.config.logits_scaling

    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    def mixer(self, layer: int) -> nn.Module:
        return self.blocks()[layer].mamba

    def out_projs(self, layer: int) -> dict[str, nn.Module]:
        block = self.blocks()[layer]
        first = {"mixer.hook_post": block.mamba.out_proj} if block.mamba is not None else {
            "attn.hook_z": block.self_attn.o_proj}
        mlp = "mlp.hook_shared_post" if block.has_experts else "mlp.hook_post"
        return {**first, mlp: block.shared_mlp.output_linear}

    def neuron_write_weights(self, layer: int) -> torch.Tensor:
        """Includes ``residual_multiplier``; MoE neurons: [d_model, X·F], expert x's neuron f in column x·F + f."""
        self.check_layer(layer)
        block = self.blocks()[layer]
        if block.mamba is None and block.has_experts:
            down = block.block_sparse_moe.experts.down_proj.detach()  # [X, D, F]
            W = down.permute(1, 0, 2).reshape(down.shape[1], -1)
        else:
            W = super().neuron_write_weights(layer)
        return W * block.residual_multiplier

    def head_write_weights(self, layer: int) -> torch.Tensor:
        return super().head_write_weights(layer) * self.config.residual_multiplier
