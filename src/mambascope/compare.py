"""Cross-model comparison on the same definitions (docs/design.md §5; the seed's ``compare_models.py``).

Every model is analysed on the same texts with its own tokenizer and its own neuron unit (Mamba
``mixer.hook_post`` with gate activity; transformer ``mlp.hook_post`` with activation > 0), so rates
are per token of that model and both tokens and characters are reported.  Depth is normalised to
0..1 (layer / (n_layers − 1)) so models of different depth share an axis.

Attention is compared through one row-stochastic matrix per layer and window:
Mamba: P[t, s] ∝ mean_d |α_d[t, s]| (hidden attention, channel/head ``absmean``, rows renormalised);
transformer: P = mean over heads of the softmax attention.  Per row t ≥ 1 of P (Ali et al. 2024 for α):
entropy −Σ_s P log P (nats), mean distance Σ_s P·(t − s), sink mass P[t, 0], previous-token mass
P[t, t−1], and whether at least half of the mass lies in the last ``local_k`` positions (s > t − k).
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from mambascope.arch import adapter
from mambascope.data import tokenize_windows
from mambascope.models import load_model
from mambascope.pipeline import census_pass, model_info
from mambascope.ssm import hidden_attention
from mambascope.trace import trace

ATTENTION_STATS = ("entropy", "mean_distance", "sink_mass", "previous_token_mass", "local_fraction")


def attention_rows(model: nn.Module, windows: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per layer the row-stochastic attention P [n, L, L] of every window (see the module docstring):
    the head-mean softmax pattern on attention layers, the normalised hidden attention on SSM layers
    (a hybrid's attention-and-mixer layer gives its mixer's); MLP-only layers have none."""
    ad = adapter(model)
    ssm = ad.ssm_layers()
    attn = [layer for layer in range(ad.n_layers) if "attn" in ad.parts(layer) and layer not in ssm]
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in attn]
    names += [f"blocks.{layer}.mixer.{u}" for layer in ssm for u in ("hook_dt", "hook_B", "hook_C")]
    tr = trace(model, windows, names=names)
    out = {layer: tr[f"blocks.{layer}.attn.hook_pattern"].float().mean(1) for layer in attn}
    for layer in ssm:
        mass = hidden_attention(tr.layer(layer), ad.mixer_params(layer), "s6", reduce="absmean")
        out[layer] = mass / mass.sum(-1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)
    return dict(sorted(out.items()))


def attention_statistics(P: torch.Tensor, local_k: int = 8) -> dict[str, float]:
    """The statistics of the module docstring, averaged over rows t ≥ 1 of P [n, L, L]."""
    L = P.shape[-1]
    t = torch.arange(L, device=P.device)
    rows = slice(1, None)
    p = P[:, rows]
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    distance = (p * (t[rows, None] - t[None, :]).clamp_min(0)).sum(-1)
    sink = p[..., 0]
    previous = P.diagonal(offset=-1, dim1=1, dim2=2)
    local = (p * ((t[None, :] > t[rows, None] - local_k) & (t[None, :] <= t[rows, None]))).sum(-1) >= 0.5
    return {"entropy": float(entropy.mean()), "mean_distance": float(distance.mean()), "sink_mass": float(sink.mean()),
            "previous_token_mass": float(previous.mean()), "local_fraction": float(local.float().mean())}


def _layer_rows(name: str, info: dict, census: dict, attention: dict[int, dict[str, float]]) -> list[dict]:
    depth_den = max(info["n_layers"] - 1, 1)
    rows = []
    for layer, r in census["layers"].items():
        selectivity = r["delta"]["selectivity"] if r.get("delta") else None
        rows.append({
            "model": name, "arch": info["arch"], "layer": int(layer), "layer_kind": r.get("layer_kind", info["arch"]),
            "depth": int(layer) / depth_den,
            "neurons": r["n_neurons"], "tokens": r["tokens"], "pct_dead": r["pct_dead"],
            "pct_rarely_active": 100 * len(r["rarely_active"]) / r["n_neurons"],
            "mean_frequency_alive": r["mean_frequency_alive"],
            "pct_positional": 100 * len(r["positional_neurons"]) / r["n_neurons"],
            "mean_abs_position_correlation": r["positional"]["mean_abs_position_correlation"],
            "token_detectors": len(r["token_detectors"]), "tokens_covered": len(r["tokens_covered"]),
            "mean_dt_selectivity": (sum(selectivity) / len(selectivity)) if selectivity else None,
            **attention.get(int(layer), {}),
        })
    for layer in census.get("skipped_layers", {}):  # a hybrid's layers without neurons: attention only
        rows.append({"model": name, "arch": info["arch"], "layer": int(layer),
                     "layer_kind": info["layer_kinds"][int(layer)], "depth": int(layer) / depth_den,
                     **attention.get(int(layer), {})})
    return sorted(rows, key=lambda row: row["layer"])


