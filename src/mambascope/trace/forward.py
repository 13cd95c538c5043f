"""The instrumented forward pass: ``trace`` (every requested unit at once) and ``trace_stream``
(each layer's units handed to a callback, so a corpus scan never holds all layers)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from mambascope.arch import Adapter, Context, adapter
from mambascope.arch.base import DecodeCache
from mambascope.arch.units import STATE_UNIT
from mambascope.ssm.knockout import Knockout, as_knockouts
from mambascope.trace.names import UNITS, all_names, layers_of, resolve_names

LayerCallback = Callable[[int, dict[str, torch.Tensor]], None]
Edit = Callable[[torch.Tensor], torch.Tensor]
# the unit a Knockout edits: the scan output, recomputed without the knocked-out terms
KNOCKOUT_UNIT = "mixer.hook_y"
AnyEdit = Edit | Knockout | Sequence[Knockout]


class Trace(dict):
    """Mapping from full hook names (``blocks.0.mixer.hook_post``) to tensors, plus ``logits``."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], logits: torch.Tensor, arch: str):
        super().__init__(tensors)
        self.logits = logits
        self.arch = arch

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        """The units of one layer keyed without the ``blocks.{l}.`` prefix."""
        prefix = f"blocks.{index}."
        return {name[len(prefix):]: t for name, t in self.items() if name.startswith(prefix)}


def check_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_length: int | None = None) -> None:
    """Raise ``ValueError`` for inputs a forward pass would silently mishandle."""
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor [batch, pos], got {tuple(input_ids.shape)} "
                         f"{input_ids.dtype}")
    if input_ids.numel() == 0:
        raise ValueError("input_ids is empty: nothing to trace")
    vocab = model.get_input_embeddings().num_embeddings
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ValueError(f"input id {bad} is outside the vocabulary (0..{vocab - 1})")
    if max_length is None:
        max_length = adapter(model).max_length
    if max_length is not None and input_ids.shape[1] > max_length:
        raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds the maximum length {max_length}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids "
                             f"{tuple(input_ids.shape)}")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must contain only 0 and 1")
        if not bool(attention_mask.any(dim=1).all()):
            raise ValueError("a row of attention_mask has no tokens")


class _Emitter:
    """``emit`` for one layer (``mambascope.arch.base.Emit``): apply the edit registered for the unit,
    keep it if wanted, pass it on."""

    def __init__(self, prefix: str, wanted: set[str], edits: Mapping[str, Edit], collected: dict[str, torch.Tensor],
                 state_positions: tuple[int, ...] | None,
                 knockouts: Mapping[str, tuple[Knockout, ...]] | None = None) -> None:
        self.prefix, self.wanted, self.edits, self.collected = prefix, wanted, edits, collected
        self.knockouts = (knockouts or {}).get(prefix + KNOCKOUT_UNIT, ())
        state = prefix + STATE_UNIT
        asked = state in wanted or state in edits
        self.state_positions = state_positions if asked else None
        self._states: list[torch.Tensor] = []
        self._buffer: torch.Tensor | None = None

    def __call__(self, unit: str, tensor: torch.Tensor) -> torch.Tensor:
        name = self.prefix + unit
        if name in self.edits:
            tensor = self.edits[name](tensor)
        if name in self.wanted:
            self.collected[unit] = tensor
        return tensor

    def state(self, unit: str, k: int, tensor: torch.Tensor) -> torch.Tensor:
        """The state after the k-th requested position [b, ...]; returns the state the scan continues from.

        The edit is called once per position, as the scan reaches it, on the unit's [b, K, ...] tensor as
        far as the scan has got: slots before k hold the states in use (edited), slot k this one, later
        slots zero; slot k of its result is kept.  So an edit acting slot by slot (replace, scale, add,
        ``torch.where``) edits each state once, from the state the edited past produced.  Without autograd
        the tensor it is given is one buffer reused across the K calls: it must not keep it or write to it.
        """
        name = self.prefix + unit
        if k == 0:
            self._states, self._buffer = [], None
        if name in self.edits:
            tensor = self._edited_state(self.edits[name], k, tensor)
        self._states.append(tensor)
        if k == len(self.state_positions) - 1 and name in self.wanted:
            self.collected[unit] = torch.stack(self._states, dim=1)
        return tensor

    def _edited_state(self, edit: Edit, k: int, tensor: torch.Tensor) -> torch.Tensor:
        K = len(self.state_positions)
        if torch.is_grad_enabled():
            # out of place, so that autograd sees each state once
            slots = torch.stack([*self._states, tensor, *[torch.zeros_like(tensor)] * (K - k - 1)], dim=1)
            return edit(slots)[:, k].to(tensor.dtype)
        # one buffer written slot by slot: O(K) copies over the K calls instead of O(K²)
        if self._buffer is None:
            self._buffer = tensor.new_zeros(tensor.shape[0], K, *tensor.shape[1:])
        self._buffer[:, k] = tensor
        out = edit(self._buffer)[:, k].to(tensor.dtype).clone()
        self._buffer[:, k] = out
        return out


