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


@dataclass(frozen=True)
class LRPResult:
    """``relevance`` [L] per input token (float64); ``logit`` the target logit; ``remainder`` = logit − Σ
    relevance, the relevance absorbed by biases (0 up to rounding for a bias-free model under the
    conservative rules; AttnLRP's softmax rule also absorbs some)."""

    relevance: Tensor
    logit: float
    remainder: float


def _check(model: nn.Module, input_ids: Tensor, target_position: int, target_token: int) -> tuple[Tensor, int]:
    ad = adapter(model)
    if ad.model_type not in SUPPORTED:
        raise ValueError(f"LRP is implemented for {', '.join(SUPPORTED)} models; this is a {ad.model_type} model")
    if any(p in MOE_PARTS for layer in range(ad.n_layers) for p in ad.parts(layer)):
        raise ValueError("LRP through mixture-of-experts layers is not implemented (the router has no rule)")
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"LRP explains one sequence: input_ids must be [L] or [1, L], got {tuple(input_ids.shape)}")
    L = ids.shape[1]
    if not -L <= target_position < L:
        raise ValueError(f"target position {target_position} is outside the sequence of {L} tokens")
    vocab = model.get_output_embeddings().weight.shape[0]
    if not 0 <= target_token < vocab:
        raise ValueError(f"target token {target_token} is outside the vocabulary (0..{vocab - 1})")
    return ids, target_position % L


def lrp(model: nn.Module, input_ids: Tensor, target_position: int, target_token: int, *,
        rules: LRPRules | None = None) -> LRPResult:
    """MambaLRP relevance of each input token for ``logits[target_position, target_token]``.

    input_ids [L] or [1, L]; ``rules`` switches rules off one by one (default: all on, CP-LRP on attention).
    One forward and one backward in the model's dtype; the result does not depend on the model's
    ``requires_grad`` flags (only the input is differentiated).
    """
    ids, pos = _check(model, input_ids, target_position, target_token)
    box: dict[str, Tensor] = {}

    def leaf(h: Tensor) -> Tensor:
        box["x"] = h.detach().requires_grad_(True)
        return box["x"]

    with lrp_mode(rules or LRPRules()):
        logits = trace_stream(model, ids, None, edits={"blocks.0.hook_resid_pre": leaf}, grad=True)
    logit = logits[0, pos, target_token]
    (grad,) = torch.autograd.grad(logit, box["x"])
    relevance = (grad.double() * box["x"].detach().double()).sum(-1)[0]
    value = float(logit.detach())
    return LRPResult(relevance, value, value - float(relevance.sum()))


def lrp_relevance(model: nn.Module, input_ids: Tensor, target_position: int, target_token: int) -> Tensor:
    """[L] MambaLRP relevance of each input token for the target logit (all rules on); see :func:`lrp`."""
    return lrp(model, input_ids, target_position, target_token).relevance
