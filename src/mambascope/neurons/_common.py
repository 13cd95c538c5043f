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
        else:
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
                setattr(self, name, value.clone() if isinstance(value, Tensor) else value)
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
            setattr(self, name, mine + getattr(other, name).to(mine.device))
