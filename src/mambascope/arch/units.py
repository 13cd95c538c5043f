"""Traced units of each kind of layer part (docs/design.md §3, §10).

A layer is a sequence of parts (an SSM mixer, attention, an MLP); its units are composed from the
parts', so the names say the layer's kind: ``mixer.*`` (SSM), ``attn.*``, ``mlp.*``.
"""

from __future__ import annotations

from collections.abc import Sequence

# unit -> shape.  E = d_inner, N = d_state, H = heads, G = groups, D = d_model, F = d_mlp, dh = head dim.
PART_UNITS: dict[str, dict[str, str]] = {
    "mamba": {
        "mixer.hook_x": "b,L,E",
        "mixer.hook_gate_pre": "b,L,E",
        "mixer.hook_conv": "b,L,E",
        "mixer.hook_ssm_input": "b,L,E",
        "mixer.hook_dt": "b,L,E",
        "mixer.hook_B": "b,L,N",
        "mixer.hook_C": "b,L,N",
        "mixer.hook_y": "b,L,E",
        "mixer.hook_gate": "b,L,E",
        "mixer.hook_post": "b,L,E",
    },
    "mamba2": {
        "mixer.hook_x": "b,L,E",
        "mixer.hook_gate_pre": "b,L,E",
        "mixer.hook_conv": "b,L,E",
        "mixer.hook_ssm_input": "b,L,E",
        "mixer.hook_dt": "b,L,H",
        "mixer.hook_B": "b,L,G,N",
        "mixer.hook_C": "b,L,G,N",
        "mixer.hook_y": "b,L,E",
        "mixer.hook_gate": "b,L,E",
        "mixer.hook_post": "b,L,E",
    },
    "attn": {
        "attn.hook_q": "b,L,H,dh",
        "attn.hook_k": "b,L,Hkv,dh",
        "attn.hook_v": "b,L,Hkv,dh",
        "attn.hook_pattern": "b,H,L,L",
        "attn.hook_z": "b,L,H,dh",
    },
    # act(up(x)): GELU / ReLU MLPs (GPT-2, GPT-NeoX)
    "mlp": {"mlp.hook_pre": "b,L,F", "mlp.hook_post": "b,L,F"},
    # act(gate(x)) · up(x): SwiGLU-style MLPs (Llama and the hybrids)
    "gated_mlp": {"mlp.hook_pre": "b,L,F", "mlp.hook_pre_linear": "b,L,F", "mlp.hook_post": "b,L,F"},
    # top-k routed experts (X of them) with act(up(x)) experts, plus a shared expert beside them
    "moe": {"mlp.hook_route": "b,L,X", "mlp.hook_pre": "b,L,X,F", "mlp.hook_post": "b,L,X,F",
            "mlp.hook_shared_pre": "b,L,Fs", "mlp.hook_shared_post": "b,L,Fs"},
    # top-k routed experts with act(gate(x)) · up(x) experts (no shared expert)
    "gated_moe": {"mlp.hook_route": "b,L,X", "mlp.hook_pre": "b,L,X,F", "mlp.hook_pre_linear": "b,L,X,F",
                  "mlp.hook_post": "b,L,X,F"},
    # the same with a gated shared expert beside them
    "gated_moe_shared": {"mlp.hook_route": "b,L,X", "mlp.hook_pre": "b,L,X,F", "mlp.hook_pre_linear": "b,L,X,F",
                         "mlp.hook_post": "b,L,X,F", "mlp.hook_shared_pre": "b,L,Fs",
                         "mlp.hook_shared_pre_linear": "b,L,Fs", "mlp.hook_shared_post": "b,L,Fs"},
}
# The SSM state h_p after each of K requested positions p (not a per-position unit: kept only when
# positions are given, so memory is O(b·E·N·K)).  P = head dim; Mamba-1's E channels each hold N states.
STATE_UNIT = "mixer.hook_ssm_state"
STATE_SHAPES = {"mamba": "b,K,E,N", "mamba2": "b,K,H,P,N"}
# The residual-stream write of each part.
PART_OUT = {"mamba": "hook_mixer_out", "mamba2": "hook_mixer_out", "attn": "hook_attn_out", "mlp": "hook_mlp_out",
            "gated_mlp": "hook_mlp_out", "moe": "hook_mlp_out", "gated_moe": "hook_mlp_out",
            "gated_moe_shared": "hook_mlp_out"}


def layer_units(parts: Sequence[str], parallel: bool = False) -> dict[str, str]:
    """Units of a layer made of ``parts`` in forward order.

    Sequential parts add ``hook_resid_mid`` between them; ``parallel`` parts (GPT-NeoX's parallel
    residual) read the same ``hook_resid_pre`` and have none.
    """
    units = {"hook_resid_pre": "b,L,D"}
    for i, part in enumerate(parts):
        units.update(PART_UNITS[part])
        units[PART_OUT[part]] = "b,L,D"
        if not parallel and i < len(parts) - 1:
            units["hook_resid_mid"] = "b,L,D"
    units["hook_resid_post"] = "b,L,D"
    return units
