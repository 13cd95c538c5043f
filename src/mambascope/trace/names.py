"""Hook names of the traced units (docs/design.md §3), following TransformerLens where a counterpart exists.

Every tensor is ``[batch, pos, ...]``. Per layer ``l`` the full name is ``blocks.{l}.<unit>``.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Sequence

# unit -> shape, per architecture.  E = d_inner, N = d_state, H = heads, G = groups, D = d_model, F = d_mlp.
UNITS: dict[str, dict[str, str]] = {
    "mamba": {
        "hook_resid_pre": "b,L,D",
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
        "hook_mixer_out": "b,L,D",
        "hook_resid_post": "b,L,D",
    },
    "mamba2": {
        "hook_resid_pre": "b,L,D",
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
        "hook_mixer_out": "b,L,D",
        "hook_resid_post": "b,L,D",
    },
    "gpt2": {
        "hook_resid_pre": "b,L,D",
        "attn.hook_v": "b,L,H,dh",
        "attn.hook_pattern": "b,H,L,L",
        "hook_attn_out": "b,L,D",
        "hook_resid_mid": "b,L,D",
        "mlp.hook_pre": "b,L,F",
        "mlp.hook_post": "b,L,F",
        "hook_mlp_out": "b,L,D",
        "hook_resid_post": "b,L,D",
    },
}

# The unit each architecture calls "the neuron" (docs/design.md §3).
NEURON_UNIT = {"mamba": "mixer.hook_post", "mamba2": "mixer.hook_post", "gpt2": "mlp.hook_post"}


def all_names(arch: str, n_layers: int) -> list[str]:
    """Every hook name of a model, in forward order."""
    return [f"blocks.{layer}.{unit}" for layer in range(n_layers) for unit in UNITS[arch]]


def resolve_names(arch: str, n_layers: int, patterns: str | Iterable[str] | None) -> list[str]:
    """Expand shell-style patterns (``blocks.*.mixer.hook_post``, ``*hook_dt``) to concrete names.

    A short unit name without ``blocks.`` (``mixer.hook_post``) means that unit in every layer.
    Raises ``KeyError`` naming the nearest valid name when a pattern matches nothing.
    """
    names = all_names(arch, n_layers)
    if patterns is None:
        return names
    if isinstance(patterns, str):
        patterns = [patterns]
    chosen: set[str] = set()
    for pattern in patterns:
        full = pattern if pattern.startswith(("blocks.", "*")) else f"blocks.*.{pattern}"
        hits = fnmatch.filter(names, full)
        if not hits:
            near = difflib.get_close_matches(pattern, names + list(UNITS[arch]), n=1, cutoff=0.3)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise KeyError(f"no hook named {pattern!r} in this {arch} model with {n_layers} layers{hint}")
        chosen.update(hits)
    return [name for name in names if name in chosen]


def layers_of(names: Sequence[str]) -> list[int]:
    """Sorted layer indices that a list of full hook names touches."""
    return sorted({int(name.split(".")[1]) for name in names})
