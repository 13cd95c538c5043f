"""Llama (``LlamaForCausalLM``): RMSNorm, rotary grouped-query attention, residual, RMSNorm, SwiGLU MLP, residual.

MLP neuron: ``mlp.hook_post`` = act(gate_proj x) · up_proj x, the input of down_proj.
"""

from __future__ import annotations

import torch
from torch import nn

from mambascope.arch.base import Adapter, Context, Emit
from mambascope.arch.lrp_mode import normalize
from mambascope.arch.parts import gated_mlp, llama_attention


def rotary_tables(rotary_emb: nn.Module, h: torch.Tensor, ctx: Context) -> None:
    """cos, sin [1, L, rotary dim] of positions 0..L-1 (from ``ctx.offset`` while decoding), what HF uses
    when no position_ids are passed (left padding included), from the model's own rotary module (so every
    rope scaling is its own)."""
    positions = torch.arange(ctx.offset, ctx.offset + h.shape[1], device=h.device)[None]
    ctx.extra["cos"], ctx.extra["sin"] = rotary_emb(h, positions)


class LlamaAdapter(Adapter):
    model_type = "llama"
    hf_class = "LlamaForCausalLM"
    transformer = True

    def parts(self, layer: int) -> tuple[str, ...]:
        return ("attn", "gated_mlp")

    def embed(self, input_ids: torch.Tensor, ctx: Context) -> torch.Tensor:
        h = self.model.model.embed_tokens(input_ids)
        rotary_tables(self.model.model.rotary_emb, h, ctx)
        return h

    def run_block(self, layer: int, h: torch.Tensor, ctx: Context, emit: Emit) -> torch.Tensor:
        block = self.blocks()[layer]
        h = emit("hook_resid_pre", h)
        attn = block.self_attn
        z = llama_attention(attn, normalize(block.input_layernorm, h), (ctx.extra["cos"], ctx.extra["sin"]), ctx.mask,
                            emit, layer in ctx.need_pattern)
        h = emit("hook_resid_mid", h + emit("hook_attn_out", attn.o_proj(z)))
        mlp = block.mlp
        out = gated_mlp(normalize(block.post_attention_layernorm, h), mlp.gate_proj, mlp.up_proj, mlp.down_proj,
                        mlp.act_fn, emit)
        return emit("hook_resid_post", h + emit("hook_mlp_out", out))

    def final_norm(self) -> nn.Module:
        return self.model.model.norm


    def out_projs(self, layer: int) -> dict[str, nn.Module]:
        block = self.blocks()[layer]
        return {"attn.hook_z": block.self_attn.o_proj, "mlp.hook_post": block.mlp.down_proj}
