"""Run the tracer over a corpus once and hand every layer's units to the analyses (load → trace → accumulate).

The runner is the only place besides ``interventions`` that runs the model; the analyses it feeds
only ever see tensors.  The held-out loss comes from the same pass's logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from mambascope.interventions import LossResult, next_token_loss_sum
from mambascope.trace import trace_stream

LayerConsumer = Callable[[int, dict[str, torch.Tensor], torch.Tensor, torch.Tensor], None]


def scan_corpus(
    model: nn.Module,
    windows: torch.Tensor,
    consume: LayerConsumer,
    *,
    names: str | Iterable[str] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    description: str = "tracing",
) -> LossResult:
    """Trace ``windows`` [n, T] in batches; call ``consume(layer, units, input_ids, window_ids)`` for every
    layer, ``window_ids`` [b] being the rows' indices in ``windows``.

    Returns the next-token loss of the unedited model over the same windows.
    """
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must be a non-empty [n, T] tensor, got {tuple(windows.shape)}")
    total, count = 0.0, 0
    bar = tqdm(total=windows.numel(), unit="tok", unit_scale=True, desc=description, disable=not progress)
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size]
        rows = torch.arange(start, start + batch.shape[0])
        logits = trace_stream(model, batch, lambda layer, units, batch=batch, rows=rows:
                              consume(layer, units, batch, rows), names=names)
        loss, n = next_token_loss_sum(logits, batch)
        total += loss
        count += n
        bar.update(batch.numel())
    bar.close()
    return LossResult(total / count, count)
