"""Direct logit effect of neurons and self-suppression of token detectors (Voita et al. 2023,
"Neurons in Large Language Models: Dead, N-gram, Positional", §4; docs/design.md §5). No model runs.

Direct logit effect of neuron e on vocabulary token v:

    effect[e, v] = s_e · Σ_d W_U[v, d] · g[d] · w_e[d]

with w_e = out_proj_weight[:, e] (the neuron's write vector into the residual stream [d_model]),
g the final norm's weight [d_model] (RMSNorm on Mamba, LayerNorm on GPT-2) and W_U [V, d_model] the
unembedding. The norm is treated as g times a positive per-token scale (1/RMS), which rescales all
logits of a token alike and so changes neither signs nor rankings; biases are neuron-independent
and left out. ``center=True`` also applies LayerNorm's mean subtraction (w_e − mean(w_e)), exact
for the linear part of GPT-2's ln_f. s_e (``activation_sign``; default +1, the effect per unit of
activation, except in ``detector_suppression``, which requires it) is the sign of the neuron's
typical activation (the pipeline passes the sign of ``mean_post_active`` from the activity census; only
its sign is used, and 0 zeroes the effect):
Mamba's post = y·SiLU(z) can be negative while the gate is open, and the effect of an activation a
is a·effect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mambascope.neurons._common import check_positive_int


def _directions(out_proj_weight: Tensor, norm_weight: Tensor | None, neurons: Tensor,
                activation_sign: Tensor | None, center: bool) -> Tensor:
    """g ⊙ s_e·w_e for the chosen neurons: [d_model, n] float32 (or wider)."""
    if out_proj_weight.dim() != 2:
        raise ValueError(f"out_proj_weight must be [d_model, E], got {tuple(out_proj_weight.shape)}")
    dtype = torch.promote_types(out_proj_weight.dtype, torch.float32)
    w = out_proj_weight[:, neurons.to(out_proj_weight.device)].to(dtype)
    if center:
        w = w - w.mean(0, keepdim=True)
    if norm_weight is not None:
        if norm_weight.shape != (out_proj_weight.shape[0],):
            raise ValueError(f"norm_weight must be [d_model={out_proj_weight.shape[0]}], "
                             f"got {tuple(norm_weight.shape)}")
        w = w * norm_weight.to(w)[:, None]
    if activation_sign is not None:
        sign = torch.as_tensor(activation_sign).to(w)
        if sign.shape != (out_proj_weight.shape[1],):
            raise ValueError(f"activation_sign must be [E={out_proj_weight.shape[1]}], got {tuple(sign.shape)}")
        if not bool(torch.isfinite(sign).all()):
            raise ValueError("activation_sign must be finite (use +1 for a dead neuron's undefined sign)")
        w = w * torch.sign(sign[neurons.to(sign.device)])[None, :]
    return w


def _neuron_index(neurons: Sequence[int] | Tensor | None, n_neurons: int) -> Tensor:
    if neurons is None:
        return torch.arange(n_neurons)
    idx = torch.as_tensor(neurons, dtype=torch.long).flatten().cpu()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_neurons):
        raise ValueError(f"neuron indices must lie in [0, {n_neurons})")
    return idx


def direct_logit_effects(out_proj_weight: Tensor, norm_weight: Tensor | None, unembed: Tensor,
                         neurons: Sequence[int] | Tensor | None = None, *,
                         activation_sign: Tensor | None = None, center: bool = False,
                         chunk_size: int = 1024) -> Tensor:
    """effect [n, V] for the chosen ``neurons`` (all E by default; see the module docstring).

    ``out_proj_weight`` [d_model, E], ``norm_weight`` [d_model] or None, ``unembed`` W_U [V, d_model].
    Computed ``chunk_size`` neurons at a time so the intermediate stays [V, chunk].
    """
    chunk_size = check_positive_int("chunk_size", chunk_size)
    if unembed.dim() != 2 or unembed.shape[1] != out_proj_weight.shape[0]:
        raise ValueError(f"unembed must be [V, d_model={out_proj_weight.shape[0]}], got {tuple(unembed.shape)}")
    idx = _neuron_index(neurons, out_proj_weight.shape[1])
    w = _directions(out_proj_weight, norm_weight, idx, activation_sign, center)
    W_U = unembed.to(w)
    out = torch.empty(idx.numel(), unembed.shape[0], dtype=w.dtype, device=w.device)
    for start in range(0, idx.numel(), chunk_size):  # chunks of neurons bound the memory, not a per-neuron loop
        out[start:start + chunk_size] = (W_U @ w[:, start:start + chunk_size]).T
    return out


def top_logit_tokens(out_proj_weight: Tensor, norm_weight: Tensor | None, unembed: Tensor, k: int = 10, *,
                     neurons: Sequence[int] | Tensor | None = None, activation_sign: Tensor | None = None,
                     center: bool = False, chunk_size: int = 256) -> dict[str, Tensor]:
    """Per neuron, the k most promoted (largest effect) and k most suppressed (most negative) tokens.

    Returns tensors ``neurons`` [n], ``promoted_tokens``/``promoted_effects`` [n,k] (descending) and
    ``suppressed_tokens``/``suppressed_effects`` [n,k] (ascending, most negative first), never
    materialising more than [chunk_size, V] effects.
    """
    k = check_positive_int("k", k)
    idx = _neuron_index(neurons, out_proj_weight.shape[1])
    k = min(k, unembed.shape[0])
    parts: dict[str, list[Tensor]] = {"promoted_tokens": [], "promoted_effects": [],
                                      "suppressed_tokens": [], "suppressed_effects": []}
    for start in range(0, idx.numel(), chunk_size):  # neuron chunks, for memory
        eff = direct_logit_effects(out_proj_weight, norm_weight, unembed, idx[start:start + chunk_size],
                                   activation_sign=activation_sign, center=center, chunk_size=chunk_size)
        hi, lo = eff.topk(k, dim=1), eff.topk(k, dim=1, largest=False)
        parts["promoted_effects"].append(hi.values)
        parts["promoted_tokens"].append(hi.indices)
        parts["suppressed_effects"].append(lo.values)
        parts["suppressed_tokens"].append(lo.indices)
    empty_v = torch.zeros(0, k, dtype=torch.float32)
    empty_i = torch.zeros(0, k, dtype=torch.long)
    result = {name: torch.cat(v) if v else (empty_i if name.endswith("tokens") else empty_v)
              for name, v in parts.items()}
    return {"neurons": idx, **result}


def detector_suppression(out_proj_weight: Tensor, norm_weight: Tensor | None, unembed: Tensor,
                         detectors: Sequence[Mapping[str, Any]], k: int = 10, *,
                         activation_sign: Tensor, center: bool = False,
                         chunk_size: int = 256) -> dict[str, Any]:
    """Do token detectors suppress their own trigger tokens?

    ``detectors``: [{"neuron": e, "tokens": [t, …]}] (``token_detectors`` of the detector census).
    ``activation_sign`` [E] is required: a detector writes a·w_e when it fires, so whether it lowers
    its triggers depends on the sign of a (on Mamba, post is often negative while the gate is open;
    pass the sign of ``mean_post_active``).
    For each trigger t of neuron e: ``effect`` = effect[e, t]; ``suppression_rank`` = 1 + #{v :
    effect[e, v] < effect[e, t]} (1 = the most suppressed token; ties share the best rank);
    ``in_top_k`` ⇔ rank <= k; ``negative`` ⇔ effect < 0. A detector **suppresses its own
    triggers** ⇔ every trigger is in its top-k suppressed (``suppresses_all``); ``suppresses_any``
    and ``all_negative`` are the weaker variants. Per layer: the fraction of detectors of each kind
    (None when there are no detectors) and ``trigger_fraction_in_top_k`` over all (detector, trigger)
    pairs. Effects are computed for the detector neurons only, ``chunk_size`` pairs at a time.
    """
    k = check_positive_int("k", k)
    chunk_size = check_positive_int("chunk_size", chunk_size)
    V = unembed.shape[0]
    neurons = [int(d["neuron"]) for d in detectors]
    tokens = [[int(t) for t in d["tokens"]] for d in detectors]
    if any(not t for t in tokens):
        raise ValueError("every detector needs at least one trigger token")
    if any(t < 0 or t >= V for ts in tokens for t in ts):
        raise ValueError(f"trigger token ids must lie in [0, V={V})")
    n_det = len(neurons)
    if n_det == 0:
        return {"k": k, "n_detectors": 0, "detectors": [], "fraction_suppressing_own_triggers": None,
                "fraction_suppressing_any_trigger": None, "fraction_all_triggers_negative": None,
                "trigger_fraction_in_top_k": None}
    eff = direct_logit_effects(out_proj_weight, norm_weight, unembed, neurons,
                               activation_sign=activation_sign, center=center, chunk_size=chunk_size)  # [D, V]
    sizes = torch.tensor([len(t) for t in tokens])
    det_of_pair = torch.repeat_interleave(torch.arange(n_det), sizes).to(eff.device)  # [P]
    tok_of_pair = torch.tensor([t for ts in tokens for t in ts], device=eff.device)  # [P]
    value = eff[det_of_pair, tok_of_pair]
    rank = torch.empty_like(tok_of_pair)
    for start in range(0, value.numel(), chunk_size):  # chunks of pairs keep [chunk, V] in memory
        sl = slice(start, start + chunk_size)
        rank[sl] = 1 + (eff[det_of_pair[sl]] < value[sl, None]).sum(1)
    in_top = rank <= k
    negative = value < 0
    n_in = torch.zeros(n_det, dtype=torch.long, device=eff.device).index_add_(0, det_of_pair, in_top.long())
    n_neg = torch.zeros_like(n_in).index_add_(0, det_of_pair, negative.long())
    sizes = sizes.to(eff.device)
    all_in, any_in, all_neg = n_in == sizes, n_in > 0, n_neg == sizes
    splits = sizes.tolist()
    per = [torch.split(x, splits) for x in (value, rank, in_top, negative)]
    # JSON records, one per detector found (formatting, not computation)
    records = [
        {"neuron": e, "tokens": ts, "effect": v.tolist(), "suppression_rank": r.tolist(),
         "in_top_k": i.tolist(), "negative": n.tolist(), "suppresses_all": a, "suppresses_any": y,
         "all_negative": g}
        for e, ts, v, r, i, n, a, y, g in zip(neurons, tokens, *per, all_in.tolist(), any_in.tolist(),
                                              all_neg.tolist(), strict=True)
    ]
    return {
        "k": k,
        "n_detectors": n_det,
        "detectors": records,
        "fraction_suppressing_own_triggers": float(all_in.double().mean()),
        "fraction_suppressing_any_trigger": float(any_in.double().mean()),
        "fraction_all_triggers_negative": float(all_neg.double().mean()),
        "trigger_fraction_in_top_k": float(in_top.double().mean()),
    }