def state_positions_of(positions: Iterable[int] | None, length: int) -> tuple[int, ...] | None:
    """Sorted distinct positions in [0, length), negative ones counted from the end."""
    if positions is None:
        return None
    out = set()
    for p in map(operator.index, positions):  # a float position is a TypeError, not silently truncated
        if not -length <= p < length:
            raise ValueError(f"state position {p} is outside the sequence of {length} tokens")
        out.add(p % length)
    if not out:
        raise ValueError("state_positions is empty: give at least one position or None")
    return tuple(sorted(out))


def resolve_units(ad: Adapter, names: str | Iterable[str] | None, edits: Mapping[str, Edit],
                  positions: tuple[int, ...] | None) -> tuple[list[dict[str, str]], list[str]]:
    """(units per layer, the full names ``names`` selects, as ``resolve_names``): ``mixer.hook_ssm_state``
    joins the units when ``positions`` are given; naming it (or editing it, a key of ``edits``) without
    positions is a ``ValueError``, while a pattern that also matches other units just leaves it out."""
    plain = [ad.units(layer) for layer in range(ad.n_layers)]
    full = [{**units, **ad.state_units(layer)} for layer, units in enumerate(plain)]
    if positions is not None:
        return full, resolve_names(full, names, ad.model_type)
    states = [name for name in all_names(full) if name.endswith(STATE_UNIT)]
    try:
        wanted = resolve_names(plain, names, ad.model_type)
    except KeyError:
        # a pattern that matches only states (``mixer.hook_ssm_state``) is a request for them
        if not set(resolve_names(full, names, ad.model_type)) & set(states):
            raise
        wanted = states
    if set(wanted) & set(states) or set(edits) & set(states):
        raise ValueError("hook_ssm_state needs state_positions=[...]: the state is kept only after the "
                         "positions asked for")
    return plain, wanted


def split_knockouts(edits: Mapping[str, AnyEdit]) -> tuple[dict[str, Edit], dict[str, tuple[Knockout, ...]]]:
    """(plain edits, knockouts by hook name): a :class:`Knockout` (or a sequence of them) is an edit of
    ``blocks.{l}.mixer.hook_y`` only, and not together with an edit of the same layer's SSM state (the
    knocked-out term is that of the unedited recurrence)."""
    plain: dict[str, Edit] = {}
    knockouts: dict[str, tuple[Knockout, ...]] = {}
    for name, edit in edits.items():
        found = as_knockouts(edit)
        if found is None:
            plain[name] = edit
            continue
        if not name.endswith("." + KNOCKOUT_UNIT):
            raise ValueError(f"a Knockout edits the scan output blocks.{{l}}.{KNOCKOUT_UNIT}, not {name}")
        if name[:-len(KNOCKOUT_UNIT)] + STATE_UNIT in edits:
            raise ValueError(f"{name}: a knockout and an edit of the same layer's {STATE_UNIT} cannot be combined")
        knockouts[name] = found
    return plain, knockouts


def _check_logits_at(logits_at: torch.Tensor, b: int, L: int) -> None:
    """``logits_at``: [b] or [b, k] positions in 0..L-1; ValueError otherwise."""
    shape_ok = logits_at.dim() in (1, 2) and logits_at.shape[0] == b
    if not shape_ok or not bool(((logits_at >= 0) & (logits_at < L)).all()):
        raise ValueError(f"logits_at must hold positions in 0..{L - 1}, [b] or [b, k] for the {b} rows, "
                         f"got shape {tuple(logits_at.shape)}")


