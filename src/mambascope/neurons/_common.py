"""Shared plumbing of the streaming accumulators: configuration checks, merging, validation."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from mambascope.neurons.batch import EmptyAccumulatorError, LayerLabel, NeuronBatch, check_finite, layer_name


def check_open_unit(name: str, value: float) -> float:
    """``value`` must lie in the open interval (0, 1)."""
    value = float(value)
    if not (0.0 < value < 1.0):
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value}")
    return value


def check_unit_right_closed(name: str, value: float) -> float:
    """``value`` must lie in (0, 1]."""
    value = float(value)
    if not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


def check_positive_int(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def none_if_nan(values: Tensor) -> list[float | None]:
    """Tensor → list with None where undefined (NaN): JSON has no NaN, and no value is invented."""
    return [None if math.isnan(v) else v for v in values.tolist()]


def segment_order(segment: Tensor, value: Tensor) -> Tensor:
    """Permutation sorting rows by ``segment`` ascending, then ``value`` descending, ties kept in input order.

    Two stable sorts (secondary key first) give a deterministic order that does not depend on how
    the data were batched, which the integer-exact results of the detectors rely on.
    """
    by_value = torch.argsort(value, descending=True, stable=True)
    by_segment = torch.argsort(segment[by_value], stable=True)
    return by_value[by_segment]


def within_segment_cumsum_before(segment: Tensor, value: Tensor, n_segments: int) -> Tensor:
    """For rows grouped by ``segment`` (contiguous, ascending): sum of ``value`` over earlier rows of its segment."""
    total = torch.zeros(n_segments, dtype=value.dtype, device=value.device).index_add_(0, segment, value)
    offset = total.cumsum(0) - total  # sum of all earlier segments
    return value.cumsum(0) - value - offset[segment]


def _merge_sorted(a: Tensor, a_rows: Tensor, b: Tensor, b_rows: Tensor) -> tuple[Tensor, Tensor]:
    """Merge ascending ``a`` and ``b`` (disjoint values) with their payloads: O(|a| + |b|), no sort."""
    at = torch.searchsorted(a, b) + torch.arange(b.numel(), device=b.device)  # b's places in the result
    out, rows = a.new_empty(a.numel() + b.numel()), a_rows.new_empty(a.numel() + b.numel())
    from_a = torch.ones(out.numel(), dtype=torch.bool, device=a.device)
    from_a[at] = False
    out[at], rows[at] = b, b_rows
    out[from_a], rows[from_a] = a, a_rows
    return out, rows


# Key spaces up to this size are looked up in a direct [keys] → row array (8 bytes a key: 8 MiB) instead of
# a sorted index: token ids (a vocabulary) always, n-grams of order >= 2 only for toy vocabularies.
DIRECT_KEYS = 1 << 20


class KeyedRows:
    """Sums of ``width`` values per int64 key in [0, ``key_space``) (an n-gram or token id), one dense row for
    each key seen.

    ``values`` [capacity, width] holds the rows in the order their keys first appeared (allocated by
    doubling; rows from ``size`` on are uninitialised, cleared when a key takes them, so spare capacity is
    never written).  A key's row is found in a direct array ``index`` [key_space] (−1: unseen) when the key
    space is at most ``DIRECT_KEYS``, else by one ``searchsorted`` in ``ids`` [G] (ascending) / ``rows`` [G],
    into which new keys are merged without re-sorting.  Memory: width·itemsize (+16) bytes per key seen (×2
    while rows double), so a table over a vocabulary costs what the corpus uses of it, not V·width.
    Rows are summed with ``index_add_`` in the order given, as a dense [V, width] table would be.
    """

    def __init__(self, width: int, dtype: torch.dtype, key_space: int, device: torch.device | str = "cpu") -> None:
        self.width, self.key_space, self.size = width, key_space, 0
        self.values = torch.zeros(0, width, dtype=dtype, device=device)
        self.index = torch.full((key_space,), -1, dtype=torch.long, device=device) if key_space <= DIRECT_KEYS \
            else None
        self.ids = torch.zeros(0, dtype=torch.long, device=device)  # sorted index (unused with a direct one)
        self.rows = torch.zeros(0, dtype=torch.long, device=device)

    def _reserve(self, rows: int) -> None:
        if rows > self.values.shape[0]:  # double (up to one row a key): amortized O(1) copies per row
            grown = self.values.new_empty(min(max(2 * self.values.shape[0], rows, 64), self.key_space + 1),
                                          self.width)
            grown[:self.size] = self.values[:self.size]
            self.values = grown  # rows >= size stay unwritten (never paged in) until _insert clears them

    def _insert(self, new: Tensor) -> Tensor:
        """Give the distinct ascending unseen keys ``new`` rows of their own; returns the rows."""
        rows = torch.arange(self.size, self.size + new.numel(), device=new.device)
        self._reserve(self.size + new.numel())
        self.values[self.size:self.size + new.numel()] = 0
        if self.index is not None:
            self.index[new] = rows
        else:
            self.ids, self.rows = _merge_sorted(self.ids, self.rows, new, rows)
        self.size += new.numel()
        return rows

    def rows_for(self, ids: Tensor) -> Tensor:
        """Rows [G] of the distinct ascending ``ids`` [G], given rows of their own when new."""
        ids = ids.to(self.values.device)
        if self.index is not None:
            row = self.index[ids]
        else:
            place = torch.searchsorted(self.ids, ids).clamp_max(max(self.size - 1, 0))
            row = torch.full_like(ids, -1)
            if self.size:
                hit = self.ids[place] == ids
                row[hit] = self.rows[place[hit]]
        new = row < 0
        if bool(new.any()):
            row[new] = self._insert(ids[new])
        return row

    def add(self, ids: Tensor, values: Tensor) -> None:
        """Add ``values`` [S, width] at the keys ``ids`` [S] (repeats summed; a negative id skips its row)."""
        ids = ids.to(self.values.device)
        skip = ids < 0
        skipping = bool(skip.any())
        if self.index is not None:  # direct: look every slot up, insert the unseen keys (few after a while)
            slot_rows = self.index[ids.clamp_min(0)]
            new = (slot_rows < 0) & ~skip
            if bool(new.any()):
                self._insert(torch.unique(ids[new]))
                slot_rows = self.index[ids.clamp_min(0)]
        else:  # sorted: one lookup per distinct key of the batch
            keys, inverse = torch.unique(torch.where(skip, -1, ids), return_inverse=True)
            rows = self.rows_for(keys[int(skipping):])
            slot_rows = (torch.cat([rows.new_tensor([-1]), rows]) if skipping else rows)[inverse]
        if skipping:  # the skipped rows land in the first free row, cleared again after
            self._reserve(self.size + 1)
            slot_rows = torch.where(skip, self.size, slot_rows)
        self.values.index_add_(0, slot_rows, values.to(self.values.device, self.values.dtype))
        if skipping:
            self.values[self.size] = 0

    def add_rows(self, ids: Tensor, values: Tensor) -> None:
        """Add ``values`` [G, width] at the distinct ascending keys ``ids`` [G]."""
        rows = self.rows_for(ids)  # first: it may grow (replace) self.values
        self.values.index_add_(0, rows, values.to(self.values.device, self.values.dtype))

    def by_id(self) -> tuple[Tensor, Tensor]:
        """(ids [G] ascending, their rows of values [G, width])."""
        if self.index is not None:
            ids = (self.index >= 0).nonzero().flatten()
            return ids, self.values[self.index[ids]]
        return self.ids, self.values[self.rows]

    def merge(self, other: KeyedRows) -> KeyedRows:
        self.add_rows(*other.by_id())
        return self

    def clone(self) -> KeyedRows:
        copy = type(self).__new__(type(self))
        copy.__dict__.update({name: value.clone() if isinstance(value, Tensor) else value
                              for name, value in self.__dict__.items()})
        copy.values = self.values[:self.size].clone()
        return copy

    def dense(self, columns: Tensor | None = None) -> Tensor:
        """[key_space, width] (or the ``columns``), zero for the keys never seen."""
        ids, values = self.by_id()
        values = values if columns is None else values[:, columns]
        out = values.new_zeros(self.key_space, values.shape[1])
        out[ids] = values
        return out


class Accumulator:
    """Base of the streaming accumulators: ``update(batch)``, ``merge(other) -> self``, ``finalize() -> dict``.

    Subclasses list their configuration in ``_config`` (must match to merge) and their state
    tensors in ``_state`` (summed on merge unless the subclass overrides ``_merge_state``).
    """

    _config: ClassVar[tuple[str, ...]] = ()
    _state: ClassVar[tuple[str, ...]] = ()

    def __init__(self, layer: LayerLabel = None) -> None:
        self.layer = layer
        self.n_neurons: int | None = None
        self.n_tokens = 0

    # -- helpers -------------------------------------------------------------------------------
    def _where(self) -> str:
        return f"{type(self).__name__} of {layer_name(self.layer)}"

    def _start(self, batch: NeuronBatch, width: int | None = None) -> bool:
        """Check the batch against the accumulator; True when the state must be created first."""
        width = batch.n_neurons if width is None else width
        if self.n_neurons is None:
            self.n_neurons = width
            return True
        if width != self.n_neurons:
            raise ValueError(f"{self._where()}: batch has {width} units, earlier batches had {self.n_neurons}")
        return False

    def _check_finite(self, batch: NeuronBatch, dt: bool = False) -> None:
        """Re-check the values this accumulator sums: a batch can be edited after construction, and one
        NaN would silently turn every sum it touches into NaN."""
        label = self.layer if self.layer is not None else batch.layer
        if dt:
            assert batch.dt is not None
            check_finite(batch.dt, batch.valid, "Δ (dt)", label)
        elif not bool(torch.isfinite(batch.valid_post_sum).all()):  # the shared sum: NaN/Inf make it non-finite
            check_finite(batch.post, batch.valid, "post (the neuron activation)", label)

    def _require_data(self) -> None:
        if self.n_tokens == 0:
            raise EmptyAccumulatorError(
                f"{self._where()}: no valid tokens seen; call update() with at least one valid "
                "(non-padding, non-BOS) token before finalize()"
            )

    def _config_value(self, name: str) -> Any:
        value = getattr(self, name)
        return value.tolist() if isinstance(value, Tensor) else value

    # -- merge ---------------------------------------------------------------------------------
    def merge(self, other: Accumulator) -> Accumulator:
        """Fold in an accumulator of the same configuration that saw disjoint data; returns self."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        for name in self._config:
            if self._config_value(name) != other._config_value(name):
                raise ValueError(f"{self._where()}: cannot merge accumulators with different {name}: "
                                 f"{self._config_value(name)!r} vs {other._config_value(name)!r}")
        if other.n_neurons is None:
            return self
        if self.n_neurons is None:
            self.n_neurons = other.n_neurons
            self.n_tokens = other.n_tokens
            for name in self._state:
                value = getattr(other, name)
                setattr(self, name, value.clone() if isinstance(value, Tensor | KeyedRows) else value)
            self._adopt_extra(other)
            return self
        if other.n_neurons != self.n_neurons:
            raise ValueError(f"{self._where()}: cannot merge {other.n_neurons} units into {self.n_neurons}")
        self.n_tokens += other.n_tokens
        self._merge_state(other)
        return self

    def _adopt_extra(self, other: Accumulator) -> None:
        """Copy state not listed in ``_state`` when self is empty (override when there is any)."""

    def _merge_state(self, other: Accumulator) -> None:
        for name in self._state:
            mine = getattr(self, name)
            if isinstance(mine, KeyedRows):
                mine.merge(getattr(other, name))
            else:
                setattr(self, name, mine + getattr(other, name).to(mine.device))
