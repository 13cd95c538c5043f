"""Hook names of the traced units (docs/design.md §3, §10), following TransformerLens where a counterpart exists.

Every tensor is ``[batch, pos, ...]``. Per layer ``l`` the full name is ``blocks.{l}.<unit>``; the units
of each kind of layer part are in ``mambascope.arch.units``.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Mapping, Sequence

from mambascope.arch.units import PART_UNITS, layer_units

# Units of the three original layer kinds (kept for callers that index by architecture).
UNITS: dict[str, dict[str, str]] = {
    "mamba": layer_units(["mamba"]),
    "mamba2": layer_units(["mamba2"]),
    "gpt2": layer_units(["attn", "mlp"]),
}

# The unit each original architecture calls "the neuron" (docs/design.md §3).
NEURON_UNIT = {"mamba": "mixer.hook_post", "mamba2": "mixer.hook_post", "gpt2": "mlp.hook_post",
               "gated_mlp": "mlp.hook_post"}


def all_names(units_by_layer: Sequence[Mapping[str, str]]) -> list[str]:
    """Every hook name of a model whose layer ``l`` has the units ``units_by_layer[l]``, in forward order."""
    return [f"blocks.{layer}.{unit}" for layer, units in enumerate(units_by_layer) for unit in units]


def resolve_names(units_by_layer: Sequence[Mapping[str, str]], patterns: str | Iterable[str] | None,
                  model: str = "model") -> list[str]:
    """Expand shell-style patterns (``blocks.*.mixer.hook_post``, ``*hook_dt``) to concrete names.

    A short unit name without ``blocks.`` (``mixer.hook_post``) means that unit in every layer that has it.
    Raises ``KeyError`` naming the nearest valid name when a pattern matches nothing; ``model`` names
    the model in that message.
    """
    names = all_names(units_by_layer)
    if patterns is None:
        return names
    if isinstance(patterns, str):
        patterns = [patterns]
    known = set(names)
    chosen: set[str] = set()
    for pattern in patterns:
        full = pattern if pattern.startswith(("blocks.", "*")) else f"blocks.*.{pattern}"
        # an exact name matches itself alone (no name holds a wildcard): a set lookup instead of a scan of
        # every name, which for a list of every unit was most of the tracer's fixed cost
        hits = [full] if full in known else fnmatch.filter(names, full)
        if not hits:
            units = sorted({unit for layer in units_by_layer for unit in layer})
            near = difflib.get_close_matches(pattern, names + units, n=1, cutoff=0.3)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise KeyError(f"no hook named {pattern!r} in this {model} with {len(units_by_layer)} layers{hint}")
        chosen.update(hits)
    return [name for name in names if name in chosen]


def layers_of(names: Sequence[str]) -> list[int]:
    """Sorted layer indices that a list of full hook names touches."""
    return sorted({int(name.split(".")[1]) for name in names})

__all__ = ["NEURON_UNIT", "PART_UNITS", "UNITS", "all_names", "layer_units", "layers_of", "resolve_names"]
