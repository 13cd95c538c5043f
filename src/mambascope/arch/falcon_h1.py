"""Falcon-H1 (``FalconH1ForCausalLM``): every layer runs a Mamba-2 mixer and rotary attention in parallel
on the same normed input, adds both, then a SwiGLU MLP: RMSNorm → (mixer ‖ attention) → residual →
RMSNorm → MLP → residual, with Falcon-H1's μP multipliers (``ssm_in/out_multiplier``, the per-slice
``ssm_multipliers`` on in_proj's output, ``attention_in/out_multiplier``, ``key_multiplier``,
``mlp_multipliers``, ``embedding_multiplier``, ``lm_head_multiplier``).

Units: ``mixer.*`` and ``attn.*`` in every layer (``hook_mixer_out`` and ``hook_attn_out`` include
their out multipliers), ``mlp.*`` after them.  Neurons: ``mixer.hook_post`` (its gate: y ⊙ SiLU(z)
without ``mamba_rms_norm``, else the gated RMSNorm); the MLP's ``mlp.hook_post`` = act(gate·m_gate)·up.
"""

from __future__ import annotations

import torch
from torch import nn

from mambascope.arch.base import Adapter, Context, Emit, UnsupportedFeature
from mambascope.arch.llama import rotary_tables
from mambascope.arch.lrp_mode import normalize
from mambascope.arch.parts import attention, gated_mlp, mamba2_mixer, rotate
from mambascope.arch.units import layer_units
from mambascope.ssm.params import MixerParams


class FalconH1Adapter(Adapter):
    model_type = "falcon_h1"
    hf_class = "FalconH1ForCausalLM"

    def check_supported(self) -> None:
        self.require_silu(self.config.hidden_act, "Falcon-H1", "Mamba-2")

    def parts(self, layer: int) -> tuple[str, ...]:
        return ("mamba2", "attn", "gated_mlp")

    def units(self, layer: int) -> dict[str, str]:
        # mixer and attention read the same input; the MLP follows their sum
        both = layer_units(("mamba2", "attn"), parallel=True)
        both.pop("hook_resid_post")
        mlp = layer_units(("gated_mlp",))
        mlp.pop("hook_resid_pre")
        return {**both, "hook_resid_mid": "b,L,D", **mlp}

    def embed(self, input_ids: torch.Tensor, ctx: Context) -> torch.Tensor:
        body = self.model.model
        h = body.embed_tokens(input_ids) * body.embedding_multiplier
        rotary_tables(body.rotary_emb, h, ctx)
        return h

    def run_block(self, layer: int, h: torch.Tensor, ctx: Context, emit: Emit) -> torch.Tensor:
        block, cfg = self.blocks()[layer], self.config
        h = emit("hook_resid_pre", h)
        x = normalize(block.input_layernorm, h)
        mixer = block.mamba
        post = mamba2_mixer(mixer, x, ctx.mask, emit, in_scale=mixer.ssm_in_multiplier, proj_scale=mixer.mup_vector,
                            rms_norm=cfg.mamba_rms_norm, norm_before_gate=cfg.mamba_norm_before_gate)
        ssm_out = mixer.out_proj(post.to(mixer.out_proj.weight.dtype)) * block.ssm_out_multiplier
        ssm_out = emit("hook_mixer_out", ssm_out)
        attn = block.self_attn
        xa = x * block.attention_in_multiplier
        b, L, _ = xa.shape
        q, k, v = (proj(xa).view(b, L, -1, attn.head_dim) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = rotate(q, k * attn.key_multiplier, ctx.extra["cos"], ctx.extra["sin"])
        z = attention(q, k, v, ctx.mask, emit, attn.scaling, layer in ctx.need_pattern)
        attn_out = emit("hook_attn_out", attn.o_proj(z) * block.attn_out_multiplier)
        h = emit("hook_resid_mid", h + (ssm_out + attn_out))
        mlp = block.feed_forward
        out = gated_mlp(normalize(block.pre_ff_layernorm, h), lambda t: mlp.gate_proj(t) * mlp.gate_multiplier,
                        mlp.up_proj, mlp.down_proj, mlp.act_fn, emit) * mlp.down_multiplier
        return emit("hook_resid_post", h + emit("hook_mlp_out", out))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return super().logits(h) * self.model.model.lm_head_multiplier

    def final_norm(self) -> nn.Module:
        return self.model.model.final_layernorm

    def mixer(self, layer: int) -> nn.Module:
        return self.blocks()[layer].mamba

    def mixer_params(self, layer: int) -> MixerParams:
        """As Mamba-2, with ``norm_weight`` None when the mixer gates y ⊙ SiLU(z) without a norm."""
        if self.config.mamba_rms_norm and self.config.mamba_norm_before_gate:
            raise UnsupportedFeature("Falcon-H1 mixer parameters with mamba_norm_before_gate=True: the hidden "
                                     "attention's output gate assumes the norm after the gate")
        return super().mixer_params(layer)

    def out_projs(self, layer: int) -> dict[str, nn.Module]:
        block = self.blocks()[layer]
        return {"mixer.hook_post": block.mamba.out_proj, "attn.hook_z": block.self_attn.o_proj,
                "mlp.hook_post": block.feed_forward.down_proj}

    def neuron_write_weights(self, layer: int) -> torch.Tensor:
        """The mixer's out_proj times ``ssm_out_multiplier``."""
        return super().neuron_write_weights(layer) * self.blocks()[layer].ssm_out_multiplier

    def head_write_weights(self, layer: int) -> torch.Tensor:
        return super().head_write_weights(layer) * self.blocks()[layer].attn_out_multiplier
