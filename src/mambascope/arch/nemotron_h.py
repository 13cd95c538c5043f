"""Nemotron-H (``NemotronHForCausalLM``): every layer is one of a Mamba-2 mixer, attention without
rotary embeddings, a plain MLP (up, ``mlp_hidden_act`` — relu² by default — down) or a MoE of such MLPs
(sigmoid router with group-limited top-k, a shared expert, optional latent projections), each as
RMSNorm → part → residual (``layers_block_type``).

Neurons: ``mixer.hook_post`` (Mamba layers), ``mlp.hook_post`` = act(up x), down_proj's input (MLP
layers), ``mlp.hook_post`` [b, L, X, F] of the routed experts (MoE layers: zero where a token is not
routed to the expert); the shared expert's neurons are ``mlp.hook_shared_post``.
"""

from __future__ import annotations

import torch
from torch import nn

from mambascope.arch.base import Adapter, Context, Emit, UnsupportedFeature
from mambascope.arch.lrp_mode import normalize
from mambascope.arch.parts import llama_attention, mamba2_mixer, moe_with_router, plain_mlp

_PART = {"linear_attention": "mamba2", "full_attention": "attn", "mlp": "mlp", "moe": "moe"}


class NemotronHAdapter(Adapter):
    model_type = "nemotron_h"
    hf_class = "NemotronHForCausalLM"

    def check_supported(self) -> None:
        self.require_silu(self.config.mamba_hidden_act, "Nemotron-H", "Mamba-2", option="mamba_hidden_act")
        if self.config.sliding_window is not None:
            raise UnsupportedFeature("Nemotron-H with sliding-window attention (sliding_window) is not traced")

    def parts(self, layer: int) -> tuple[str, ...]:
        return (_PART[self.blocks()[layer].block_type],)

    def embed(self, input_ids: torch.Tensor, ctx: Context) -> torch.Tensor:
        return self.model.model.embeddings(input_ids)

    def run_block(self, layer: int, h: torch.Tensor, ctx: Context, emit: Emit) -> torch.Tensor:
        block = self.blocks()[layer]
        part, mixer = self.parts(layer)[0], block.mixer
        h = emit("hook_resid_pre", h)
        x = normalize(block.norm, h.to(block.norm.weight.dtype))
        if part == "mamba2":
            post = mamba2_mixer(mixer, x, ctx.mask, emit)
            out = emit("hook_mixer_out", mixer.out_proj(post.to(mixer.out_proj.weight.dtype)))
        elif part == "attn":
            z = llama_attention(mixer, x, None, ctx.mask, emit, layer in ctx.need_pattern)
            out = emit("hook_attn_out", mixer.o_proj(z))
        elif part == "mlp":
            out = emit("hook_mlp_out", plain_mlp(x, mixer.up_proj, mixer.down_proj, mixer.act_fn, emit))
        else:
            out = emit("hook_mlp_out", self._moe(mixer, x, emit))
        return emit("hook_resid_post", h + out)

    @staticmethod
    def _moe(moe: nn.Module, x: torch.Tensor, emit: Emit) -> torch.Tensor:
        experts = moe.experts
        # the router sees the hidden state, the experts its latent projection
        routed = moe_with_router(lambda _: moe.gate(x), moe.fc1_latent_proj(x), experts.up_proj, experts.down_proj,
                                 experts.act_fn, False, emit)
        shared = moe.shared_experts
        pre = emit("mlp.hook_shared_pre", shared.up_proj(x))
        shared_out = shared.down_proj(emit("mlp.hook_shared_post", shared.act_fn(pre)))
        return moe.fc2_latent_proj(routed) + shared_out

    def final_norm(self) -> nn.Module:
        return self.model.model.norm_f

    def mixer(self, layer: int) -> nn.Module:
        return self.blocks()[layer].mixer

    def out_projs(self, layer: int) -> dict[str, nn.Module]:
        part, mixer = self.parts(layer)[0], self.blocks()[layer].mixer
        if part == "mamba2":
            return {"mixer.hook_post": mixer.out_proj}
        if part == "attn":
            return {"attn.hook_z": mixer.o_proj}
        if part == "mlp":
            return {"mlp.hook_post": mixer.down_proj}
        return {"mlp.hook_shared_post": mixer.shared_experts.down_proj}

    def neuron_write_weights(self, layer: int) -> torch.Tensor:
        """MoE layers: [d_model, X·F], expert x's neuron f in column x·F + f (before the routing weight,
        through fc2_latent_proj when the experts work in a latent space)."""
        self.check_layer(layer)
        if self.parts(layer)[0] != "moe":
            return super().neuron_write_weights(layer)
        moe = self.blocks()[layer].mixer
        down = moe.experts.down_proj.detach()  # [X, latent or D, F]
        if isinstance(moe.fc2_latent_proj, nn.Linear):
            down = torch.einsum("dl,xlf->xdf", moe.fc2_latent_proj.weight.detach(), down)
        return down.permute(1, 0, 2).reshape(down.shape[1], -1)
