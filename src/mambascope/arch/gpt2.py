"""GPT-2 (``GPT2LMHeadModel``): learned positions; LN, causal attention, residual, LN, MLP, residual."""

from __future__ import annotations

import torch
from torch import nn

from mambascope.arch.base import Adapter, Context, Emit, UnsupportedFeature
from mambascope.arch.lrp_mode import normalize
from mambascope.arch.parts import attention, plain_mlp


class GPT2Adapter(Adapter):
    model_type = "gpt2"
    hf_class = "GPT2LMHeadModel"
    transformer = True

    def check_supported(self) -> None:
        if getattr(self.config, "add_cross_attention", False):
            raise UnsupportedFeature("GPT-2 with cross-attention (add_cross_attention=True) is not traced")

    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.h

    def parts(self, layer: int) -> tuple[str, ...]:
        return ("attn", "mlp")

    @property
    def max_length(self) -> int | None:
        return self.config.n_positions

    def embed(self, input_ids: torch.Tensor, ctx: Context) -> torch.Tensor:
        body = self.model.transformer
        positions = torch.arange(ctx.offset, ctx.offset + input_ids.shape[1], device=input_ids.device)
        return body.wte(input_ids) + body.wpe(positions)[None]

    def run_block(self, layer: int, h: torch.Tensor, ctx: Context, emit: Emit) -> torch.Tensor:
        block = self.blocks()[layer]
        attn = block.attn
        h = emit("hook_resid_pre", h)
        q, k, v = attn.c_attn(normalize(block.ln_1, h)).split(attn.split_size, dim=-1)
        q, k, v = (t.view(*t.shape[:2], attn.num_heads, attn.head_dim) for t in (q, k, v))
        scale = attn.head_dim**-0.5 if attn.scale_attn_weights else 1.0
        if attn.scale_attn_by_inverse_layer_idx:
            scale /= float(layer + 1)
        z = attention(q, k, v, ctx.mask, emit, scale, layer in ctx.need_pattern, ctx.part_cache(attn))
        h = emit("hook_resid_mid", h + emit("hook_attn_out", attn.c_proj(z)))
        mlp = block.mlp
        out = plain_mlp(normalize(block.ln_2, h), mlp.c_fc, mlp.c_proj, mlp.act, emit)
        return emit("hook_resid_post", h + emit("hook_mlp_out", out))

    def out_projs(self, layer: int) -> dict[str, nn.Module]:
        # Conv1D modules ([in, out] weights): forward hooks still see their inputs
        block = self.blocks()[layer]
        return {"attn.hook_z": block.attn.c_proj, "mlp.hook_post": block.mlp.c_proj}

    def final_norm(self) -> nn.Module:
        return self.model.transformer.ln_f


    def neuron_write_weights(self, layer: int) -> torch.Tensor:
        # c_proj is a ``Conv1D`` storing [E, d_model]
        self.check_layer(layer)
        return self.blocks()[layer].mlp.c_proj.weight.detach().T

    def head_write_weights(self, layer: int) -> torch.Tensor:
        # c_proj is a ``Conv1D`` storing [in, out]: already [H·dh, d_model]
        self.check_layer(layer)
        attn = self.blocks()[layer].attn
        return attn.c_proj.weight.detach().reshape(attn.num_heads, attn.head_dim, -1)
