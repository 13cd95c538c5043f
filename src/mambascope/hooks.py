"""TransformerLens-style entry points, thin layers over the tracer (docs/hooks.md).

``run_with_cache(model, ids, names_filter)`` -> ``(logits, cache)`` and ``run_with_hooks(model, ids,
fwd_hooks=[(name_or_filter, fn(tensor, hook))])`` for people used to TransformerLens's ``HookedTransformer``;
the hook names are ours (``blocks.{l}.mixer.hook_post``; the table in docs/hooks.md maps them to
TransformerLens and mamba-lens).  Both run :func:`mambascope.trace.trace`: the cache is its ``Trace`` and a
hook is an edit of its unit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mambascope.arch import adapter
from mambascope.arch.units import STATE_UNIT
from mambascope.ssm.knockout import Knockout
from mambascope.trace.forward import Trace, resolve_units, state_positions_of, trace
from mambascope.trace.names import all_names

NamesFilter = str | Sequence[str] | Callable[[str], bool] | None


@dataclass(frozen=True)
class HookPoint:
    """What a hook function receives beside the tensor, like TransformerLens's ``HookPoint``.

    ``name``: the full hook name (``blocks.3.mixer.hook_post``); ``positions``: for
    ``mixer.hook_ssm_state``, the positions its K slots stand for (None on other hooks).
    """

    name: str
    positions: tuple[int, ...] | None = None

    def layer(self) -> int:
        """The layer index in the name."""
        return int(self.name.split(".")[1])


HookFn = Callable[[torch.Tensor, HookPoint], torch.Tensor | None]


def hook_names(model: nn.Module, *, state: bool = False) -> list[str]:
    """Every hook name of ``model`` in forward order; with ``state``, ``mixer.hook_ssm_state`` of its SSM
    layers too (traced only when positions are given)."""
    ad = adapter(model)
    return all_names([{**ad.units(layer), **(ad.state_units(layer) if state else {})}
                      for layer in range(ad.n_layers)])


def _select(model: nn.Module, names_filter: NamesFilter, state: bool) -> list[str] | None:
    """Concrete hook names chosen by a filter: None (every name), a name or shell pattern, a list of
    them, or a predicate on the full name."""
    if names_filter is None or isinstance(names_filter, str):
        return names_filter
    if callable(names_filter):
        return [name for name in hook_names(model, state=state) if names_filter(name)]
    return list(names_filter)


def run_with_cache(
    model: nn.Module, input_ids: torch.Tensor, names_filter: NamesFilter = None, *,
    attention_mask: torch.Tensor | None = None, state_positions: Iterable[int] | None = None,
    max_length: int | None = None,
) -> tuple[torch.Tensor, Trace]:
    """One forward; returns ``(logits [b, L, V], cache)``, the cache keyed by full hook names.

    ``names_filter`` as in TransformerLens: None = every hook, a name or shell pattern
    (``"*mixer.hook_post"``; a short unit name means every layer's), a list of them, or a predicate
    ``fn(name) -> bool``.  ``state_positions``: positions whose SSM state ``mixer.hook_ssm_state`` is
    cached ([b, K, E, N] / [b, K, H, P, N]); without them the state is not cached.
    """
    names = _select(model, names_filter, state=state_positions is not None)
    cache = trace(model, input_ids, names, attention_mask=attention_mask, max_length=max_length,
                  state_positions=state_positions)
    return cache.logits, cache


def run_with_hooks(
    model: nn.Module, input_ids: torch.Tensor,
    fwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn | Knockout]], *,
    attention_mask: torch.Tensor | None = None, state_positions: Iterable[int] | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """One forward with ``fn(tensor, hook)`` called on each hooked unit; returns the logits [b, L, V].

    ``fwd_hooks``: (name, shell pattern or predicate on names, fn) pairs.  ``fn`` may return a tensor of the
    unit's shape, which replaces the unit for the rest of the forward, or None to leave it as it is;
    several hooks on one unit run in the order given, each on the previous one's result.  A hook on
    ``mixer.hook_ssm_state`` needs ``state_positions`` and is called once per position, as the scan
    reaches it, on the [b, K, ...] states so far (``mambascope.trace.forward._Emitter.state``).  In place of
    ``fn``, a :class:`~mambascope.ssm.knockout.Knockout` on ``mixer.hook_y`` knocks a token out of the scan
    (several on one unit combine; they do not chain with hook functions there).
    """
    ad = adapter(model)
    positions = None if state_positions is None else state_positions_of(state_positions, input_ids.shape[1])
    chains: dict[str, list[HookFn]] = {}
    for name_filter, fn in fwd_hooks:
        chosen = _select(model, name_filter, state=positions is not None)
        for name in resolve_units(ad, chosen, {}, positions)[1]:
            chains.setdefault(name, []).append(fn)
    edits: dict = {}
    for name, fns in chains.items():
        knockouts = tuple(fn for fn in fns if isinstance(fn, Knockout))
        if knockouts and len(knockouts) < len(fns):
            raise ValueError(f"{name}: a Knockout replaces the scan output; it cannot be chained with hook functions")
        edits[name] = knockouts or _edit(HookPoint(name, positions if name.endswith(STATE_UNIT) else None), fns)
    return trace(model, input_ids, [], attention_mask=attention_mask, edits=edits, max_length=max_length,
                 state_positions=positions).logits


def _edit(hook: HookPoint, fns: list[HookFn]) -> Callable[[torch.Tensor], torch.Tensor]:
    def edit(tensor: torch.Tensor) -> torch.Tensor:
        for fn in fns:
            out = fn(tensor, hook)
            if out is not None:
                tensor = out
        return tensor

    return edit


__all__ = ["HookPoint", "hook_names", "run_with_cache", "run_with_hooks"]
