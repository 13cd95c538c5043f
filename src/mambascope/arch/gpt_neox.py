"""GPT-NeoX / Pythia (``GPTNeoXForCausalLM``): LN, attention with partial rotary, LN, GELU MLP, with
the parallel residual h + attn(ln1 h) + mlp(ln2 h) when ``use_parallel_residual`` (Pythia's setting).

MLP neuron: ``mlp.hook_post`` = act(dense_h_to_4h x), the input of dense_4h_to_h.
"""

from __future__ import annotations

import torch
from torch import nn

from mambascope.arch.base import Adapter, Context, Emit
from mambascope.arch.llama import rotary_tables
from mambascope.arch.lrp_mode import normalize
from mambascope.arch.parts import attention, plain_mlp, rotate


class GPTNeoXAdapter(Adapter):
    model_type = "gpt_neox"
    hf_class = "GPTNeoXForCausalLM"
    transformer = True

    @property
    def parallel(self) -> bool:
        return bool(self.config.use_parallel_residual)

    def blocks(self) -> nn.ModuleList:
        return self.model.gpt_neox.layers

    def parts(self, layer: int) -> tuple[str, ...]:
        return ("attn", "mlp")

    def embed(self, input_ids: torch.Tensor, ctx: Context) -> torch.Tensor:
        h = self.model.gpt_neox.embed_in(input_ids)
        rotary_tables(self.model.gpt_neox.rotary_emb, h, ctx)
        return h

    def run_block(self, layer: int, h: torch.Tensor, ctx: Context, emit: Emit) -> torch.Tensor:
        block = self.blocks()[layer]
        attn = block.attention
        h = emit("hook_resid_pre", h)
        b, L, _ = h.shape
        # query_key_value packs q, k, v per head: [b, L, H, 3·dh]
        qkv = attn.query_key_value(normalize(block.input_layernorm, h)).view(b, L, -1, 3 * attn.head_size)
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = rotate(q, k, ctx.extra["cos"], ctx.extra["sin"])
        z = attention(q, k, v, ctx.mask, emit, attn.scaling, layer in ctx.need_pattern)
        attn_out = emit("hook_attn_out", attn.dense(z))
        mlp = block.mlp
        if self.parallel:
            out = plain_mlp(normalize(block.post_attention_layernorm, h), mlp.dense_h_to_4h, mlp.dense_4h_to_h,
                            mlp.act, emit)
            return emit("hook_resid_post", emit("hook_mlp_out", out) + attn_out + h)
        mid = emit("hook_resid_mid", attn_out + h)
        out = plain_mlp(normalize(block.post_attention_layernorm, mid), mlp.dense_h_to_4h, mlp.dense_4h_to_h,
                        mlp.act, emit)
        return emit("hook_resid_post", emit("hook_mlp_out", out) + mid)

    def final_norm(self) -> nn.Module:
        return self.model.gpt_neox.final_layer_norm


    def out_projs(self, layer: int) -> dict[str, nn.Module]:
        block = self.blocks()[layer]
        return {"attn.hook_z": block.attention.dense, "mlp.hook_post": block.mlp.dense_4h_to_h}
