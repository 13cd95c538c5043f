"""Zamba2 (``Zamba2ForCausalLM``): Mamba-2 layers, some of them "hybrid": before the mixer, a shared
transformer block (one of ``num_mem_blocks``, weights tied across uses, per-use LoRA adapters) reads
RMSNorm([h ‖ original embeddings]), runs attention (no residual), RMSNorm, a gated MLP, then a
per-layer linear; its output is added to the Mamba input, not to the residual stream:
h ← h + mamba(RMSNorm(h + linear(mlp(attn(...))))).

Units of a hybrid layer: ``attn.*``, ``hook_attn_out``, ``mlp.*``, ``hook_mlp_out``, ``hook_shared_out``
(the shared block's output after the linear, added to the Mamba input), then the ``mixer.*`` units.
Neurons: ``mixer.hook_post``; the shared MLP's ``mlp.hook_post`` = act(gate)·up is traced too.
"""

from __future__ import annotations

import torch
from torch import nn

from mambascope.arch.base import Adapter, Context, Emit
from mambascope.arch.llama import rotary_tables
from mambascope.arch.parts import attention, gated_mlp, mamba2_mixer, rotate
from mambascope.arch.units import PART_UNITS


class Zamba2Adapter(Adapter):
    model_type = "zamba2"
    hf_class = "Zamba2ForCausalLM"

    def _hybrid(self, layer: int) -> bool:
        return self.config.layers_block_type[layer] == "hybrid"

    def parts(self, layer: int) -> tuple[str, ...]:
        return ("attn", "gated_mlp", "mamba2") if self._hybrid(layer) else ("mamba2",)

    def units(self, layer: int) -> dict[str, str]:
        D = "b,L,D"
        shared = {**PART_UNITS["attn"], "hook_attn_out": D, **PART_UNITS["gated_mlp"], "hook_mlp_out": D,
                  "hook_shared_out": D} if self._hybrid(layer) else {}
        return {"hook_resid_pre": D, **shared, **PART_UNITS["mamba2"], "hook_mixer_out": D, "hook_resid_post": D}

    def embed(self, input_ids: torch.Tensor, ctx: Context) -> torch.Tensor:
        body = self.model.model
        h = body.embed_tokens(input_ids)
        ctx.extra["original"] = h
        if self.config.use_mem_rope:
            rotary_tables(body.rotary_emb, h, ctx)
        return h

    def run_block(self, layer: int, h: torch.Tensor, ctx: Context, emit: Emit) -> torch.Tensor:
        block = self.blocks()[layer]
        h = emit("hook_resid_pre", h)
        mamba_in = h
        if self._hybrid(layer):
            shared = self._shared(block.shared_transformer, layer, h, ctx, emit)
            mamba_in = h + emit("hook_shared_out", block.linear(shared))
            block = block.mamba_decoder
        mixer = block.mamba
        post = mamba2_mixer(mixer, block.input_layernorm(mamba_in), ctx.mask, emit)
        out = emit("hook_mixer_out", mixer.out_proj(post.to(mixer.out_proj.weight.dtype)))
        return emit("hook_resid_post", h + out)

    def _shared(self, shared: nn.Module, layer: int, h: torch.Tensor, ctx: Context, emit: Emit) -> torch.Tensor:
        """The shared transformer block's output (before the per-layer linear)."""
        x = shared.input_layernorm(torch.cat([h, ctx.extra["original"]], dim=-1))
        attn = shared.self_attn
        qkv = [proj(x) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)]
        if self.config.use_shared_attention_adapter:
            # a use whose adapter is not this block's holds nn.Identity, which HF adds too
            use = attn.layer_dic[layer]
            adapters = (attn.linear_q_adapter_list, attn.linear_k_adapter_list, attn.linear_v_adapter_list)
            qkv = [t + ad[use](x) for t, ad in zip(qkv, adapters, strict=True)]
        b, L, _ = x.shape
        q, k, v = (t.view(b, L, -1, attn.head_dim) for t in qkv)
        if self.config.use_mem_rope:
            q, k = rotate(q, k, ctx.extra["cos"], ctx.extra["sin"])
        z = attention(q, k, v, ctx.mask, emit, attn.scaling, layer in ctx.need_pattern)
        x = shared.pre_ff_layernorm(emit("hook_attn_out", attn.o_proj(z)))
        mlp = shared.feed_forward
        gate, up = (mlp.gate_up_proj(x) + mlp.gate_up_proj_adapter_list[mlp.layer_dic[layer]](x)).chunk(2, dim=-1)
        out = gated_mlp(x, lambda _: gate, lambda _: up, mlp.down_proj, mlp.act_fn, emit)
        return emit("hook_mlp_out", out)

    def final_norm(self) -> nn.Module:
        return self.model.model.final_layernorm

    def mixer(self, layer: int) -> nn.Module:
        block = self.blocks()[layer]
        return (block.mamba_decoder if self._hybrid(layer) else block).mamba

    def out_projs(self, layer: int) -> dict[str, nn.Module]:
        projs = {"mixer.hook_post": self.mixer(layer).out_proj}
        if self._hybrid(layer):
            shared = self.blocks()[layer].shared_transformer
            projs |= {"attn.hook_z": shared.self_attn.o_proj, "mlp.hook_post": shared.feed_forward.down_proj}
        return projs
