"""A dictionary's inputs and targets streamed from the tracer, and a bounded shuffle buffer over them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from mambascope.features.dictionary import DictionarySpec
from mambascope.trace import trace_stream


class _LayerDone(Exception):
    """Raised by the trace callback once the dictionary's layer is traced: the later layers are not needed."""


def unit_rows(model: nn.Module, ids: torch.Tensor, spec: DictionarySpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [b·L, d_in] at ``spec.hook_in``, y [b·L, d_out] at ``spec.hook_out``) for windows ids [b, L], float32,
    rows in (window, position) order.  The forward stops after the dictionary's layer."""
    prefix = f"blocks.{spec.layer}."
    got: dict[str, torch.Tensor] = {}

    def keep(layer: int, units: dict[str, torch.Tensor]) -> None:
        got.update(units)
        raise _LayerDone

    with contextlib.suppress(_LayerDone):
        trace_stream(model, ids, keep, names=[spec.hook_in, spec.hook_out])
    x = got[spec.hook_in.removeprefix(prefix)]
    y = got[spec.hook_out.removeprefix(prefix)]
    return x.reshape(-1, spec.d_in).float().cpu(), y.reshape(-1, spec.d_out).float().cpu()


def window_batches(windows: Iterable[list[int]], batch_size: int) -> Iterator[torch.Tensor]:
    """Windows [≤ batch_size, T] in order."""
    batch: list[list[int]] = []
    for ids in windows:
        batch.append(ids)
        if len(batch) == batch_size:
            yield torch.tensor(batch, dtype=torch.long)
            batch = []
    if batch:
        yield torch.tensor(batch, dtype=torch.long)


class ShuffleBuffer:
    """At most ``capacity`` rows; ``take(n)`` removes n rows drawn uniformly without replacement (a bounded
    shuffle: consecutive tokens of one window rarely share a training batch).  Its whole state is ``rows``
    and the generator's, so a checkpoint of both resumes it exactly."""

    def __init__(self, capacity: int, width: int, generator: torch.Generator) -> None:
        self.capacity, self.generator = capacity, generator
        self.rows = torch.empty(0, width)

    def __len__(self) -> int:
        return self.rows.shape[0]

    def add(self, rows: torch.Tensor) -> None:
        self.rows = torch.cat([self.rows, rows])

    def take(self, n: int) -> torch.Tensor:
        total = len(self)
        picked = torch.randperm(total, generator=self.generator)[:n]
        out = self.rows[picked]
        keep = torch.ones(total, dtype=torch.bool)
        keep[picked] = False
        self.rows = self.rows[keep]
        return out
