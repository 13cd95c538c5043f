"""One attribution leaderboard against ground truth (docs/methods.md, "The leaderboard").

For one task model and ``n`` held-out queries (one per example, :func:`~mambascope.attribution.ground_truth.
one_query_per_example`), every method gives each query a relevance row over the positions; each row is
ranked over the context 0..q−1 (ties broken by a seeded random permutation, the same for every method) and
scored against the true ``value`` and ``key`` positions (hit@1, MRR, 95 % bootstrap intervals, paired
comparisons with ``random`` and ``recency``), exactly as :func:`~mambascope.attribution.ground_truth.
attribution_accuracy` scores them.  Beside the scores:

* the **knockout effect**: for each query, log p(answer) − log p(answer | the method's top-ranked context
  token knocked out of every later token in every SSM layer (the scan term, ``Knockout``) and every
  attention layer (attention knockout)), :func:`knockout_drop`; mean with its 95 % interval;
* the **time per query**: the method's wall time for all queries (every layer of a per-layer method) / n.

The methods: the attention-neuron methods per layer (:mod:`mambascope.attribution.methods`); the layer maps
of :mod:`mambascope.attribution.layer_maps` per layer and rolled out (``layer_map``/``layer_map_rollout``,
on SSM layers also the ``no_conv`` and ``no_gate`` ablations of the implicit attention); the whole-model
methods of :data:`~mambascope.attribution.input_attribution.WHOLE_MODEL_METHODS`; ``random`` and ``recency``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mambascope.arch import adapter
from mambascope.attribution.bootstrap import bootstrap_mean
from mambascope.attribution.extract import METHODS as NEURON_METHODS
from mambascope.attribution.extract import check_layers, check_method
from mambascope.attribution.faithfulness import context_ranking
from mambascope.attribution.ground_truth import (
    BASELINES,
    SOURCES,
    one_query_per_example,
    paired_difference,
    rank_stats,
    task_settings,
)
from mambascope.attribution.input_attribution import BASELINES as EMBEDDING_BASELINES
from mambascope.attribution.input_attribution import (
    IG_METHOD,
    TOKEN_METHODS,
    WHOLE_MODEL_METHODS,
    Settings,
    unavailable,
)
from mambascope.attribution.layer_maps import layer_maps
from mambascope.attribution.methods import method_records
from mambascope.attribution.token_flipping import DEFAULT_POSITIONS, WINDOW, flipping_faithfulness
from mambascope.data.tasks import TaskBatch, query_correct
from mambascope.interventions.knockout import knockout_edits
from mambascope.ssm.implicit_attention import residual_rollout
from mambascope.trace import trace

DEFAULT_QUERIES = 64
SSM_VARIANTS = ("full", "no_conv", "no_gate")
DEFAULT = Settings()  # IG steps and the IG/occlusion baseline (input_attribution's defaults)
FLIP_SCAN = 4  # windows scanned per ΔA^F position asked for (not every last position is context-dependent)
KINDS = ("baseline", "attention neurons", "layer map", "layer-map rollout", "whole model")

__all__ = ["DEFAULT_QUERIES", "KINDS", "SSM_VARIANTS", "Entry", "TaskQueries", "check_models", "knockout_drop",
           "language_models", "leaderboard_table", "model_task", "not_applicable", "print_leaderboard",
           "run_leaderboard", "score_entries", "task_leaderboard", "task_models", "task_queries"]


@dataclass
class TaskQueries:
    """The scored queries: ``ids`` [n, L] (sorted by query position), ``query``, ``value_pos``, ``key_pos``,
    ``answer`` [n], and the batch they come from."""

    batch: TaskBatch
    ids: Tensor
    query: Tensor
    value_pos: Tensor
    key_pos: Tensor
    answer: Tensor


@dataclass
class Entry:
    """One leaderboard row before scoring: ``relevance`` [n, L] for the queries, ``seconds`` the wall time of
    computing it for all n queries (for a per-layer method: every layer together)."""

    method: str
    layer: int | None
    kind: str
    relevance: Tensor
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


def task_queries(batch: TaskBatch, seed: int) -> TaskQueries:
    """One seeded query per example (as the ground-truth scorer picks them), examples sorted by query position."""
    pick = one_query_per_example(batch, seed)
    order = torch.argsort(pick["query"], stable=True)
    batch = batch.rows(order)
    return TaskQueries(batch, batch.input_ids, *(pick[k][order] for k in ("query", "value_pos", "key_pos", "answer")))


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(s, s + size) for s in range(0, n, size)]


def neuron_entries(model: nn.Module, tq: TaskQueries, errors: dict[str, str], batch_size: int = 64) -> list[Entry]:
    """The attention-neuron methods at every layer (``check_layers``' default), one method at a time (so that
    each has its own time)."""
    layers = check_layers(model, None)
    out = []
    for method in [m for m in NEURON_METHODS if _neuron_reason(model, m) is None]:
        start = time.perf_counter()
        rel: dict[int, list[Tensor]] = {layer: [] for layer in layers}
        for sl in _chunks(tq.ids.shape[0], batch_size):
            part = tq.ids[sl]
            for _, _, records in method_records(model, part, layers, [method], query=tq.query[sl],
                                                batch_size=part.shape[0], errors=errors, target=tq.answer[sl]):
                for layer in layers if method in records else ():
                    rel[layer].append(records[method][layer]["relevance"].detach().double().cpu())
        if method in errors:
            continue
        seconds = time.perf_counter() - start
        out += [Entry(method, layer, "attention neurons", torch.cat(rel[layer]), seconds) for layer in layers]
    return out


def _neuron_reason(model: nn.Module, method: str) -> str | None:
    try:
        check_method(method, adapter(model).model_type)
    except ValueError as exc:
        return str(exc)
    return None


def _variant_name(base: str, variant: str) -> str:
    return base if variant == "full" else f"{base}_{variant}"


def map_entries(model: nn.Module, tq: TaskQueries, errors: dict[str, str], batch_size: int = 64) -> list[Entry]:
    """Layer maps per token-mixing layer (the query's row) and their residual rollout, for every variant that
    applies (the implicit-attention ablations only where every token-mixing layer is an SSM mixer)."""
    ad = adapter(model)
    n = tq.ids.shape[0]
    rows_of = torch.arange(n)
    out = []
    for variant in _map_variants(model):
        start = time.perf_counter()
        maps_all: dict[int, list[Tensor]] = {}
        try:
            for sl in _chunks(n, batch_size):
                for layer, c in layer_maps(model, tq.ids[sl], variant=variant).items():
                    maps_all.setdefault(layer, []).append(c.double().cpu())
        except Exception as exc:  # one failing variant must not stop the others
            errors[_variant_name("layer_map", variant)] = f"{type(exc).__name__}: {exc}"
            continue
        maps_cat = {layer: torch.cat(parts) for layer, parts in maps_all.items()}
        per_layer = {layer: c[rows_of, tq.query] for layer, c in maps_cat.items()}
        map_seconds = time.perf_counter() - start
        start = time.perf_counter()
        rolled = residual_rollout([maps_cat[layer] for layer in sorted(maps_cat)])[rows_of, tq.query]
        roll_seconds = map_seconds + time.perf_counter() - start
        note = {"variant": variant, "map": "attention (Kobayashi norm)" if ad.transformer else
                "implicit attention of the whole mixer (LaTIM norm)"}
        out += [Entry(_variant_name("layer_map", variant), layer, "layer map", rel, map_seconds, note)
                for layer, rel in per_layer.items()]
        out.append(Entry(_variant_name("layer_map_rollout", variant), None, "layer-map rollout", rolled, roll_seconds,
                         note | {"layers": sorted(maps_cat)}))
    return out


def _map_variants(model: nn.Module) -> tuple[str, ...]:
    return ("full",) if adapter(model).transformer else SSM_VARIANTS


def whole_model_entries(model: nn.Module, tq: TaskQueries, errors: dict[str, str], settings: Settings = DEFAULT,
                        methods: Sequence[str] = WHOLE_MODEL_METHODS) -> list[Entry]:
    """Every whole-model method of ``methods`` that the model supports, query by query, for the answer at the
    query (Captum methods and LRP: its logit; knockout: its log-prob)."""
    out = []
    for method in methods:
        reason = unavailable(model, method)
        if reason:
            errors[method] = reason
            continue
        start = time.perf_counter()
        try:
            rows = [TOKEN_METHODS[method](model, tq.ids[i], int(tq.query[i]), int(tq.answer[i]), settings)[0]
                    for i in range(tq.ids.shape[0])]
        except Exception as exc:  # one failing method must not stop the others
            errors[method] = f"{type(exc).__name__}: {exc}"
            continue
        seconds = time.perf_counter() - start
        out.append(Entry(method, None, "whole model", torch.stack([r.relevance for r in rows]), seconds,
                         _whole_details(method, rows, settings)))
    return out


def _whole_details(method: str, rows: list, settings: Settings) -> dict[str, Any]:
    if method == "integrated_gradients":
        delta = torch.tensor([r.details["convergence_delta"] for r in rows], dtype=torch.float64).abs()
        gap = torch.tensor([r.details["f_input_minus_f_baseline"] for r in rows], dtype=torch.float64).abs()
        return {"baseline": EMBEDDING_BASELINES[settings.baseline], "n_steps": settings.ig_steps,
                "integration": IG_METHOD, "convergence_delta_abs_mean": float(delta.mean()),
                "convergence_delta_abs_max": float(delta.max()), "f_input_minus_f_baseline_abs_mean": float(gap.mean())}
    if method == "occlusion":
        return {"baseline": EMBEDDING_BASELINES[settings.baseline], "window": "1 token"}
    if method == "lrp":
        remainder = torch.tensor([r.details["remainder"] for r in rows], dtype=torch.float64).abs()
        return {"rules": rows[0].details["rules"], "remainder_abs_mean": float(remainder.mean())}
    if method == "knockout":
        return {"scope": rows[0].details["scope"]}
    return {}


def baseline_entries(tq: TaskQueries, seed: int) -> list[Entry]:
    """``random`` (seeded uniform relevance) and ``recency`` (relevance = position: most recent first)."""
    n, L = tq.ids.shape
    rand = torch.rand(n, L, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    recency = torch.arange(L, dtype=torch.float64).expand(n, L).clone()
    return [Entry("random", None, "baseline", rand, 0.0), Entry("recency", None, "baseline", recency, 0.0)]


def knockout_drop(model: nn.Module, ids: Tensor, query: Tensor, answer: Tensor, source: Tensor,
                  batch_size: int = 32) -> Tensor:
    """[n] log p(answer_i) − log p(answer_i | source_i knocked out of every later token in every SSM and attention
    layer) at query_i of sequence ids[i] (float64).  The clean and the knocked-out copy of each sequence run in
    the same forward (rows of one batch round alike), so a knockout that changes nothing gives 0."""
    out = []
    dev = model.get_input_embeddings().weight.device
    for sl in _chunks(ids.shape[0], batch_size):
        part = ids[sl].to(dev)
        m = part.shape[0]
        edits = knockout_edits(model, [None] * m + [int(s) for s in source[sl]])
        with torch.no_grad():
            logits = trace(model, torch.cat([part, part]), names=[], edits=edits).logits
        rows = torch.arange(m, device=dev)
        q, a = query[sl].to(dev), answer[sl].to(dev)
        logp = torch.log_softmax(logits.double(), dim=-1)
        out.append((logp[rows, q, a] - logp[rows + m, q, a]).cpu())
    return torch.cat(out)


def score_entries(model: nn.Module, tq: TaskQueries, entries: Sequence[Entry], errors: dict[str, str],
                  seed: int = 0) -> list[dict[str, Any]]:
    """One JSON-ready row per entry: value and key hit@1 / MRR with intervals, the paired comparisons with the
    ``random`` and ``recency`` entries, the knockout effect of the top-ranked token and the time per query."""
    n, L = tq.ids.shape
    context = torch.arange(L)[None, :] < tq.query[:, None]
    sources = {"value": tq.value_pos, "key": tq.key_pos}
    scored: list[tuple[Entry, dict[str, dict], Tensor]] = []
    for e in entries:
        name = e.method if e.layer is None else f"{e.method} at layer {e.layer}"
        try:  # every method gets the same tie-break permutation
            order = context_ranking(e.relevance, context, torch.Generator().manual_seed(seed + 17), name)
        except ValueError as exc:  # reported by name; the row is left out
            errors[name] = str(exc)
            continue
        stats = {s: rank_stats((order == src[:, None]).long().argmax(1) + 1, seed) for s, src in sources.items()}
        scored.append((e, stats, order[:, 0]))
    base = {e.method: stats for e, stats, _ in scored if e.kind == "baseline"}
    rows = []
    for e, stats, top in scored:
        row: dict[str, Any] = {"method": e.method, "layer": e.layer, "kind": e.kind}
        for s in SOURCES:
            row[s] = {"hit_rate": stats[s]["hit_rate"], "mrr": stats[s]["mrr"]}
            for b in BASELINES:
                if b in base and b != e.method:
                    d = paired_difference(stats[s], base[b][s], seed + 2)
                    row[s][f"vs_{b}"] = d
                    row[s][f"beats_{b}"] = {k: v["low"] is not None and v["low"] > 0 for k, v in d.items()}
        drop = knockout_drop(model, tq.ids, tq.query, tq.answer, top)
        row["knockout_effect"] = bootstrap_mean(drop.numpy(), seed=seed + 3)
        row["top_is_value"] = float((top == tq.value_pos).double().mean())
        row["seconds_per_query"] = e.seconds / n
        rows.append(row | ({"details": e.details} if e.details else {}))
    return rows


def not_applicable(model: nn.Module) -> dict[str, str]:
    """The leaderboard methods that do not apply to ``model``, with the reason."""
    out = {m: r for m in NEURON_METHODS if (r := _neuron_reason(model, m))}
    if adapter(model).transformer:
        for variant in SSM_VARIANTS[1:]:
            for base in ("layer_map", "layer_map_rollout"):
                out[_variant_name(base, variant)] = (f"an ablation of the SSM mixer's implicit attention ({variant}): "
                                                     "attention layers have no conv and no gate")
    return out


def task_leaderboard(model: nn.Module, batch: TaskBatch, *, seed: int = 0, settings: Settings = DEFAULT,
                     whole_model: bool = True, batch_size: int = 64,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The leaderboard of one task model on the held-out ``batch`` (one query per example scored).

    Returns a JSON-ready dict: ``n_queries``, ``task_accuracy`` (argmax at every query of the scored examples,
    the model's own forward), ``settings``, ``rows`` (:func:`score_entries`), ``knockout_reference`` (the
    knockout effect of the true value and key positions: what the effect of a perfect ranking would be),
    ``not_applicable`` and ``errors`` (method -> reason)."""
    say = progress or (lambda _msg: None)
    tq = task_queries(batch, seed)
    errors: dict[str, str] = {}
    start = time.perf_counter()
    entries = baseline_entries(tq, seed)
    say("attention-neuron methods")
    entries += neuron_entries(model, tq, errors, batch_size)
    say("layer maps and rollout")
    entries += map_entries(model, tq, errors, batch_size)
    if whole_model:
        say("whole-model methods")
        entries += whole_model_entries(model, tq, errors, settings)
    say("scoring and knockout effects")
    rows = score_entries(model, tq, entries, errors, seed)
    reference = {s: bootstrap_mean(knockout_drop(model, tq.ids, tq.query, tq.answer, pos).numpy(), seed=seed + 3)
                 for s, pos in (("value", tq.value_pos), ("key", tq.key_pos))}
    dev = model.get_input_embeddings().weight.device
    with torch.no_grad():
        correct = query_correct(model(input_ids=tq.ids.to(dev)).logits, tq.batch)
    ad = adapter(model)
    return {"arch": ad.model_type, "task": batch.task, "seq_len": int(tq.ids.shape[1]),
            "n_queries": int(tq.ids.shape[0]), "seed": seed, "task_accuracy": float(correct.double().mean()),
            "task_accuracy_queries": int(correct.numel()),
            "settings": {"ig_steps": settings.ig_steps, "ig_integration": IG_METHOD,
                         "baseline": EMBEDDING_BASELINES[settings.baseline],
                         "rank_among": "context positions 0..q-1; ties broken by one seeded permutation",
                         "interval": "95% percentile bootstrap over queries (2000 resamples)",
                         "knockout": "the top-ranked context token knocked out of every later token in every SSM "
                                     "layer (scan term) and attention layer (attention knockout); effect = drop in "
                                     "the answer's log-prob at the query",
                         "time": "wall seconds per query; per-layer methods: all layers together"},
            "rows": rows, "knockout_reference": reference, "not_applicable": not_applicable(model),
            "errors": errors, "seconds": round(time.perf_counter() - start, 3)}


def leaderboard_table(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat rows (model, method, layer, kind, each measure's mean and bounds, the verdicts) for tables."""
    flat = []
    for name, result in board.get("models", {}).items():
        for r in result["rows"]:
            row = {"model": name, "method": r["method"], "layer": r["layer"], "kind": r["kind"]}
            for s in SOURCES:
                for metric in ("hit_rate", "mrr"):
                    iv = r[s][metric]
                    row |= {f"{s}_{metric}": iv["mean"], f"{s}_{metric}_low": iv["low"],
                            f"{s}_{metric}_high": iv["high"]}
                    for b in BASELINES:
                        if f"beats_{b}" in r[s]:
                            row[f"{s}_{metric}_beats_{b}"] = r[s][f"beats_{b}"][metric]
            ko = r["knockout_effect"]
            row |= {"knockout_effect": ko["mean"], "knockout_effect_low": ko["low"], "knockout_effect_high": ko["high"],
                    "seconds_per_query": r["seconds_per_query"]}
            flat.append(row)
    return flat


def model_task(name: str) -> tuple[nn.Module, dict[str, Any]]:
    """(model, task settings) of a leaderboard model: a bundled task model, the hand-wired Mamba-1 recall model
    (:data:`mambascope.models.handwired.NAME`) or a local task-model directory (its ``training.json``)."""
    from mambascope.models import BUNDLED, bundled_path, handwired, load_model

    if name == handwired.NAME:
        return handwired.handwired_mamba_recall(), dict(handwired.TASK)
    settings = task_settings(bundled_path(name) if name in BUNDLED else Path(name))
    return load_model(name)[0], settings


def task_models() -> list[str]:
    """Every bundled model whose ``training.json`` records a task, then the hand-wired model: the default
    leaderboard (a task model bundled later joins it with no change here)."""
    from mambascope.models import BUNDLED, bundled_path, handwired

    out = []
    for name in BUNDLED:
        try:
            task_settings(bundled_path(name))
        except ValueError:
            continue
        out.append(name)
    return [*out, handwired.NAME]



def language_models() -> list[str]:
    """The bundled language models (no task in their ``training.json``): where ΔA^F is measured."""
    from mambascope.models import BUNDLED, bundled_path

    out = []
    for name in BUNDLED:
        try:
            task_settings(bundled_path(name))
        except ValueError:
            out.append(name)
    return out


def lm_windows(tokenizer: Any, window: int, n: int) -> Tensor:
    """Up to ``n`` windows of ``window`` tokens from the built-in corpus's validation split."""
    from mambascope.data.corpus import builtin_texts, split_texts
    from mambascope.data.windows import tokenize_windows

    return tokenize_windows(split_texts(builtin_texts(), "validation"), tokenizer, window, max_tokens=window * n).ids


def check_models(models: Sequence[str], lm_models: Sequence[str]) -> None:
    """ValueError naming the first model that is not a leaderboard task model or a bundled language model."""
    tasks, lms = task_models(), language_models()
    for name in models:
        if name not in tasks and not (Path(name) / "training.json").is_file():
            raise ValueError(f"--models {name!r}: not a task model; choose from {', '.join(tasks)} or a local "
                             "directory with a training.json naming its task")
    for name in lm_models:
        if name not in lms:
            raise ValueError(f"--lm-models {name!r}: not a bundled language model; choose from {', '.join(lms)}")


def run_leaderboard(models: Sequence[str], lm_models: Sequence[str], *, n_queries: int = DEFAULT_QUERIES,
                    n_positions: int = DEFAULT_POSITIONS, seed: int = 0, settings: Settings = DEFAULT,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The ``leaderboard`` section of results.json: :func:`task_leaderboard` of every task model in ``models``
    on ``n_queries`` held-out queries, and ΔA^F (:func:`~mambascope.attribution.token_flipping.
    flipping_faithfulness`) of every language model in ``lm_models`` at ``n_positions`` context-dependent
    positions.  A model that fails is recorded in ``errors`` by name with its reason."""
    from mambascope.models import load_model
    from mambascope.models.train_task import heldout_task_batch

    if n_queries < 2:
        raise ValueError(f"n_queries must be at least 2 for a bootstrap interval, got {n_queries}")
    say = progress or (lambda _msg: None)
    board: dict[str, Any] = {"models": {}, "flipping": {}, "errors": {}, "timings": {}}
    for name in models:
        start = time.perf_counter()
        try:
            model, task = model_task(name)
            batch = heldout_task_batch(task["task"], n_queries, task["seq_len"], task["num_pairs"], task["seed"])
            result = task_leaderboard(model, batch, seed=seed, settings=settings,
                                      progress=lambda msg, name=name: say(f"{name}: {msg}"))
        except Exception as exc:  # one failing model must not stop the others
            board["errors"][name] = f"{type(exc).__name__}: {exc}"
            continue
        board["models"][name] = result | {"num_pairs": task["num_pairs"] if task["task"] == "mqar" else None,
                                          "heldout_seed": task["seed"] * 1_000_000 - 1}
        board["timings"][name] = round(time.perf_counter() - start, 3)
    for name in lm_models:
        start = time.perf_counter()
        say(f"{name}: ΔA^F")
        try:
            model, tokenizer = load_model(name)
            windows = lm_windows(tokenizer, WINDOW, FLIP_SCAN * n_positions)
            board["flipping"][name] = flipping_faithfulness(model, windows, n_positions=n_positions,
                                                            settings=settings, seed=seed)
        except Exception as exc:
            board["errors"][f"{name} (ΔA^F)"] = f"{type(exc).__name__}: {exc}"
            continue
        board["timings"][f"{name} (ΔA^F)"] = round(time.perf_counter() - start, 3)
    board["table"] = leaderboard_table(board)
    return board


def _iv(entry: dict[str, Any]) -> str:
    low, high = entry.get("low"), entry.get("high")
    bounds = "" if low is None else f" [{low:.3f}, {high:.3f}]"
    return f"{entry['mean']:.3f}{bounds}"


def print_leaderboard(board: dict[str, Any], file: Any = None) -> None:
    """The leaderboard in plain text: per model, each row's value and key hit@1 / MRR, knockout effect, time."""
    lines = []
    for name, result in board["models"].items():
        lines.append(f"{name} ({result['arch']}, task {result['task']}): accuracy {result['task_accuracy']:.4f}; "
                     f"{result['n_queries']} queries; knockout effect of the true value "
                     f"{_iv(result['knockout_reference']['value'])}")
        for r in result["rows"]:
            layer = "-" if r["layer"] is None else r["layer"]
            marks = "".join(m for b, m in (("random", "R"), ("recency", "C"))
                            if (r["value"].get(f"beats_{b}") or {}).get("mrr"))
            lines.append(f"  {r['method']:<26} {layer!s:>2}  value hit {_iv(r['value']['hit_rate'])} MRR "
                         f"{_iv(r['value']['mrr'])} {marks:<2}  key hit {r['key']['hit_rate']['mean']:.3f}  "
                         f"knockout {_iv(r['knockout_effect'])}  {r['seconds_per_query'] * 1000:.1f} ms/query")
        for method, reason in result["errors"].items():
            lines.append(f"  FAILED {method}: {reason}")
    for name, result in board["flipping"].items():
        lines.append(f"{name}: ΔA^F at {result['n_positions']} context-dependent positions")
        for r in result["rows"]:
            lines.append(f"  {r['method']:<22} {r['metric']:<8} ΔA^F {_iv(r['delta_a_f'])}")
    for name, reason in board["errors"].items():
        lines.append(f"FAILED {name}: {reason}")
    print("\n".join(lines), file=file)
