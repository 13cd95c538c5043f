"""The attention-neuron methods: per layer, per-unit activation and importance and a token relevance map.

Every function takes an :class:`~mambascope.attribution.extract.AttentionData` and returns
``{layer: record}`` with, for b rows, L positions and U scored units (Mamba d_inner channels, GPT-2 heads):

* ``activation_per_row``, ``importance_per_row`` [b, U]; ``activation``, ``importance`` [U] their row mean;
* ``relevance`` [b, L]: how much each position matters for the query q_b of row b (0 at padding and s > q);
* ``method``, ``layer``, ``unit``, ``query`` [b], plus method-specific extras.

Formulas and sources: docs/methods.md (written to match this file line by line).  Notation at layer ℓ,
row b, query q: α_c[q, s] the attention of unit c (Mamba-1 channel, Mamba-2/GPT-2 head), u[s, d] the
channel's scan input, g = ∂target/∂y, e[q, d] the effective gate (post = e ⊙ y), W the neuron write
matrix (out_proj), c(d) the attention unit of channel d.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from mambascope.attribution.extract import (
    GRADIENT_METHODS,
    METHODS,
    AttentionData,
    check_method,
    extract,
    per_channel,
)

MethodFn = Callable[[AttentionData], dict[int, dict]]

__all__ = ["METHOD_FUNCTIONS", "compute_method"]


def _record(data: AttentionData, layer: int, method: str, act: Tensor, imp: Tensor, rel: Tensor,
            **extra: Tensor) -> dict:
    # relevance is defined over the keys a query can see: zero at padding and after the query.
    L = rel.shape[-1]
    visible = (torch.arange(L, device=rel.device) <= data.query[:, None]) & data.attention_mask.bool()
    return {"method": method, "layer": layer, "unit": data.unit, "num_units": act.shape[-1], "query": data.query,
            "activation": act.mean(0), "importance": imp.mean(0), "activation_per_row": act,
            "importance_per_row": imp, "relevance": rel * visible, **extra}


def _need(data: AttentionData, method: str, *keys: str) -> None:
    if method in data.errors:
        raise RuntimeError(f"{method} could not be extracted: {data.errors[method]}")
    if method not in data.methods:
        grad = " (it needs the gradient pass, grad=True)" if method in GRADIENT_METHODS else ""
        raise ValueError(f"method {method!r} was not extracted{grad}: call extract_attention_vectors(..., "
                         f"methods=[..., {method!r}]) (extracted: {', '.join(data.methods)})")
    for layer, entry in data.items():
        missing = [k for k in keys if k not in entry]
        if missing:
            raise KeyError(f"{method}: layer {layer} lacks {', '.join(missing)} in the extracted data")


def attention_weighted(data: AttentionData) -> dict[int, dict]:
    """Raw hidden attention (Ali et al. 2024, §4 "attention matrices" visualised per channel and averaged).

    relevance[s] = mean_c |α_c[q, s]|.  Mamba: activation_d = Σ_s |α_c(d)[q, s]·u[s, d]| (the magnitude the
    channel gathers at the query), importance_d = activation_d·|e[q, d]|·‖W[:, d]‖₂.  GPT-2 heads:
    activation_h = Σ_s A_h[q, s]·‖v_{s,h}‖, importance_h = Σ_s A_h[q, s]·‖W_O,h v_{s,h}‖.
    """
    keys = ("value_norm", "value_write_norm") if data.unit == "head" else ("ssm_input", "gate_q", "write_norm")
    _need(data, "attention_weighted", "query_attention", *keys)
    out = {}
    for layer, e in data.items():
        aq = e["query_attention"]  # [b, C, L]
        rel = aq.abs().mean(1)
        if data.unit == "head":
            act = (aq * e["value_norm"]).sum(-1)
            imp = (aq * e["value_write_norm"]).sum(-1)
        else:
            a = per_channel(data, layer, aq)  # [b, E, L]
            act = (a * e["ssm_input"].transpose(1, 2)).abs().sum(-1)
            imp = act * e["gate_q"].abs() * e["write_norm"]
        out[layer] = _record(data, layer, "attention_weighted", act, imp, rel)
    return out


def gradient_guided(data: AttentionData) -> dict[int, dict]:
    """Attention × gradient (Ali et al. 2024 Mamba-Attribution, after Chefer et al. 2021).

    Mamba: y[t, d] = Σ_s α_c(d)[t, s]·u[s, d] + D·u[t, d], so ∂target/∂α_c[q, s] = Σ_{d∈c} g[q, d]·u[s, d]
    and G_c[q, s] = (∇α_c ⊙ α_c)[q, s] (one term per channel on Mamba-1, summed over the head's channels on
    Mamba-2).  relevance[s] = mean_c max(G_c[q, s], 0); activation_d = Σ_s g[q, d]·u[s, d]·α_c(d)[q, s]
    (signed first-order contribution of the channel's attention output at q), importance_d = |activation_d|.
    GPT-2: G_h = ∇A_h ⊙ A_h from autograd on the softmax pattern; activation_h = Σ_s G_h[q, s].
    Extra: ``grad_attention`` [b, C, L] = G at the query row.
    """
    keys = ("grad_query_attention",) if data.unit == "head" else ("ssm_input", "grad_y_q")
    _need(data, "gradient_guided", "query_attention", *keys)
    out = {}
    for layer, e in data.items():
        aq = e["query_attention"]
        if data.unit == "head":
            G = e["grad_query_attention"] * aq  # [b, H, L]
            act = G.sum(-1)
        else:
            Gd = e["grad_y_q"][:, :, None] * e["ssm_input"].transpose(1, 2) * per_channel(data, layer, aq)  # [b, E, L]
            C = aq.shape[1]
            G = Gd.reshape(Gd.shape[0], C, -1, Gd.shape[-1]).sum(2)  # channels of one head share its α
            act = Gd.sum(-1)
        out[layer] = _record(data, layer, "gradient_guided", act, act.abs(), G.clamp_min(0).mean(1),
                             grad_attention=G)
    return out


def gradient_x_post(data: AttentionData) -> dict[int, dict]:
    """Input × gradient at the neuron unit over all positions (new here; Shrikumar et al. 2016 applied to post).

    Mamba: P[t, d] = post[t, d]·∂target/∂post[t, d]; activation_d = Σ_t P[t, d] (the first-order estimate of
    the target change when neuron d is zero-ablated everywhere, with the opposite sign), importance = |·|,
    relevance[t] = Σ_d P[t, d] (signed: which positions' neurons at this layer carry the target).
    GPT-2 heads: post = the head's write o_h[t]; since the head output is linear in its pattern row,
    ⟨∂target/∂attn_out[t], o_h[t]⟩ = Σ_s (∇A_h ⊙ A_h)[t, s] exactly, so P[t, h] is that sum.
    """
    key = "grad_x_attention" if data.unit == "head" else "post_x_grad"
    _need(data, "gradient_x_post", key)
    out = {}
    for layer, e in data.items():
        P = e[key]
        if data.unit == "head":
            P = P.transpose(1, 2)  # [b, L, H]
        out[layer] = _record(data, layer, "gradient_x_post", P.sum(1), P.sum(1).abs(), P.sum(-1))
    return out


def block(data: AttentionData) -> dict[int, dict]:
    """Implicit attention of the whole mixer (Zimerman et al. 2024): post[q, d] = Σ_j M_d[q, j]·x[j, d] + bias.

    relevance[j] = mean_d |M_d[q, j]|; activation_d = Σ_j |M_d[q, j]·x[j, d]|; importance_d =
    activation_d·‖W[:, d]‖₂ (the gate is already inside M).  Mamba only.
    """
    _need(data, "block", "block_query", "x", "write_norm")
    out = {}
    for layer, e in data.items():
        M = e["block_query"]  # [b, E, L]
        act = (M * e["x"].transpose(1, 2)).abs().sum(-1)
        out[layer] = _record(data, layer, "block", act, act * e["write_norm"], M.abs().mean(1))
    return out


def rollout(data: AttentionData) -> dict[int, dict]:
    """Attention rollout (Abnar & Zuidema 2020) with the residual identity, as a true product from layer 0.

    Ā_ℓ = row-normalised mean_c |α_c| (GPT-2: head-mean softmax), Â_ℓ = ½Ā_ℓ + ½I, R_ℓ = Â_ℓ·R_{ℓ-1};
    relevance = r = R_ℓ[q, :].  Per unit c: a_c = |α_c[q]|/‖α_c[q]‖₁ and w_c = ‖α_c[q]‖₁/Σ_c'‖α_c'[q]‖₁, so that
    Ā_ℓ[q] = Σ_c w_c a_c; its rollout row ρ_c = (½a_c + ½e_q)·R_{ℓ-1} satisfies r = Σ_c w_c ρ_c.
    activation_c = cos(ρ_c, r); importance_c = w_c·⟨ρ_c, r⟩/‖r‖² (sums to 1 over units).  Mamba-2: each
    channel takes its head's activation and 1/head_dim of its importance.
    Extra: ``channel_weight`` [b, C] = w.
    """
    _need(data, "rollout", "query_attention")
    out = {}
    b, L = data.input_ids.shape
    rows = torch.arange(b, device=data.input_ids.device)
    q = data.query
    eye = torch.eye(L, device=rows.device)
    R_prev = eye.expand(b, L, L)
    for layer in range(max(data) + 1):  # a loop over layers: R_{ℓ-1} is built along the way
        A_hat = 0.5 * data.rollout_matrices[layer] + 0.5 * eye
        if layer in data:
            aq = data[layer]["query_attention"].abs()  # [b, C, L]
            R_prev = R_prev.to(aq.dtype)
            mass = aq.sum(-1)  # ‖α_c[q]‖₁ [b, C]
            a = aq / torch.where(mass > 0, mass, torch.ones_like(mass))[..., None]
            total = mass.sum(-1, keepdim=True)
            w = mass / torch.where(total > 0, total, torch.ones_like(total))
            r = (A_hat[rows, q][:, None, :] @ R_prev)[:, 0]  # [b, L] = R_ℓ[q, :]
            rho = 0.5 * (a @ R_prev) + 0.5 * R_prev[rows, q][:, None, :]  # [b, C, L]
            dot = (rho * r[:, None, :]).sum(-1)
            act = dot / (rho.norm(dim=-1) * r.norm(dim=-1, keepdim=True)).clamp_min(torch.finfo(dot.dtype).tiny)
            imp = w * dot / (r * r).sum(-1, keepdim=True)
            C, U = aq.shape[1], data.n_units[layer]
            act, imp = per_channel(data, layer, act), per_channel(data, layer, imp) * (C / U)
            out[layer] = _record(data, layer, "rollout", act, imp, r, channel_weight=w)
        R_prev = A_hat.to(R_prev.dtype) @ R_prev
    return out


METHOD_FUNCTIONS: dict[str, MethodFn] = {
    "attention_weighted": attention_weighted,
    "gradient_guided": gradient_guided,
    "rollout": rollout,
    "block": block,
    "gradient_x_post": gradient_x_post,
}
assert tuple(METHOD_FUNCTIONS) == METHODS


def compute_method(data: AttentionData, method: str) -> dict[int, dict]:
    """``{layer: record}`` of ``method`` on ``data`` (ValueError for an unknown or unavailable method)."""
    check_method(method, data.arch)
    with torch.no_grad():
        return METHOD_FUNCTIONS[method](data)


def method_records(model: nn.Module, windows: Tensor, layers: list[int], methods: list[str], *,
                   query: int | Tensor | None, batch_size: int, errors: dict[str, str],
                   target: Tensor | None = None) -> Iterator[tuple[Tensor, AttentionData, dict[str, dict]]]:
    """Per batch of ``windows``: one extraction, then every method's per-layer records.

    Yields (batch, data, {method: records}).  A method that fails is recorded in ``errors`` by name with its
    reason and left out of later batches; callers drop what they accumulated for it (docs/design.md §6).
    ``query`` and ``target`` (see ``extract``) apply to every batch: per-row tensors need one batch.
    """
    for start in range(0, windows.shape[0], batch_size):  # a loop over batches
        batch = windows[start:start + batch_size]
        active = [m for m in methods if m not in errors]
        data = extract(model, batch, layers, methods=active, query=query, store="rows", on_error="record",
                       target=target)
        errors.update(data.errors)
        records: dict[str, dict] = {}
        for method in [m for m in active if m not in errors]:
            try:
                records[method] = compute_method(data, method)
            except Exception as exc:  # one failing method must not stop the others
                errors[method] = f"{type(exc).__name__}: {exc}"
        yield batch, data, records
