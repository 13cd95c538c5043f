"""Run the tracer over a corpus once and hand every layer's units to the analyses (load → trace → accumulate).

The runner is the only place besides ``interventions`` that runs the model; the analyses it feeds
only ever see tensors.  The held-out loss comes from the same pass's logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from mambascope.trace import trace_stream
from mambascope.trace.forward import Edit

LayerConsumer = Callable[[int, dict[str, torch.Tensor], torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class LossResult:
    """Mean next-token cross-entropy (nats/token) over ``tokens`` predicted tokens."""

    loss: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def next_token_loss_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy (nats) of logits [b, L, V] on input_ids [b, L], and the count."""
    targets = input_ids[:, 1:].to(logits.device)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1), reduction="sum")
    return float(loss), targets.numel()


def scan_corpus(
    model: nn.Module,
    windows: torch.Tensor,
    consume: LayerConsumer | None,
    *,
    names: str | Iterable[str] | None = None,
    edits: Mapping[str, Edit] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    description: str = "tracing",
    bar: tqdm | None = None,
) -> LossResult:
    """Trace ``windows`` [n, T] (no padding, T >= 2) in batches; call ``consume(layer, units, input_ids,
    window_ids)`` for every layer (if given), ``window_ids`` [b] being the rows' indices in ``windows``.

    Returns the next-token loss over the same windows, under ``edits`` if any.  ``bar``: a progress bar
    shared by several calls (else one is made per call when ``progress``).
    """
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows must be a non-empty [n, T] tensor with T >= 2, got {tuple(windows.shape)}")
    total, count = 0.0, 0
    own_bar = bar is None
    if own_bar:
        bar = tqdm(total=windows.numel(), unit="tok", unit_scale=True, desc=description, disable=not progress)
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size]
        rows = torch.arange(start, start + batch.shape[0])
        callback = None if consume is None else (
            lambda layer, units, batch=batch, rows=rows: consume(layer, units, batch, rows))
        logits = trace_stream(model, batch, callback, names=names, edits=edits)
        loss, n = next_token_loss_sum(logits, batch)
        total += loss
        count += n
        bar.update(batch.numel())
    if own_bar:
        bar.close()
    return LossResult(total / count, count)