def trace_stream(
    model: nn.Module,
    input_ids: torch.Tensor,
    callback: LayerCallback | None,
    *,
    attention_mask: torch.Tensor | None = None,
    names: str | Iterable[str] | None = None,
    edits: Mapping[str, AnyEdit] | None = None,
    max_length: int | None = None,
    grad: bool = False,
    state_positions: Iterable[int] | None = None,
    cache: DecodeCache | None = None,
    logits_at: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the model once, handing ``callback(layer, {unit: tensor})`` each layer's requested units.

    Args:
        input_ids: [b, L] token ids.  attention_mask: [b, L] of 0/1 (left or right padding), optional.
        names: hook names or shell patterns (``"*hook_post"``, ``"blocks.3.*"``); None = every unit.
        edits: full hook name -> function applied to that unit's tensor; the forward continues with the
            result (zero- or mean-ablation at ``mixer.hook_post``, patching, ...).  On
            ``blocks.{l}.mixer.hook_y`` the value may instead be a :class:`~mambascope.ssm.knockout.Knockout`
            (or a list of them): the scan output without the knocked-out source tokens' terms.
        max_length: longest sequence accepted (models with learned positions default to their maximum).
        grad: build the autograd graph (for gradient-based attributions); off by default to save memory.
        state_positions: positions p after which ``mixer.hook_ssm_state`` holds the SSM state h_p
            ([b, K, E, N] on Mamba-1, [b, K, H, P, N] on Mamba-2, K = number of distinct positions, in
            ascending order; negative p count from the end).  Without them the state is neither traced
            nor editable.  An edit of the state replaces h_p and the scan continues from it (see
            ``_Emitter.state``); only the SSM state, not the conv window, is replaced.
        cache: decoding state (``mambascope.trace.generate``): the SSM and attention parts continue from it
            and update it, and input_ids are the tokens from position ``cache.offset`` on.
        logits_at: [b] one position per row, or [b, k] k positions per row: only the logits there are
            computed and returned, [b, V] or [b, k, V] (the final norm and unembedding run on those
            positions alone, not on all b·L).
    Returns the logits [b, L, V] (with ``logits_at``: [b, V] or [b, k, V]).
    """
    ad = adapter(model)
    check_inputs(model, input_ids, attention_mask, max_length)
    positions = state_positions_of(state_positions, input_ids.shape[1])
    if logits_at is not None:
        _check_logits_at(logits_at, *input_ids.shape)
    edits, knockouts = split_knockouts(edits or {})
    units, wanted_names = resolve_units(ad, names, edits, positions)
    wanted = set(wanted_names) if callback is not None else set()
    unknown = (set(edits) | set(knockouts)) - set(all_names(units))
    if unknown:
        resolve_names(units, sorted(unknown), ad.model_type)  # raises with the nearest valid name
    device = model.get_input_embeddings().weight.device
    input_ids = input_ids.to(device)
    mask = None
    if attention_mask is not None and not bool(attention_mask.all()):
        mask = attention_mask.to(device)
    pattern_names = [n for n in (*wanted, *edits) if n.endswith(".attn.hook_pattern")]
    ctx = Context(mask, frozenset(layers_of(pattern_names)), cache=cache)

    with torch.set_grad_enabled(grad):
        h = ad.embed(input_ids, ctx)
        for index in range(ad.n_layers):
            collected: dict[str, torch.Tensor] = {}
            emit = _Emitter(f"blocks.{index}.", wanted, edits, collected, positions, knockouts)
            h = ad.run_block(index, ad.on_block_device(index, h, ctx), ctx, emit)
            if collected:
                callback(index, collected)
        if logits_at is None:
            return ad.logits(h)
        at = logits_at.to(h.device)
        picked = h.gather(1, at.reshape(h.shape[0], -1, 1).expand(-1, -1, h.shape[-1]))  # [b, k, D]
        return ad.logits(picked).reshape(*at.shape, -1)


def trace(
    model: nn.Module,
    input_ids: torch.Tensor,
    names: str | Iterable[str] | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    edits: Mapping[str, AnyEdit] | None = None,
    max_length: int | None = None,
    grad: bool = False,
    state_positions: Iterable[int] | None = None,
) -> Trace:
    """Run the model once and return every requested unit: ``trace["blocks.0.mixer.hook_post"]``.

    Units and shapes per layer are ``mambascope.arch.adapter(model).units(layer)`` (docs/design.md §3, §10);
    with ``state_positions`` also ``state_units(layer)``: the SSM state after those positions (see ``trace_stream``).
    For a corpus, prefer ``trace_stream``, which never holds more than one layer's units.
    """
    tensors: dict[str, torch.Tensor] = {}

    def keep(layer: int, units: dict[str, torch.Tensor]) -> None:
        tensors.update({f"blocks.{layer}.{unit}": t for unit, t in units.items()})

    logits = trace_stream(model, input_ids, keep, attention_mask=attention_mask, names=names, edits=edits,
                          max_length=max_length, grad=grad, state_positions=state_positions)
    return Trace(tensors, logits, adapter(model).model_type)


__all__ = ["KNOCKOUT_UNIT", "UNITS", "Knockout", "Trace", "check_inputs", "resolve_units", "split_knockouts",
           "state_positions_of", "trace", "trace_stream"]