def compare_models(models: Sequence[str], texts: Sequence[str], *, window: int = 128, max_tokens: int | None = None,
                   attention_windows: int = 8, local_k: int = 8, device: str = "auto", batch_size: int = 8,
                   progress: bool = True) -> dict[str, Any]:
    """Census and attention statistics of each model on the same ``texts``; models that fail to load or
    analyse are reported under ``errors`` with the reason, the rest are compared.

    Returns ``models`` {name: {model info, analysed_tokens, windows, text_characters, text_tokens,
    chars_per_token, loss}}, ``layers`` (one record per
    model × layer, see ``comparison_table``), ``errors``.  Fewer than two analysed models is an error.
    """
    if len(models) < 2:
        raise ValueError("compare needs at least two models")
    characters = sum(len(t) for t in texts)
    out: dict[str, Any] = {"models": {}, "layers": [], "errors": {},
                           "definitions": {"attention_local_k": local_k, "attention_windows": attention_windows}}
    for name in models:
        try:
            model, tokenizer = load_model(name, device=device)
            windows = tokenize_windows(texts, tokenizer, window, max_tokens=max_tokens).ids
            census = census_pass(model, tokenizer, windows, batch_size=batch_size, progress=progress)
            with torch.no_grad():
                P = attention_rows(model, windows[:attention_windows])
            attention = {layer: attention_statistics(p, local_k) for layer, p in P.items()}
            info = model_info(model, name)
        except Exception as exc:  # one model failing must not stop the comparison of the others
            out["errors"][name] = f"{type(exc).__name__}: {exc}"
            continue
        text_tokens = sum(len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"])
        out["models"][name] = {**info, "analysed_tokens": int(windows.numel()), "windows": int(windows.shape[0]),
                               "text_characters": characters, "text_tokens": text_tokens,
                               "chars_per_token": characters / max(text_tokens, 1), "loss": census["loss"]}
        out["layers"].extend(_layer_rows(name, info, census, attention))
        del model, census, P
        gc.collect()
    if len(out["models"]) < 2:
        raise ValueError(f"fewer than two models could be compared; failures: {out['errors']}")
    return out


def comparison_table(comparison: dict[str, Any]) -> pd.DataFrame:
    """One row per model × layer with the census rates, Δ selectivity and attention statistics."""
    return pd.DataFrame(comparison["layers"])


def analyze_model_dead_neurons(model_name: str, texts: Sequence[str], *, window: int = 128,
                               max_tokens: int | None = None, device: str = "auto") -> dict[str, Any]:
    """The seed's per-model entry: dead / rarely active neurons of every layer of ``model_name`` on ``texts``.

    Returns ``model`` info, ``tokens`` and ``layers`` {layer: {pct_dead, dead_neurons, rarely_active,
    mean_frequency_alive, activation_frequency, tokens}} on the model's own neuron unit.
    """
    model, tokenizer = load_model(model_name, device=device)
    windows = tokenize_windows(texts, tokenizer, window, max_tokens=max_tokens).ids
    census = census_pass(model, tokenizer, windows, progress=False)
    keys = ("pct_dead", "dead_neurons", "rarely_active", "mean_frequency_alive", "activation_frequency", "tokens")
    return {"model": model_info(model, model_name), "tokens": int(windows.numel()),
            "layers": {layer: {k: r[k] for k in keys} for layer, r in census["layers"].items()}}
