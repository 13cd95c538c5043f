"""Attribution accuracy against ground truth on the synthetic tasks (docs/methods.md, "Ground truth").

Each held-out example of :func:`mambascope.data.tasks.generate` contributes one query q (chosen by the
seeded generator, so queries are independent items for the bootstrap).  Every method's relevance at q
(layer by layer, :func:`~mambascope.attribution.methods.method_records`) ranks the context positions
0..q−1, ties broken by a seeded random permutation (:func:`~mambascope.attribution.faithfulness.token_ranking`).
For the true source position s (``value``: the token to recall; ``key``: the matching key) the rank r(s)
gives top-1 hit = [r(s) = 1] and reciprocal rank 1/r(s); their means over queries are the hit rate and
the mean reciprocal rank (MRR), with 95 % percentile-bootstrap intervals.

Baselines: ``random`` (a seeded uniformly random ranking per query; its expected hit rate is mean 1/q and
its expected MRR mean H_q/q, recorded beside it) and ``recency`` (the most recent position first, r(s) =
q − s).  A method beats a baseline significantly when the bootstrap interval of the paired per-query
difference of its MRR (and, separately, of its hit rate) lies above 0.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mambascope.attribution.bootstrap import bootstrap_mean
from mambascope.attribution.extract import check_layers, check_methods
from mambascope.attribution.faithfulness import context_ranking
from mambascope.attribution.input_attribution import batch_relevance
from mambascope.attribution.methods import method_records
from mambascope.data.tasks import TaskBatch, query_correct
from mambascope.results import to_jsonable
from mambascope.trace import architecture

SOURCES = ("value", "key")
BASELINES = ("random", "recency")

__all__ = ["BASELINES", "SOURCES", "attribution_accuracy", "check_whole_model", "ground_truth_table",
           "one_query_per_example", "paired_difference", "rank_stats", "run_ground_truth", "source_ranks",
           "task_settings"]


def one_query_per_example(batch: TaskBatch, seed: int) -> dict[str, Tensor]:
    """One seeded query per example: ``query``, ``key_pos``, ``value_pos``, ``answer`` [n]."""
    n, Q = batch.query.shape
    pick = torch.randint(0, Q, (n,), generator=torch.Generator().manual_seed(seed))[:, None]
    return {k: getattr(batch, k).gather(1, pick)[:, 0] for k in ("query", "key_pos", "value_pos", "answer")}


def source_ranks(relevance: Tensor, query: Tensor, source: Tensor, generator: torch.Generator,
                 method: str = "relevance") -> Tensor:
    """[b] rank (1 = first) of ``source`` among the context positions 0..query−1 ordered by ``relevance`` [b, L].

    Positions at or after the query are placed last (−inf); ties among the context are broken by
    ``token_ranking``'s seeded random permutation.  Non-finite relevance on the context is refused
    (ValueError naming ``method``).
    """
    L = relevance.shape[1]
    context = torch.arange(L, device=relevance.device)[None, :] < query[:, None]
    if not bool((source < query).all()) or not bool((source >= 0).all()):
        raise ValueError("every source position must lie in the context 0..query-1")
    order = context_ranking(relevance, context, generator, method)
    return (order == source[:, None].to(order.device)).long().argmax(1) + 1


def rank_stats(ranks: Tensor, seed: int) -> dict:
    """Hit rate and MRR of ``ranks`` [n] with bootstrap intervals; ``_hit``, ``_rr`` keep the per-query values
    for :func:`paired_difference`."""
    hit, rr = (ranks == 1).double(), 1.0 / ranks.double()
    return {"hit_rate": bootstrap_mean(hit.numpy(), seed=seed), "mrr": bootstrap_mean(rr.numpy(), seed=seed + 1),
            "_hit": hit, "_rr": rr}


def paired_difference(a: dict, b: dict, seed: int) -> dict:
    """The paired bootstrap of a − b per query, for hit rate and MRR (two :func:`rank_stats`)."""
    return {"hit_rate": bootstrap_mean((a["_hit"] - b["_hit"]).numpy(), seed=seed),
            "mrr": bootstrap_mean((a["_rr"] - b["_rr"]).numpy(), seed=seed + 1)}


def attribution_accuracy(model: nn.Module, batch: TaskBatch, layers: int | Sequence[int] | None = None,
                         methods: Sequence[str] | None = None, *, seed: int = 0, batch_size: int = 64,
                         whole_model: Sequence[str] = ()) -> dict:
    """Hit rate and MRR of every method and baseline at every layer against ``batch``'s ground truth.

    ``batch``: held-out task examples (one query each is scored, see the module docstring).
    ``whole_model``: methods of :data:`~mambascope.attribution.input_attribution.TOKEN_METHODS` with one row
    of relevance per prediction (``gradient_x_input``, ``integrated_gradients``, ``occlusion``, ``knockout``),
    run query by query for log p(answer) at the query, scored as whole-model rows.  Returns a JSON-ready
    dict: ``n_queries``, ``task_accuracy`` (argmax at the scored queries, from the extraction's own forward),
    ``rows`` (one per source × method × layer; baselines and whole-model methods have ``layer`` None) and
    ``errors`` (method -> reason).
    """
    arch = architecture(model)
    layers = check_layers(model, layers)
    wanted = check_methods(methods, arch)
    whole = check_whole_model(whole_model)
    pick = one_query_per_example(batch, seed)
    # Examples sorted by query position: a batch then shares few query rows of the hidden attention.
    order = torch.argsort(pick["query"], stable=True)
    batch, pick = batch.rows(order), {k: v[order] for k, v in pick.items()}
    errors: dict[str, str] = {}
    rel: dict[str, dict[int, list[Tensor]]] = {}
    correct: list[Tensor] = []
    for start in range(0, batch.input_ids.shape[0], batch_size):  # batches of examples
        sl = slice(start, start + batch_size)
        rows = batch.input_ids[sl]
        records_iter = method_records(model, rows, layers, wanted, query=pick["query"][sl], batch_size=rows.shape[0],
                                      errors=errors, target=pick["answer"][sl])
        correct.append(_correct(model, batch.rows(sl)))
        for _, _, records in records_iter:
            for method, recs in records.items():
                for layer in layers:
                    rel.setdefault(method, {}).setdefault(layer, []).append(recs[layer]["relevance"].cpu())
    query = pick["query"]
    n, L = batch.input_ids.shape
    for method in whole:
        try:
            rel[method] = {None: [batch_relevance(model, batch.input_ids, query, pick["answer"], method)]}
        except Exception as exc:  # one failing method must not stop the others
            errors[method] = f"{type(exc).__name__}: {exc}"
    gen = torch.Generator().manual_seed(seed + 17)
    rows_out: list[dict] = []
    for source in SOURCES:
        src = pick[f"{source}_pos"]
        base = {"random": rank_stats(source_ranks(torch.rand(n, L, generator=gen), query, src, gen), seed),
                "recency": rank_stats(query - src, seed)}
        rows_out.append(_row(source, "random", None, base["random"]) | {"expected": _random_expectation(query)})
        rows_out.append(_row(source, "recency", None, base["recency"]))
        for method in [m for m in [*wanted, *whole] if m in rel and m not in errors]:
            try:
                ranks = {layer: source_ranks(torch.cat(rel[method][layer]), query, src, gen,
                                             method if layer is None else f"{method} at layer {layer}")
                         for layer in rel[method]}
            except ValueError as exc:  # reported by name; its rows are left out (also of the other sources)
                errors[method] = str(exc)
                rows_out = [r for r in rows_out if r["method"] != method]
                continue
            for layer in rel[method]:
                st = rank_stats(ranks[layer], seed)
                row = _row(source, method, layer, st)
                for bname, bst in base.items():
                    d = paired_difference(st, bst, seed + 2)
                    row[f"vs_{bname}"] = {k: {kk: v[kk] for kk in ("mean", "low", "high")} for k, v in d.items()}
                    row[f"beats_{bname}"] = {k: v["low"] is not None and v["low"] > 0 for k, v in d.items()}
                rows_out.append(row)
    return {"arch": arch, "task": batch.task, "layers": layers, "methods": wanted, "whole_model_methods": whole,
            "n_queries": n,
            "seq_len": L, "queries_per_example_scored": 1, "seed": seed,
            "task_accuracy": float(torch.cat(correct).double().mean()),
            "task_accuracy_queries": int(torch.cat(correct).numel()),
            "rank_among": "context positions 0..q-1 (q = the query key, where the answer is predicted)",
            "interval": "95% percentile bootstrap over queries (2000 resamples)",
            "rows": rows_out, "errors": errors}


def check_whole_model(methods: Sequence[str]) -> list[str]:
    """The whole-model methods asked for, validated: one row per prediction, no per-layer methods."""
    from mambascope.attribution.input_attribution import WHOLE_MODEL_METHODS

    bad = [m for m in methods if m not in WHOLE_MODEL_METHODS]
    if bad:
        raise ValueError(f"unknown whole-model method {bad[0]!r}; choose from {', '.join(WHOLE_MODEL_METHODS)}")
    return list(dict.fromkeys(methods))


def _correct(model: nn.Module, part: TaskBatch) -> Tensor:
    """[n, Q] whether the model's own forward predicts every query's answer (argmax)."""
    dev = model.get_input_embeddings().weight.device
    with torch.no_grad():
        return query_correct(model(input_ids=part.input_ids.to(dev)).logits, part)


def _random_expectation(query: Tensor) -> dict[str, float]:
    """Exact expectation of a uniformly random ranking of q positions: hit 1/q, MRR H_q/q (mean over queries)."""
    harmonic = torch.cumsum(1.0 / torch.arange(1, int(query.max()) + 1, dtype=torch.float64), 0)
    q = query.long()
    return {"hit_rate": float((1.0 / q.double()).mean()), "mrr": float((harmonic[q - 1] / q.double()).mean())}


def _row(source: str, method: str, layer: int | None, st: dict) -> dict:
    return {"source": source, "method": method, "layer": layer, "hit_rate": st["hit_rate"], "mrr": st["mrr"]}


def ground_truth_table(result: dict):
    """Flat ``pandas`` view: one row per source, method and layer, with interval bounds and verdicts."""
    import pandas as pd

    flat = []
    for r in result["rows"]:
        row = {"source": r["source"], "method": r["method"], "layer": r["layer"]}
        for metric in ("hit_rate", "mrr"):
            row |= {metric: r[metric]["mean"], f"{metric}_low": r[metric]["low"], f"{metric}_high": r[metric]["high"]}
        for b in BASELINES:
            if f"beats_{b}" in r:
                row[f"mrr_beats_{b}"] = r[f"beats_{b}"]["mrr"]
                row[f"hit_beats_{b}"] = r[f"beats_{b}"]["hit_rate"]
        flat.append(row)
    return pd.DataFrame(flat)


def task_settings(model_dir: str | Path) -> dict:
    """The task a checkpoint was trained on, from its ``training.json`` (written by ``train_task``):
    ``task``, ``seq_len``, ``num_pairs``, ``seed``.  ValueError when the checkpoint records no task."""
    path = Path(model_dir) / "training.json"
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{model_dir} has no training.json: it records no task to evaluate on") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(stats, dict) or "task" not in stats:
        raise ValueError(f"{path} records no task: the model was not trained with `train-tiny --task`")
    return {"task": stats["task"], "seq_len": int(stats["seq_len"]), "num_pairs": int(stats.get("num_pairs") or 8),
            "seed": int(stats.get("seed", 0))}


def run_ground_truth(model: nn.Module, settings: dict, *, n_queries: int = 512,
                     layers: int | Sequence[int] | None = None, methods: Sequence[str] | None = None,
                     seed: int = 0, batch_size: int = 64, whole_model: Sequence[str] = ()) -> dict:
    """:func:`attribution_accuracy` on ``n_queries`` held-out examples of the task in ``settings``
    (:func:`task_settings`): the examples the training run held out (seed·10⁶ − 1), never trained on."""
    from mambascope.models.train_task import heldout_task_batch

    if n_queries < 2:
        raise ValueError(f"n_queries must be at least 2 for a bootstrap interval, got {n_queries}")
    batch = heldout_task_batch(settings["task"], n_queries, settings["seq_len"], settings["num_pairs"],
                               settings["seed"])
    out = attribution_accuracy(model, batch, layers, methods, seed=seed, batch_size=batch_size,
                               whole_model=whole_model)
    return out | {"num_pairs": settings["num_pairs"] if settings["task"] == "mqar" else None,
                  "heldout_seed": settings["seed"] * 1_000_000 - 1,
                  "table": to_jsonable(ground_truth_table(out).to_dict(orient="records"))}


def print_ground_truth(result: dict, file: Any = None) -> None:
    """The table in plain text: hit rate and MRR with their intervals, and the verdicts against the baselines."""
    lines = [f"task {result['task']}: model accuracy {result['task_accuracy']:.4f} on "
             f"{result['task_accuracy_queries']} held-out queries; {result['n_queries']} queries scored, ranked among "
             f"{result['rank_among']}; {result['interval']}"]
    for r in result["rows"]:
        layer = "-" if r["layer"] is None else r["layer"]
        verdict = " ".join(f"{'>' if r[f'beats_{b}']['mrr'] else '~'}{b}" for b in BASELINES if f"beats_{b}" in r)
        h, m = r["hit_rate"], r["mrr"]
        lines.append(f"  {r['source']:<5} {r['method']:<18} layer {layer!s:>2}: hit {h['mean']:.3f} "
                     f"[{h['low']:.3f}, {h['high']:.3f}]  MRR {m['mean']:.3f} [{m['low']:.3f}, {m['high']:.3f}]  "
                     f"{verdict}")
    for method, reason in result["errors"].items():
        lines.append(f"FAILED {method}: {reason}")
    print("\n".join(lines), file=file)
