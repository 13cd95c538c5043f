"""Attention neurons: neurons scored through the hidden attention of Mamba models (the seed's API, docs/design.md §6).

    an = MambaAttentionNeurons(model)
    data = an.extract_attention_vectors(input_ids, layer_indices=[0, 1])
    data[0]["attention_matrix"]    # [b, d_inner, L, L] exact s6 α (Mamba-1); [b, heads, L, L] (Mamba-2: α per
                                   # head; GPT-2: softmax probabilities)
    data[0]["attention_vectors"]   # [b, L, L] its mean over channels (heads)
    neurons = an.create_mamba_neurons(data, method="attention_weighted")
    an.analyze_neuron_behavior(neurons, layer_idx=0)

Methods (exact formulas and sources in docs/methods.md): ``attention_weighted`` (raw hidden attention,
Ali et al. 2024), ``gradient_guided`` (attention × gradient, Ali et al. 2024 / Chefer et al. 2021),
``rollout`` (Abnar & Zuidema 2020, true product from layer 0), ``block`` (implicit attention of the whole
mixer, Zimerman et al. 2024; Mamba only) and ``gradient_x_post`` (input × gradient at the neuron unit over
all positions).  Each yields per layer a per-unit ``activation`` and ``importance`` (Mamba: the d_inner
channels of ``mixer.hook_post``; GPT-2: the attention heads) and a token ``relevance`` map [b, L] for the
query position (default the last valid token of each row).

Nothing here substitutes data for a failed computation: errors are raised, or (in
:func:`integrate_mamba_attention_neurons`) recorded per method in ``errors``.

The seed's 6-panel figure is the report's ``mambascope.report.plot_attention_neurons_analysis``, which takes
these results; the analysis never imports the report (docs/design.md §2, §6).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mambascope.attribution.extract import (
    METHODS,
    AttentionData,
    check_layers,
    check_method,
    check_methods,
    extract,
)
from mambascope.attribution.faithfulness import (
    FRACTIONS_DEFAULT_STEPS,
    TOKEN_WINDOWS,
    evaluate_faithfulness,
    faithfulness_table,
)
from mambascope.attribution.methods import compute_method, method_records
from mambascope.results import to_jsonable
from mambascope.trace import architecture, n_layers

__all__ = ["METHODS", "MambaAttentionNeurons", "analyze_neurons", "integrate_mamba_attention_neurons",
           "run_attention_analysis"]

TOP_K = 10


def analyze_neurons(record: Mapping[str, Any]) -> dict:
    """Summary of one method's units at one layer (the seed's ``analyze_neuron_behavior`` keys).

    num_neurons; mean_activation and activation_std (population std) of the activation vector;
    top_neurons: the 10 units of largest importance (``indices``, ``importance``, ``activation``);
    neuron_diversity = H(p)/ln(U), the normalised Shannon entropy of p = importance/Σ importance (1: every
    unit equally important, 0: one unit carries everything).  Chosen over pairwise similarity of per-unit
    token maps because it is defined identically for every method (gradient_x_post has no per-unit map) and
    comparable across layer widths and architectures.  Also ``effective_neurons`` = exp(H).  When every
    importance is 0 the distribution is undefined: diversity is None and ``neuron_diversity_note`` says why.
    """
    act = torch.as_tensor(record["activation"], dtype=torch.float64).reshape(-1)
    imp = torch.as_tensor(record["importance"], dtype=torch.float64).reshape(-1)
    n = act.numel()
    if n == 0 or imp.numel() != n:
        raise ValueError(f"activation ({n}) and importance ({imp.numel()}) must be non-empty and equally long")
    if bool((imp < 0).any()):
        raise ValueError("importance must be non-negative")
    top = torch.topk(imp, min(TOP_K, n))
    out: dict[str, Any] = {
        "method": record.get("method"), "layer": record.get("layer"), "unit": record.get("unit"),
        "num_neurons": n,
        "mean_activation": float(act.mean()),
        "activation_std": float(act.std(correction=0)),
        "top_neurons": {"indices": top.indices.tolist(), "importance": top.values.tolist(),
                        "activation": act[top.indices].tolist()},
    }
    total = float(imp.sum())
    if total > 0 and n > 1:
        p = imp / total
        H = float(-(p[p > 0] * p[p > 0].log()).sum())
        out["neuron_diversity"] = H / math.log(n)
        out["effective_neurons"] = math.exp(H)
    elif n == 1:
        out["neuron_diversity"], out["effective_neurons"] = 0.0, 1.0
    else:
        out["neuron_diversity"], out["effective_neurons"] = None, None
        out["neuron_diversity_note"] = "every importance is 0: the importance distribution is undefined"
    return out


class MambaAttentionNeurons:
    """Attention-neuron analysis of one model (Mamba-1, Mamba-2, or GPT-2 style for comparison).

    The object keeps what it computed: ``attention_data`` (the last extraction), ``neurons[method]`` (the
    last records of each method) and ``analysis[method][layer]``.

    Args:
        model: a ``MambaForCausalLM``, ``Mamba2ForCausalLM`` or ``GPT2LMHeadModel``.
        store: default for :meth:`extract_attention_vectors` — ``"full"`` (keep [b, C, L, L]), ``"vectors"``
            (only the [b, L, L] channel mean), ``"rows"`` (only the query rows the methods need).
        max_bytes: memory budget handed to the hidden-attention kernel (default: available memory).
    """

    def __init__(self, model: nn.Module, *, store: str = "full", max_bytes: int | None = None):
        self.model = model
        self.arch = architecture(model)
        self.n_layers = n_layers(model)
        self.store = store
        self.max_bytes = max_bytes
        self.attention_data: AttentionData | None = None
        self.neurons: dict[str, dict[int, dict]] = {}
        self.analysis: dict[str, dict[int, dict]] = {}

    def extract_attention_vectors(
        self,
        input_ids: Tensor,
        layer_indices: int | Sequence[int] | None = None,
        attention_mask: Tensor | None = None,
        *,
        methods: str | Iterable[str] | None = None,
        query: int | Sequence[int] | Tensor | None = None,
        store: str | None = None,
    ) -> AttentionData:
        """Run the traced model once on ``input_ids`` [b, L] and return ``{layer: {...}}`` (see AttentionData).

        ``methods`` limits what is prepared (default: every method this architecture supports; the
        autograd pass runs only when a gradient method is among them).  ``query``: position(s) whose
        attention rows and target are used (default: last valid token of each row).  Layers default to
        all.  A full matrix too large for memory raises ``AttentionMemoryError`` (pass ``store="rows"``).
        """
        data = extract(self.model, input_ids, layer_indices, attention_mask, methods=methods, query=query,
                       store=store or self.store, max_bytes=self.max_bytes)
        self.attention_data = data
        return data

    def create_mamba_neurons(self, attention_data: AttentionData | None = None,
                             method: str = "attention_weighted") -> dict[int, dict]:
        """``{layer: record}`` of ``method`` (records: see :mod:`mambascope.attribution.methods`).

        Raises ValueError for an unknown method (listing the valid ones), a Mamba-only method on GPT-2, or a
        method the data was not extracted for.
        """
        if method not in METHODS:
            raise ValueError(f"unknown attention-neuron method {method!r}; valid methods: {', '.join(METHODS)}")
        data = attention_data if attention_data is not None else self.attention_data
        if data is None:
            raise ValueError("no attention data: call extract_attention_vectors first or pass its result")
        if not isinstance(data, AttentionData):
            raise TypeError("attention_data must be the result of extract_attention_vectors")
        check_method(method, data.arch)
        neurons = compute_method(data, method)
        self.neurons[method] = neurons
        return neurons

    def analyze_neuron_behavior(self, neurons: Mapping[int, Mapping[str, Any]], layer_idx: int) -> dict:
        """num_neurons, mean_activation, activation_std, top_neurons, neuron_diversity (see :func:`analyze_neurons`)."""
        if layer_idx not in neurons:
            raise KeyError(f"layer {layer_idx} is not in these neurons (layers: {sorted(neurons)})")
        result = analyze_neurons(neurons[layer_idx])
        if result["method"] is not None:
            self.analysis.setdefault(result["method"], {})[layer_idx] = result
        return result


def integrate_mamba_attention_neurons(
    model: nn.Module,
    input_ids: Tensor,
    layer_indices: int | Sequence[int] | None = (0,),
    methods: str | Sequence[str] | None = ("attention_weighted",),
    *,
    attention_mask: Tensor | None = None,
    query: int | Sequence[int] | Tensor | None = None,
    store: str = "full",
    max_bytes: int | None = None,
) -> dict:
    """Extract once, run every method, analyse every layer; a failing method does not stop the others.

    Returns ``attention_data`` (AttentionData), ``mamba_neurons`` (method -> {layer: record}),
    ``analysis_results`` (method -> {layer: analyze dict}), ``errors`` (method -> reason) and ``analyzer``
    (the MambaAttentionNeurons, which keeps all of it).  ``methods=None`` means every supported method.
    Input errors (layers, query, ids) and a failed shared extraction are raised, not recorded.
    """
    an = MambaAttentionNeurons(model, store=store, max_bytes=max_bytes)
    arch = an.arch
    wanted = check_methods(None, arch) if methods is None else [methods] if isinstance(methods, str) else list(methods)
    data = extract(model, input_ids, layer_indices, attention_mask, methods=wanted, query=query, store=store,
                   max_bytes=max_bytes, on_error="record")
    an.attention_data = data
    errors: dict[str, str] = dict(data.errors)
    neurons: dict[str, dict[int, dict]] = {}
    analysis: dict[str, dict[int, dict]] = {}
    for method in dict.fromkeys(wanted):
        if method in errors:
            continue
        try:
            recs = an.create_mamba_neurons(data, method)
            analysis[method] = {layer: an.analyze_neuron_behavior(recs, layer) for layer in recs}
            neurons[method] = recs
        except Exception as exc:  # isolation: one method's failure is reported by name, the rest go on
            errors[method] = f"{type(exc).__name__}: {exc}"
            analysis.pop(method, None)
    return {"attention_data": data, "mamba_neurons": neurons, "analysis_results": analysis, "errors": errors,
            "analyzer": an}


def run_attention_analysis(
    model: nn.Module,
    windows: Tensor,
    *,
    layers: int | Sequence[int] | None = None,
    methods: str | Sequence[str] | None = None,
    query: int | None = None,
    faithfulness: bool = True,
    select_windows: Tensor | None = None,
    eval_windows: Tensor | None = None,
    batch_size: int = 8,
    k: int | float = 0.1,
    steps: int = FRACTIONS_DEFAULT_STEPS,
    seed: int = 0,
    random_seeds: int = 3,
    draws: int = 3,
    neuron_windows: int | None = None,
    whole_model: Sequence[str] = (),
    token_windows: int | None = TOKEN_WINDOWS,
) -> dict:
    """JSON-ready attention-neuron summary of ``windows`` [n, T] for the CLI / pipeline.

    Per method and layer: the analyze dict over all windows (activation/importance averaged over rows),
    the full ``activation`` and ``importance`` vectors, and ``relevance_first_window`` [T] (window 0).
    With ``faithfulness``: :func:`~mambascope.attribution.faithfulness.evaluate_faithfulness` on
    ``select_windows``/``eval_windows`` (default: the first/second half of ``windows``, recorded as such)
    and its table rows, with the ``whole_model`` token attributions scored beside the methods on
    ``token_windows`` windows.  Failures are
    reported by name in ``errors`` (a method, or ``"faithfulness"``).
    """
    if not isinstance(windows, Tensor) or windows.dim() != 2 or windows.shape[0] == 0:
        raise ValueError("windows must be a non-empty LongTensor [n, T]")
    arch = architecture(model)
    layers = check_layers(model, layers)
    wanted = check_methods(None, arch) if methods is None else [methods] if isinstance(methods, str) else list(methods)
    errors: dict[str, str] = {}
    sums: dict[str, dict[int, dict[str, Any]]] = {}
    n = 0
    for batch, _, records in method_records(model, windows, layers, wanted, query=query, batch_size=batch_size,
                                            errors=errors):
        for method, recs in records.items():
            for layer, rec in recs.items():
                acc = sums.setdefault(method, {}).get(layer)
                if acc is None:
                    sums[method][layer] = {
                        "method": method, "layer": layer, "unit": rec["unit"],
                        "activation": rec["activation_per_row"].double().sum(0),
                        "importance": rec["importance_per_row"].double().sum(0),
                        "relevance_first_window": rec["relevance"][0],
                    }
                else:
                    acc["activation"] += rec["activation_per_row"].double().sum(0)
                    acc["importance"] += rec["importance_per_row"].double().sum(0)
        n += batch.shape[0]
    per_method: dict[str, dict[str, Any]] = {}
    for method, per in sums.items():
        if method in errors:
            continue
        per_method[method] = {}
        for layer, acc in per.items():
            rec = dict(acc, activation=acc["activation"] / n, importance=acc["importance"] / n)
            per_method[method][str(layer)] = {**analyze_neurons(rec), "activation": rec["activation"],
                                              "importance": rec["importance"],
                                              "relevance_first_window": rec["relevance_first_window"]}
    summary: dict[str, Any] = {
        "arch": arch, "layers": layers, "methods": wanted, "n_windows": n, "window": int(windows.shape[1]),
        "query": "last token of each window" if query is None else int(query),
        "results": per_method, "errors": errors,
    }
    if faithfulness:
        split = "given"
        if select_windows is None and eval_windows is None:
            half = windows.shape[0] // 2
            select_windows, eval_windows = windows[:half], windows[half:]
            split = f"windows[:{half}] select / windows[{half}:] evaluate"
        elif select_windows is None:
            select_windows, split = windows, "select = windows, evaluate = eval_windows"
        elif eval_windows is None:
            errors["faithfulness"] = "select_windows given without eval_windows: no held-out split to test on"
        if "faithfulness" not in errors:
            try:
                faith = evaluate_faithfulness(model, select_windows, eval_windows, layers, wanted, k=k, steps=steps,
                                              seed=seed, random_seeds=random_seeds, draws=draws,
                                              batch_size=batch_size, neuron_windows=neuron_windows,
                                              whole_model=whole_model, token_windows=token_windows)
                summary["faithfulness"] = faith | {"split": split,
                                                   "table": faithfulness_table(faith).to_dict(orient="records")}
            except Exception as exc:
                errors["faithfulness"] = f"{type(exc).__name__}: {exc}"
    return to_jsonable(summary)
