"""How good a dictionary is, on held-out windows (docs/features.md, "Evaluation").

- FVU = Σ_t ‖y_t − ŷ_t‖² / Σ_t ‖y_t − ȳ‖², ȳ the mean target over the held-out tokens (sparsify's fvu,
  over the whole set rather than per batch).
- mean L0 = mean over tokens of the number of latents with a non-zero activation (≤ k).
- dead latents: active on none of the held-out tokens; dense: active on more than ``DENSE`` of them.
- the language-model cost: held-out next-token loss clean, with ``hook_out`` replaced by the dictionary's
  output (spliced in through ``edits=``), and with ``hook_out`` zero-ablated (for scale);
  loss recovered = (L_zero − L_spliced) / (L_zero − L_clean).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mambascope.features.activations import unit_rows
from mambascope.features.dictionary import DictionarySpec, codes, reconstruct
from mambascope.runner import scan_corpus

DENSE = 0.10  # a latent active on more than 10 % of tokens is "dense" (the threshold is reported)


@torch.no_grad()
def reconstruction_stats(model: nn.Module, coder: nn.Module, spec: DictionarySpec, windows: torch.Tensor,
                         batch_size: int = 8) -> dict[str, Any]:
    """FVU, mean L0, dead and dense latents of ``coder`` on windows [n, T] (every position counted)."""
    err = sq = 0.0
    total = torch.zeros(spec.d_out, dtype=torch.float64)
    active = torch.zeros(spec.d_sae, dtype=torch.long)
    l0 = tokens = 0
    for start in range(0, windows.shape[0], batch_size):
        x, y = unit_rows(model, windows[start:start + batch_size], spec)
        z = codes(coder, x)
        y_hat = reconstruct(coder, x).double()
        y = y.double()
        err += float((y - y_hat).pow(2).sum())
        sq += float(y.pow(2).sum())
        total += y.sum(0)
        nonzero = z != 0
        active += nonzero.sum(0)
        l0 += int(nonzero.sum())
        tokens += y.shape[0]
    variance = sq - float(total.pow(2).sum()) / tokens  # Σ‖y − ȳ‖² = Σ‖y‖² − n‖ȳ‖²
    frequency = active.double() / tokens
    return {"tokens": tokens, "fvu": err / variance, "mse": err / tokens, "mean_l0": l0 / tokens,
            "dead_latents": int((active == 0).sum()), "dense_latents": int((frequency > DENSE).sum()),
            "dense_threshold": DENSE, "d_sae": spec.d_sae, "latent_frequency": frequency.tolist()}


def splice_edits(coder: nn.Module, spec: DictionarySpec) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """``edits=`` that replace ``hook_out`` by the dictionary's output; a transcoder's input is read on the
    way (an edit of ``hook_in`` that returns its tensor unchanged, emitted earlier in the same layer)."""
    seen: dict[str, torch.Tensor] = {}

    def read(t: torch.Tensor) -> torch.Tensor:
        seen["x"] = t
        return t

    def splice(t: torch.Tensor) -> torch.Tensor:
        x = seen.pop("x") if spec.kind == "transcoder" else t
        y_hat = reconstruct(coder, x.reshape(-1, spec.d_in).float().cpu())
        return y_hat.reshape(t.shape).to(device=t.device, dtype=t.dtype)

    return {spec.hook_in: read, spec.hook_out: splice} if spec.kind == "transcoder" else {spec.hook_out: splice}


@torch.no_grad()
def splice_losses(model: nn.Module, coder: nn.Module, spec: DictionarySpec, windows: torch.Tensor,
                  batch_size: int = 8, progress: bool = False) -> dict[str, float]:
    """Held-out next-token loss (nats/token) clean, spliced and zero-ablated at ``hook_out``."""
    def run(edits, what):
        return scan_corpus(model, windows, None, edits=edits, batch_size=batch_size, progress=progress,
                           description=what).loss

    clean = run(None, "clean loss")
    spliced = run(splice_edits(coder, spec), "spliced loss")
    zero = run({spec.hook_out: torch.zeros_like}, "zero-ablated loss")
    recovered = (zero - spliced) / (zero - clean) if zero != clean else float("nan")
    return {"clean_loss": clean, "spliced_loss": spliced, "zero_ablated_loss": zero,
            "delta_loss": spliced - clean, "loss_recovered": recovered}


def evaluate_dictionary(model: nn.Module, coder: nn.Module, spec: DictionarySpec, windows: torch.Tensor,
                        batch_size: int = 8, progress: bool = False) -> dict[str, Any]:
    """Both of the above on held-out windows [n, T], with their count."""
    coder.eval()
    stats = reconstruction_stats(model, coder, spec, windows, batch_size)
    stats.update(splice_losses(model, coder, spec, windows, batch_size, progress))
    stats["windows"] = int(windows.shape[0])
    return stats


__all__ = ["DENSE", "evaluate_dictionary", "reconstruction_stats", "splice_edits", "splice_losses"]
