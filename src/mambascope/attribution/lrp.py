"""MambaLRP (Jafari et al., NeurIPS 2024) for Mamba-1, Mamba-2, the hybrids and the transformers (attention
by the AttnLRP / CP-LRP rules, Achtibat et al. 2024), as gradient × input of the LRP-mode forward
(docs/methods.md "MambaLRP"; the families: ``SUPPORTED``).

The traced forward runs inside :func:`mambascope.arch.lrp_mode.lrp_mode`, where SiLU / GELU are x·(f(x)/x)
with the ratio constant, the scans are linear in their input (Δ, B, C constant), products of two
input-dependent factors split their relevance in half, and the norms hold their normaliser constant.  Then
every piece satisfies J̃·x = output, so the relevance R_i = Σ_d x[i, d]·∂̃f/∂x[i, d] at the input of layer 0
(``blocks.0.hook_resid_pre``: the token embeddings, plus GPT-2's position embeddings) sums to the target
logit f whenever the model has no biases (conservation); otherwise logit − Σ R is what the biases absorb.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mambascope.arch import adapter
from mambascope.arch.base import MOE_PARTS
from mambascope.arch.lrp_mode import LRPRules, lrp_mode
from mambascope.trace import trace_stream

# Families whose every normalisation, activation, product and scan goes through the LRP-mode primitives.
# Zamba2 is not among them: its shared blocks read the embeddings a second time (ctx.extra), a path the
# relevance at blocks.0.hook_resid_pre would miss; Granite-MoE-hybrid's layers are mixtures of experts.
SUPPORTED = ("mamba", "mamba2", "gpt2", "bamba", "falcon_mamba", "falcon_h1", "jamba", "nemotron_h", "llama",
             "gpt_neox")

__all__ = ["SUPPORTED", "LRPResult", "LRPRules", "lrp", "lrp_relevance"]


Targets = int | Sequence[int] | Tensor


@dataclass(frozen=True)
class LRPResult:
    """``relevance`` [b, L] per input token (float64); ``logit`` [b] the target logits; ``remainder`` [b] =
    logit − Σ relevance, the relevance absorbed by biases (0 up to rounding for a bias-free model under
    the conservative rules; AttnLRP's softmax rule also absorbs some)."""

    relevance: Tensor
    logit: Tensor
    remainder: Tensor


def _targets(value: Targets, b: int, what: str) -> Tensor:
    t = torch.as_tensor(value)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{what} must be integers, got {t.dtype}")
    t = t.long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(b)
    if t.numel() != b:
        raise ValueError(f"{what}: one per sequence wanted ({b}), got {t.numel()}")
    return t


def _check(model: nn.Module, input_ids: Tensor, target_position: Targets,
           target_token: Targets) -> tuple[Tensor, Tensor, Tensor]:
    ad = adapter(model)
    if ad.model_type not in SUPPORTED:
        raise ValueError(f"LRP is implemented for {', '.join(SUPPORTED)} models; this is a {ad.model_type} model")
    if any(p in MOE_PARTS for layer in range(ad.n_layers) for p in ad.parts(layer)):
        raise ValueError("LRP through mixture-of-experts layers is not implemented (the router has no rule)")
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [L] or [b, L], got {tuple(input_ids.shape)}")
    b, L = ids.shape
    pos, tok = _targets(target_position, b, "target_position"), _targets(target_token, b, "target_token")
    bad = (pos < -L) | (pos >= L)
    if bool(bad.any()):
        raise ValueError(f"target position {int(pos[bad][0])} is outside the sequence of {L} tokens")
    vocab = model.get_output_embeddings().weight.shape[0]
    bad = (tok < 0) | (tok >= vocab)
    if bool(bad.any()):
        raise ValueError(f"target token {int(tok[bad][0])} is outside the vocabulary (0..{vocab - 1})")
    return ids, pos % L, tok


def lrp(model: nn.Module, input_ids: Tensor, target_position: Targets, target_token: Targets, *,
        rules: LRPRules | None = None, attention_mask: Tensor | None = None) -> LRPResult:
    """MambaLRP relevance of each input token for ``logits[r, target_position[r], target_token[r]]``.

    input_ids [L] or [b, L]; target_position, target_token: an int or one per sequence (negative positions
    count from the end); ``rules`` switches rules off one by one (default: all on, CP-LRP on attention);
    attention_mask [b, L] as for ``trace``.  One forward and one backward for the whole batch (its rows
    do not interact, so the gradient of the summed target logits is each row's own), in the model's dtype;
    only the input is differentiated.
    """
    ids, pos, tok = _check(model, input_ids, target_position, target_token)
    box: dict[str, Tensor] = {}

    def leaf(h: Tensor) -> Tensor:
        box["x"] = h.detach().requires_grad_(True)
        return box["x"]

    with lrp_mode(rules or LRPRules()):
        logits = trace_stream(model, ids, None, attention_mask=attention_mask,
                              edits={"blocks.0.hook_resid_pre": leaf}, grad=True)
    rows = torch.arange(ids.shape[0], device=logits.device)
    logit = logits[rows, pos.to(logits.device), tok.to(logits.device)]
    (grad,) = torch.autograd.grad(logit.sum(), box["x"])
    relevance = (grad.double() * box["x"].detach().double()).sum(-1)
    value = logit.detach().double()
    return LRPResult(relevance, value, value - relevance.sum(-1))


def lrp_relevance(model: nn.Module, input_ids: Tensor, target_position: Targets, target_token: Targets) -> Tensor:
    """MambaLRP relevance of each input token for the target logit (all rules on; see :func:`lrp`):
    [L] for one sequence given as [L] or [1, L], else [b, L]."""
    relevance = lrp(model, input_ids, target_position, target_token).relevance
    return relevance[0] if relevance.shape[0] == 1 else relevance
