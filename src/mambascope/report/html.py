"""The single-file HTML report of a results dict (docs/design.md §8): ``report.html``.

One self-contained file (inline CSS and JavaScript, figures embedded as base64 PNG, no network): a
summary of the model and corpus, a section per analysis with its figures and tables, the errors, and
**neuron pages** rendered in the browser from a compact JSON of the per-neuron data (statistics,
top-activating contexts shaded by activation, direct logit effects, hidden-attention row), reached by a
search box ("L2 N37", "2:37") or the URL hash ``#neuron-<layer>-<neuron>``.

Every string that comes from the results (token strings from the corpus included) is escaped on the
server side with :func:`html.escape`, and set with ``textContent`` on the client side.  A section whose
analysis is absent or failed says so with the recorded reason; no number is ever a placeholder.

Size: per-neuron floats are rounded to 4 significant digits; the activation arrays of the contexts, the
logit effects and the attention rows are int16 relative to each neuron's largest |value| (base64), and
the context tokens are stored once per corpus window they come from, so a report of 24 layers × 1536
neurons stays in the tens of megabytes.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mambascope.report import _access as acc
from mambascope.report._static import CSS, JS
from mambascope.report.figures import GROUP_LABELS, create_comprehensive_report
from mambascope.report.neuron_payload import neuron_data, r4
from mambascope.report.patching_plots import PATCHING_FIGURES, UNIT_STYLE, top_cells

__all__ = ["SECTIONS", "render_report"]

SECTIONS: dict[str, str] = {
    "summary": "Summary",
    "census-dead": "Dead & rarely active",
    "census-positional": "Positional",
    "census-detectors": "Token detectors",
    "census-delta": "Δ-sensitive",
    "census-overlap": "Overlap",
    "ablation": "Ablation",
    "pruning": "Pruning",
    "attention-neurons": "Attention neurons",
    "faithfulness": "Faithfulness",
    "ground-truth": "Ground truth",
    "patching": "Patching",
    "neurons": "Neuron pages",
    "errors": "Errors",
}
"""Section anchors of the report and their headings, in page order."""

_FIGURE_SECTION = {
    "dead_neurons": "census-dead", "dead_sensitivity": "census-dead",
    "positional_mi": "census-positional", "positional_frequency": "census-positional",
    "token_detectors": "census-detectors", "ngram_coverage": "census-detectors",
    "delta_selectivity": "census-delta", "overlap": "census-overlap",
    "ablation": "ablation", "pruning": "pruning",
    "attention_diversity": "attention-neurons", "hidden_attention": "attention-neurons",
    "attention_neurons": "attention-neurons",
    "faithfulness_curves": "faithfulness", "faithfulness_neurons": "faithfulness",
    "ground_truth": "ground-truth",
    "patching": "patching", **dict.fromkeys(PATCHING_FIGURES, "patching"),
}

MAX_LIST = 200  # neuron links listed inline per layer and group before "… and N more"
MAX_DETECTOR_ROWS = 300  # detector rows per layer in the static table (every one is on its neuron page)


# ---------------------------------------------------------------------------------------- small helpers

class _Raw(str):
    """Already-escaped HTML."""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _visible(token: str) -> str:
    """A token with its invisible characters shown (newline ↵, tab ⇥, CR ␍; empty ∅)."""
    if token == "":
        return "∅"
    return token.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")


def _tok(token: Any) -> _Raw:
    """A token chip: invisible characters shown, spaces as middle dots, the exact string as tooltip."""
    text = str(token)
    return _Raw(f'<code class="tok" title="{_e(json.dumps(text))}">{_e(_visible(text).replace(" ", "·"))}</code>')


def _nlink(layer: int | str, neuron: int, text: str | None = None) -> _Raw:
    return _Raw(f'<a href="#neuron-{int(layer)}-{int(neuron)}">{_e(text or f"L{layer} N{neuron}")}</a>')


def _cell(value: Any) -> str:
    if isinstance(value, _Raw):
        return value
    if isinstance(value, bool) or value is None or isinstance(value, int | float):
        return _e(acc.fmt(value))
    return _e(value)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for r in rows:
        cells = []
        for v in r:
            numeric = isinstance(v, int | float) and not isinstance(v, bool)
            cells.append(f'<td class="num">{_cell(v)}</td>' if numeric else f"<td>{_cell(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _kv(mapping: Mapping[str, Any] | None) -> str:
    if not mapping:
        return '<p class="muted">not recorded</p>'
    rows = [(k, v) for k, v in mapping.items() if not isinstance(v, dict | list)]
    rows += [(k, json.dumps(v)[:300]) for k, v in mapping.items() if isinstance(v, list) and len(v) <= 20]
    return _table(["key", "value"], rows, "kv")


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _error(text: str) -> str:
    return f'<div class="error">{_e(text)}</div>'


def _layer_label(layer: int, r: Mapping[str, Any]) -> str:
    """The layer's index with its kind (``mamba2``, ``mlp``, ...) as the census recorded it."""
    kind = r.get("layer_kind")
    return f"{layer} ({kind})" if kind else str(layer)


def _links(layer: int, neurons: Sequence[int]) -> _Raw:
    shown = [_nlink(layer, n, str(n)) for n in list(neurons)[:MAX_LIST]]
    more = f" … and {len(neurons) - MAX_LIST} more" if len(neurons) > MAX_LIST else ""
    return _Raw(", ".join(shown) + _e(more)) if shown else _Raw('<span class="muted">none</span>')


def _script_json(data: Any) -> str:
    """JSON safe inside <script>: ASCII only, and no "<", ">" or "&" (escaped as \\u003c …)."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# ---------------------------------------------------------------------------------------- sections

def _figures_html(section: str, figures: list[Path], skipped: dict[str, str]) -> str:
    parts = []
    for path in figures:
        stem = path.stem
        base = "attention_neurons" if stem.startswith("attention_neurons_L") else stem
        if _FIGURE_SECTION.get(base, "other") != section:
            continue
        try:
            data = base64.b64encode(path.read_bytes()).decode("ascii")
        except OSError as exc:
            parts.append(_note(f"figure {path.name} could not be read: {exc}"))
            continue
        parts.append(f'<figure><img alt="{_e(stem)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{_e(path.name)}</figcaption></figure>")
    for name, reason in skipped.items():
        if _FIGURE_SECTION.get(name, "other") == section:
            parts.append(_note(f"Figure '{name}' not drawn: {reason}"))
    return "".join(parts)


def _section(sid: str, body: str, figures: list[Path], skipped: dict[str, str]) -> str:
    return (f'<section id="{sid}"><h2>{_e(SECTIONS[sid])}</h2>{_figures_html(sid, figures, skipped)}'
            f"{body}</section>")


def _no_census(results: Mapping[str, Any]) -> str:
    return _missing(results, "census", "Neuron census")


def _missing(results: Mapping[str, Any], analysis: str, label: str) -> str:
    reason = acc.missing_reason(results, analysis)
    return (_error if reason.startswith("failed") else _note)(f"{label}: {reason}")


def _summary(results: Mapping[str, Any]) -> str:
    census = acc.census_part(results)
    layers = acc.layer_items(results)
    parts = ['<div class="tables"><div><h3>Model</h3>', _kv(results.get("model")), "</div>",
             "<div><h3>Corpus</h3>", _kv(results.get("corpus")), "</div>"]
    rows = []
    tokens = census.get("tokens")
    if isinstance(tokens, dict):
        rows += [(f"tokens ({k})", v) for k, v in tokens.items()]
    elif tokens is not None:
        rows.append(("tokens analysed (selection windows)", tokens))
    for key in ("loss", "selection_loss"):
        loss = acc.num(census.get(key))
        if loss is not None:
            rows.append(("next-token loss on the selection windows (nats/token)", loss))
            rows.append(("perplexity on the selection windows", math.exp(loss)))
    ab = acc.part(results, "ablation")
    if ab and acc.num(ab.get("baseline_loss")) is not None:
        rows.append(("held-out loss (nats/token)", ab["baseline_loss"]))
        rows.append(("held-out perplexity", math.exp(ab["baseline_loss"])))
        rows.append(("held-out tokens predicted", ab.get("tokens")))
    if rows:
        parts += ["<div><h3>Losses</h3>", _table(["", "value"], rows, "kv"), "</div>"]
    timings = results.get("timings")
    if isinstance(timings, dict) and timings:
        parts += ["<div><h3>Timings (s)</h3>", _table(["stage", "seconds"], list(timings.items())), "</div>"]
    parts.append("</div>")
    if isinstance(results.get("incomplete"), list) and results["incomplete"]:
        parts.append(_note("Stages that did not run: " + ", ".join(map(str, results["incomplete"]))))
    n_err = len(acc.errors(results))
    if n_err:
        parts.append(_Raw(f'<p class="error">{n_err} analysis(es) failed: see <a href="#errors">Errors</a>.</p>'))
    if not layers:
        parts.append(_no_census(results))
        return "".join(parts)
    cover = dict(acc.detector_tokens_by_layer(results))
    table_rows = []
    for layer, r in layers:
        delta = r.get("delta_sensitive")
        sel = acc.num(delta[0].get("selectivity")) if delta else None
        c = cover.get(layer) or {}
        table_rows.append([
            _nlink(layer, 0, str(layer)), r.get("n_neurons"), r.get("tokens"),
            r.get("n_dead", len(r.get("dead_neurons") or [])),
            r.get("pct_dead"), len(r.get("rarely_active") or []), r.get("mean_frequency_alive"),
            len(r.get("positional_neurons") or []), len(r.get("token_detectors") or []),
            f"{c.get('covered', 'n/a')} / {c.get('n_new', 'n/a')}",
            "n/a (no Δ)" if delta is None else sel])
    parts.append("<h3>Key counts per layer</h3>")
    parts.append(_table(["layer", "neurons", "tokens N", "dead", "% dead", "rarely active", "mean freq. (alive)",
                         "positional", "token detectors", "tokens covered / new", "top Δ selectivity"], table_rows))
    return "".join(parts)


def _dead_section(results: Mapping[str, Any]) -> str:
    layers = acc.layer_items(results)
    if not layers:
        return _no_census(results)
    rare_thr = (layers[0][1].get("activity") or {}).get("rare_threshold")
    rows = [[_layer_label(layer, r), r.get("tokens"), r.get("n_neurons"), len(r.get("dead_neurons") or []),
             _links(layer, r.get("dead_neurons") or []), len(r.get("rarely_active") or []),
             _links(layer, r.get("rarely_active") or [])] for layer, r in layers]
    return (f"<p>A neuron is <b>active</b> at a token when its gate is open (z &gt; 0; gated MLP: gate "
            f"pre-activation &gt; 0; plain MLP: post &gt; 0). "
            f"<b>Dead</b>: active on 0 of the N tokens. <b>Rarely active</b>: 0 &lt; frequency &lt; "
            f"{_e(acc.fmt(rare_thr))}.</p>"
            + _table(["layer", "tokens N", "neurons", "dead", "dead neurons", "rarely active", "rarely active neurons"],
                     rows))


def _positional_section(results: Mapping[str, Any]) -> str:
    layers = acc.layer_items(results)
    if not layers:
        return _no_census(results)
    rows = []
    for layer, r in layers:
        pos = r.get("positional") or {}
        top = pos.get("positional_top") or {}
        tops = _Raw(", ".join(f"{_nlink(layer, n, str(n))} ({_e(acc.fmt(mi, 3))})"
                              for n, mi in zip(top.get("neurons") or [], top.get("mi") or [], strict=False)))
        rows.append([_layer_label(layer, r), pos.get("positional_threshold"), len(r.get("positional_neurons") or []),
                     _links(layer, r.get("positional_neurons") or []), pos.get("mean_abs_position_correlation"),
                     tops or _Raw('<span class="muted">not recorded</span>')])
    notes = sorted({w for _, r in layers for w in (r.get("warnings") or []) if w.startswith("positional")})
    return ("<p>Mutual information between a neuron being active and the position in fixed-length windows "
            "(Voita et al. 2023), bias-corrected; positional iff I &gt; threshold and the within-window "
            "permutation test rejects (docs/census.md).  Also the mean |Pearson correlation| of post "
            "with position.</p>"
            + "".join(f'<p class="muted">Warning: {_e(w)}</p>' for w in notes)
            + _table(["layer", "MI threshold", "positional", "positional neurons", "mean |corr(post, pos)|",
                      "highest-MI neurons (I)"], rows))


def _detectors_section(results: Mapping[str, Any]) -> str:
    layers = acc.layer_items(results)
    if not layers:
        return _no_census(results)
    cover = dict(acc.detector_tokens_by_layer(results))
    strings: dict[int, str] = {}
    for _, r in layers:
        strings.update(acc.detector_strings(r))
    summary_rows = []
    for layer, r in layers:
        c = cover.get(layer) or {}
        new = [_tok(strings.get(int(t), f"#{t}")) for t in (c.get("new") or [])[:MAX_LIST]]
        more = f" … and {len(c.get('new') or []) - MAX_LIST} more" if len(c.get("new") or []) > MAX_LIST else ""
        sup = r.get("suppression") or {}
        summary_rows.append([_layer_label(layer, r), len(r.get("token_detectors") or []), c.get("covered"),
                             c.get("n_new"),
                             c.get("cumulative"), _Raw("".join(new) + _e(more)),
                             sup.get("fraction_suppressing_own_triggers"), sup.get("fraction_suppressing_any_trigger")])
    crit = (layers[0][1].get("detectors") or {}).get("criteria") or {}
    parts = [f"<p>Token detector: ≤ {_e(crit.get('max_types', 5))} token types cover ≥ "
             f"{_e(crit.get('coverage', 0.95))} of the neuron's activations, each firing it on ≥ "
             f"{_e(crit.get('min_precision', 0.95))} of its (≥ {_e(crit.get('min_occurrences', 5))}) occurrences; "
             "the trigger is the token at the activation (never later tokens). Suppression: the detector's direct "
             "logit effect puts all (any) of its triggers among its most suppressed tokens.</p>",
             _table(["layer", "detectors", "tokens covered", "new", "cumulative", "new tokens",
                     "suppress own triggers (all)", "(any)"], summary_rows)]
    for layer, r in layers:
        dets = r.get("token_detectors") or []
        if not dets:
            continue
        ranks = {s["neuron"]: s for s in (r.get("suppression") or {}).get("detectors") or []}
        rows = []
        for det in dets[:MAX_DETECTOR_ROWS]:
            toks = det.get("token_strings") or [f"#{t}" for t in det.get("tokens") or []]
            prec = det.get("precision") or []
            chips = _Raw("".join(f"{_tok(s)}<span class=\"muted\">{_e(acc.fmt(p, 3))}</span> "
                                 for s, p in zip(toks, prec + [None] * (len(toks) - len(prec)), strict=False)))
            s = ranks.get(det["neuron"]) or {}
            rows.append([_nlink(layer, det["neuron"], str(det["neuron"])), chips, det.get("coverage"),
                         "n/a" if not s else ("all" if s.get("suppresses_all") else
                                              "some" if s.get("suppresses_any") else "none")])
        more = (f'<p class="muted">{len(dets) - MAX_DETECTOR_ROWS} more detectors: see their neuron pages.</p>'
                if len(dets) > MAX_DETECTOR_ROWS else "")
        parts.append(f"<details><summary>Layer {layer}: {len(dets)} token detectors</summary>"
                     + _table(["neuron", "trigger tokens (precision)", "coverage", "suppresses own triggers"], rows)
                     + more + "</details>")
    return "".join(parts)


def _delta_section(results: Mapping[str, Any]) -> str:
    if acc.arch(results) == "gpt2":
        return _note("Not applicable: GPT-2 has no Δ (the selective-scan step size is a Mamba quantity).")
    layers = acc.layer_items(results)
    if not layers:
        return _no_census(results)
    parts = ["<p>Δ = softplus(W_dt·dt_low + b_dt), traced from the model; per channel (Mamba-2: per head): mean, "
             "std and selectivity = std of ln Δ over tokens; the top-k by selectivity and the tokens that drive their "
             "Δ highest.</p>"]
    for layer, r in layers:
        delta = r.get("delta")
        top = r.get("delta_sensitive")
        if not isinstance(delta, dict) or top is None:
            parts.append(_note(f"Layer {layer}: no Δ statistics recorded."))
            continue
        per = max(1, int(r.get("n_neurons") or 1) // max(1, int(delta.get("n_units") or 1)))
        rows = []
        for rank, t in enumerate(top, 1):
            label = f"head {t['index']}" if delta.get("unit") == "head" else f"channel {t['index']}"
            chips = _Raw("".join(f"{_tok(x.get('string', x.get('token')))}"
                                 f"<span class=\"muted\">{_e(acc.fmt(x.get('mean_dt'), 3))}</span> "
                                 for x in t.get("top_tokens") or [])) if t.get("top_tokens") else "not recorded"
            rows.append([rank, _nlink(layer, int(t["index"]) * per, label), t.get("mean"), t.get("std"),
                         t.get("selectivity"), chips])
        parts.append(f"<h3>Layer {layer}</h3>"
                     + _table(["rank", delta.get("unit", "channel"), "mean Δ", "std Δ", "selectivity",
                               "top tokens (mean Δ)"], rows))
    return "".join(parts)


def _overlap_section(results: Mapping[str, Any]) -> str:
    layers = acc.layer_items(results)
    if not layers:
        return _no_census(results)
    parts = []
    for layer, r in layers:
        ov = r.get("overlap")
        if not isinstance(ov, dict):
            parts.append(_note(f"Layer {layer}: no overlap recorded."))
            continue
        sizes = ", ".join(f"{GROUP_LABELS.get(k, k)} {v}" for k, v in (ov.get("sizes") or {}).items())
        rows = [[GROUP_LABELS.get(p["a"], p["a"]), GROUP_LABELS.get(p["b"], p["b"]), p.get("intersection"),
                 p.get("union"), p.get("jaccard")] for p in ov.get("pairs") or []]
        parts.append(f"<details><summary>Layer {layer}: {_e(sizes)}</summary>"
                     + _table(["group a", "group b", "|a∩b|", "|a∪b|", "Jaccard"], rows) + "</details>")
    return "<p>Counts and Jaccard index between the groups of each layer (Jaccard n/a: both groups empty).</p>" + \
        "".join(parts)


def _spread(entry: Mapping[str, Any] | None, base: float | None) -> str:
    if not isinstance(entry, dict):
        return "n/a"
    mean, std = acc.num(entry.get("mean")), acc.num(entry.get("std"))
    if mean is None:
        return "n/a"
    shift = mean - base if base is not None else mean
    return f"{shift:+.4g} ± {acc.fmt(std)}"


def _ablation_section(results: Mapping[str, Any]) -> str:
    ab = acc.part(results, "ablation")
    if not ab or not isinstance(ab.get("groups"), dict):
        return _missing(results, "ablation", "Ablation")
    base = acc.num(ab.get("baseline_loss"))
    rows = []
    for name, g in ab["groups"].items():
        per_layer = ", ".join(f"L{k}: {v}" for k, v in (g.get("per_layer") or {}).items())
        if "skipped" in g and "zero" not in g:
            rows.append([GROUP_LABELS.get(name, name), g.get("neurons"), per_layer or "—",
                         f"not ablated: {g['skipped']}", "", "", ""])
            continue
        z, m = g.get("zero") or {}, g.get("mean") or {}
        rows.append([GROUP_LABELS.get(name, name), g.get("neurons"), per_layer, z.get("delta"),
                     _spread(z.get("random"), base), m.get("delta"), _spread(m.get("random"), base)])
    return (f"<p>Held-out loss {_e(acc.fmt(base))} nats/token on {_e(ab.get('tokens'))} predicted tokens (windows "
            "disjoint from the selection split). Each group is zero- or mean-ablated at the neuron unit across all "
            f"census layers; the control ablates random neurons of the same size per layer ({_e(ab.get('draws'))} "
            "draws, mean ± std of Δloss).</p>"
            + _table(["group", "neurons", "per layer", "zero Δloss", "zero random Δloss", "mean Δloss",
                      "mean random Δloss"], rows))


def _pruning_section(results: Mapping[str, Any]) -> str:
    pr = acc.part(results, "pruning")
    if not pr or not isinstance(pr.get("ratios"), dict):
        return _missing(results, "pruning", "Pruning")
    base = acc.num(pr.get("baseline_loss"))
    rows = []
    for ratio, v in sorted(pr["ratios"].items(), key=lambda kv: float(kv[0])):
        per_layer = ", ".join(f"L{k}: {n}" for k, n in (v.get("pruned_per_layer") or {}).items())
        rnd = v.get("random") or {}
        rows.append([float(ratio), per_layer, v.get("loss"), v.get("delta"),
                     f"{acc.fmt(rnd.get('mean'))} ± {acc.fmt(rnd.get('std'))}", _spread(rnd, base)])
    return (f"<p>Priority: {_e(pr.get('priority', 'not recorded'))}. Unpruned held-out loss {_e(acc.fmt(base))} "
            f"nats/token on {_e(pr.get('tokens'))} tokens.</p>"
            + _table(["ratio", "pruned per layer", "loss", "Δloss", "random loss (mean ± std)", "random Δloss"], rows))


def _attention_section(results: Mapping[str, Any]) -> str:
    att = acc.attention_part(results)
    if not att:
        return _missing(results, "attention_neurons", "Attention neurons")
    parts = [_table(["", "value"], [(k, att.get(k) if not isinstance(att.get(k), list) else
                                      ", ".join(map(str, att[k])))
                                     for k in ("arch", "layers", "methods", "n_windows", "window", "query")
                                     if k in att], "kv")]
    errs = att.get("errors") or {}
    for name, reason in errs.items():
        parts.append(_error(f"{name} failed: {reason}"))
    per_method = att.get("results") if isinstance(att.get("results"), dict) else {}
    wanted = att.get("methods") if isinstance(att.get("methods"), list) else list(per_method)
    for method in wanted:
        if method not in per_method and method not in errs:
            parts.append(_note(f"method {method}: no results recorded"))
    rows = []
    for method, per in per_method.items():
        for layer, e in sorted((per or {}).items(), key=lambda kv: int(kv[0])):
            if not isinstance(e, dict):
                continue
            top = (e.get("top_neurons") or {}).get("indices") or []
            if e.get("unit") == "channel":
                top_cell = _Raw(", ".join(_nlink(layer, n, str(n)) for n in top))
            else:
                top_cell = ", ".join(map(str, top))
            rows.append([method, int(layer), e.get("unit", "unit"), e.get("num_neurons"), e.get("mean_activation"),
                         e.get("activation_std"), e.get("neuron_diversity"), e.get("effective_neurons"), top_cell])
    if rows:
        parts.append(_table(["method", "layer", "unit", "units", "mean activation", "activation std", "diversity",
                             "effective units", "top units by importance"], rows))
    missing_keys = [k for k in ("num_neurons", "mean_activation", "activation_std", "top_neurons", "neuron_diversity")
                    if any(isinstance(e, dict) and k not in e
                           for per in per_method.values() for e in (per or {}).values())]
    if missing_keys:
        parts.append(_note("Keys missing from some method/layer entries: " + ", ".join(missing_keys)))
    return "".join(parts)


def _faithfulness_section(results: Mapping[str, Any]) -> str:
    faith = acc.faithfulness_part(results)
    if not faith:
        return _missing(results, "faithfulness", "Faithfulness")
    parts = [f"<p>Split: {_e(faith.get('split', 'not recorded'))}.</p>"]
    for name, reason in (faith.get("errors") or {}).items():
        parts.append(_error(f"{name} failed: {reason}"))
    tok = faith.get("token")
    if isinstance(tok, dict) and isinstance(tok.get("methods"), dict):
        rows = []
        for method, per in tok["methods"].items():
            for layer, e in sorted((per or {}).items(), key=lambda kv: int(kv[0])):
                above = e.get("above_random")
                rows.append([method, int(layer), e.get("morf_area"), e.get("lerf_area"), e.get("difference"),
                             _ci(e.get("difference_ci")), "n/a" if above is None else ("yes" if above else "no")])
        rnd = tok.get("random") or {}
        if rnd:
            rows.append([f"random ({rnd.get('seeds', '?')} seeds)", "all", rnd.get("morf_area"), rnd.get("lerf_area"),
                         f"{acc.fmt(rnd.get('difference'))} ± {acc.fmt(rnd.get('difference_std'))} (seed std)",
                         _ci(rnd.get("difference_ci")), ""])
        query = tok.get("query_rule") or f"query position {tok.get('query_position')}"
        parts.append(f"<h3>Token level (MoRF / LeRF)</h3><p>{_e(tok.get('n_windows'))} windows of "
                     f"{_e(tok.get('window'))} tokens; query: {_e(query)}; target: "
                     f"{_e(tok.get('target', 'n/a'))}; mean log p {_e(acc.fmt(tok.get('baseline_logprob')))} with the "
                     f"full context, {_e(acc.fmt(tok.get('masked_context_logprob')))} with it masked. "
                     "Difference = LeRF area − MoRF area (larger = more faithful); intervals: "
                     f"{_e(tok.get('interval', 'not recorded'))}.</p>"
                     + _table(["method", "layer", "MoRF area", "LeRF area", "difference", "95% CI",
                               "above random"], rows))
    else:
        parts.append(_note("Token-level faithfulness: not recorded."))
    neu = faith.get("neuron")
    if isinstance(neu, dict) and isinstance(neu.get("methods"), dict):
        rows = []
        rnd = neu.get("random") or {}
        for method, per in neu["methods"].items():
            for layer, e in sorted((per or {}).items(), key=lambda kv: int(kv[0])):
                r = rnd.get(str(layer)) or {}
                rows.append([method, int(layer), e.get("k"), e.get("delta"),
                             f"{acc.fmt(r.get('delta_mean'))} ± {acc.fmt(r.get('delta_std'))}", e.get("z_vs_random")])
        parts.append(f"<h3>Neuron level (ablate each method's top-k {_e(neu.get('unit', 'unit'))}s)</h3>"
                     f"<p>Baseline loss {_e(acc.fmt(neu.get('baseline_loss')))} on {_e(neu.get('tokens'))} tokens "
                     f"of {_e(neu.get('n_eval_windows'))} evaluation windows (ranking from "
                     f"{_e(neu.get('n_select_windows'))} selection windows).</p>"
                     + _table(["method", "layer", "k", "Δloss", "random Δloss (mean ± std)", "z vs random"], rows))
    else:
        parts.append(_note("Neuron-level faithfulness: not recorded."))
    return "".join(parts)


def _interval(entry: Any) -> str:
    if not isinstance(entry, dict):
        return "n/a"
    return f"{acc.fmt(entry.get('mean'), 3)} [{acc.fmt(entry.get('low'), 3)}, {acc.fmt(entry.get('high'), 3)}]"


def _ci(entry: Any) -> str:
    if not isinstance(entry, dict) or entry.get("low") is None:
        return "n/a"
    return f"[{acc.fmt(entry.get('low'), 3)}, {acc.fmt(entry.get('high'), 3)}]"


def _ground_truth_section(results: Mapping[str, Any]) -> str:
    truth = acc.part(results, "ground_truth")
    if not truth or not isinstance(truth.get("rows"), list):
        return _missing(results, "ground_truth", "Ground truth")
    parts = [f"<p>Task {_e(truth.get('task'))} ({_e(truth.get('seq_len'))} tokens"
             + (f", {_e(truth.get('num_pairs'))} key–value pairs" if truth.get("num_pairs") else "")
             + f"): model accuracy {_e(acc.fmt(truth.get('task_accuracy')))} on "
             f"{_e(truth.get('task_accuracy_queries'))} held-out queries. {_e(truth.get('n_queries'))} queries "
             f"scored (one per example); rank among {_e(truth.get('rank_among'))}; intervals: "
             f"{_e(truth.get('interval'))}. A method beats a baseline when the interval of the paired "
             "difference lies above 0.</p>"]
    for name, reason in (truth.get("errors") or {}).items():
        parts.append(_error(f"{name} failed: {reason}"))
    rows = []
    for r in truth["rows"]:
        if not isinstance(r, dict):
            continue
        verdict = ", ".join(f"MRR {'>' if (r.get(f'beats_{b}') or {}).get('mrr') else 'not >'} {b}"
                            for b in ("random", "recency") if f"beats_{b}" in r)
        expected = r.get("expected")
        if isinstance(expected, dict):
            verdict = (f"expected hit {acc.fmt(expected.get('hit_rate'), 3)}, "
                       f"MRR {acc.fmt(expected.get('mrr'), 3)}")
        rows.append([r.get("source"), r.get("method"), "all" if r.get("layer") is None else r.get("layer"),
                     _interval(r.get("hit_rate")), _interval(r.get("mrr")), verdict])
    parts.append(_table(["true source", "method", "layer", "top-1 hit rate [95% CI]", "MRR [95% CI]",
                         "significance"], rows))
    return "".join(parts)


def _patching_section(results: Mapping[str, Any]) -> str:
    """``mambascope patch``: the prompts and metric, each grid's strongest cells, attribution agreement."""
    patching = results.get("patching")
    if not isinstance(patching, dict) or not isinstance(patching.get("grids"), dict):
        return _note("Patching: not run (mambascope patch).")
    prompts = patching.get("prompts") or {}
    metric = patching.get("metric") or {}
    noise = patching.get("noise")
    corrupt = (f"the clean prompt with Gaussian noise (ν = {acc.fmt(noise.get('nu'))}) on the embeddings of "
               f"positions {noise.get('subject_positions')}" if isinstance(noise, dict) else prompts.get("corrupt"))
    parts = [_table(["", "value"], [
        ("clean prompt", prompts.get("clean")), ("corrupted", corrupt),
        ("target", _tok(prompts.get("target", ""))), ("against", _tok(prompts.get("corrupt_target") or "")),
        ("metric", f"{metric.get('kind')}: {metric.get('formula')}"), ("direction", patching.get("direction")),
        ("clean metric", patching.get("clean_metric")), ("corrupted metric", patching.get("corrupt_metric"))], "kv"),
        _note("Effect = (m_patched − m_corrupt) / (m_clean − m_corrupt): the fraction of the clean metric "
              "restored by patching one unit at one position.")]
    attribution = patching.get("attribution") or {}
    rows = []
    for unit in patching["grids"]:
        top = ", ".join(f"{label} ({value:+.3f})" for label, value in top_cells(patching, unit))
        agree = attribution.get(unit) or {}
        rows.append([UNIT_STYLE.get(unit, (unit,))[0], top, agree.get("pearson"), agree.get("spearman"),
                     agree.get("cells")])
    parts.append(_table(["unit", "strongest cells (layer @position token (effect))", "attribution Pearson",
                         "attribution Spearman", "cells compared"], rows))
    return "".join(parts)


def _neurons_section(results: Mapping[str, Any]) -> str:
    layers = acc.layer_items(results)
    if not layers:
        return _no_census(results)
    examples = []
    for layer, r in layers:
        for label, neurons in (("token detector", [d["neuron"] for d in r.get("token_detectors") or []]),
                               ("positional", r.get("positional_neurons") or []),
                               ("rarely active", r.get("rarely_active") or [])):
            if neurons:
                examples.append(f"{_nlink(layer, neurons[0])} ({_e(label)})")
    ex = ('<p class="muted">Examples: ' + ", ".join(examples[:12]) + "</p>") if examples else ""
    missing = []
    first = layers[0][1]
    for key, label in (("top_contexts", "top-activating contexts"), ("logit_effects", "logit effects"),
                       ("attention_rows", "hidden-attention rows")):
        if not any(isinstance(r.get(key), dict) for _, r in layers):
            if key == "attention_rows" and (first.get("arch") == "gpt2" or acc.arch(results) == "gpt2"):
                continue
            missing.append(label)
    miss = _note("Not computed in this run: " + ", ".join(missing) + ".") if missing else ""
    return ("<p>Every neuron of every census layer has a page: type a layer and a neuron (\"L2 N37\", \"2:37\") "
            "in the search box at the top, follow a neuron link in any table, or open "
            "<code>report.html#neuron-&lt;layer&gt;-&lt;neuron&gt;</code>.</p>" + miss + ex)


def _errors_section(results: Mapping[str, Any], skipped: dict[str, str]) -> str:
    rows = [[name, reason] for name, reason in acc.errors(results).items()]
    att = acc.attention_part(results)
    for name, reason in ((att or {}).get("errors") or {}).items():
        rows.append([f"attention_neurons: {name}", reason])
    faith = acc.faithfulness_part(results)
    for name, reason in ((faith or {}).get("errors") or {}).items():
        rows.append([f"faithfulness: {name}", reason])
    parts = []
    if rows:
        parts.append(_table(["analysis", "reason"], rows))
    else:
        parts.append('<p class="muted">No analysis recorded an error.</p>')
    if isinstance(results.get("incomplete"), list) and results["incomplete"]:
        parts.append(_note("Did not run: " + ", ".join(map(str, results["incomplete"]))))
    if skipped:
        parts.append("<h3>Figures not drawn</h3>" + _table(["figure", "reason"], list(skipped.items())))
    return "".join(parts)


# ------------------------------------------------------------------------------------------ render

def render_report(results: Mapping[str, Any], out_dir: str | Path, figures: Sequence[str | Path] | None = None) -> Path:
    """Write ``out_dir/report.html`` (one self-contained file) and return its path.

    ``figures``: PNG paths to embed (e.g. from :func:`create_comprehensive_report`; a :class:`FigureSet`
    also carries the reasons of the figures not drawn).  None draws them into ``out_dir/figures``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if figures is None:
        figures = create_comprehensive_report(results, out_dir / "figures")
    skipped = dict(getattr(figures, "skipped", {}) or {})
    paths = [Path(p) for p in figures]
    body = {
        "summary": _summary(results),
        "census-dead": _dead_section(results),
        "census-positional": _positional_section(results),
        "census-detectors": _detectors_section(results),
        "census-delta": _delta_section(results),
        "census-overlap": _overlap_section(results),
        "ablation": _ablation_section(results),
        "pruning": _pruning_section(results),
        "attention-neurons": _attention_section(results),
        "faithfulness": _faithfulness_section(results),
        "ground-truth": _ground_truth_section(results),
        "patching": _patching_section(results),
        "neurons": _neurons_section(results),
        "errors": _errors_section(results, skipped),
    }
    sections = "".join(_section(sid, body[sid], paths, skipped) for sid in SECTIONS)
    other = _figures_html("other", paths, skipped)
    if other:
        sections += f'<section id="other-figures"><h2>Other figures</h2>{other}</section>'
    nav = "".join(f'<a href="#{sid}">{_e(label)}</a>' for sid, label in SECTIONS.items())
    name = acc.model_name(results)
    arch = acc.arch(results)
    corpus = results.get("corpus") if isinstance(results.get("corpus"), dict) else {}
    subtitle = ", ".join(str(x) for x in (arch, corpus.get("name"), corpus.get("split")) if x)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>mambascope report — {_e(name)}</title><style>{CSS}</style></head>
<body><nav><span class="brand">mambascope</span>{nav}
<form id="neuron-search-form" autocomplete="off" role="search"><input id="neuron-search" type="text"
 placeholder="neuron: L2 N37 or 2:37" aria-label="find a neuron"> <button type="submit">Go</button></form></nav>
<div id="neuron-view" hidden><main><p><a href="#neurons">← back to the report</a></p>
<div id="neuron-tools"><select id="neuron-layer" aria-label="layer"></select>
<input id="neuron-index" type="number" min="0" value="0" aria-label="neuron">
<button id="neuron-go" type="button">Show</button></div>
<div id="neuron-message"></div><div id="neuron-page"></div></main></div>
<main id="report">
<h1>{_e(name)}</h1><p class="muted">{_e(subtitle)}</p>
{sections}
</main>
<script type="application/json" id="neuron-data">{_script_json(neuron_data(results))}</script>
<script>{JS}</script>
</body></html>
"""
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def render_comparison_report(comparison: Mapping[str, Any], out_dir: str | Path,
                             figures: Mapping[str, Any] | None = None) -> Path:
    """Write ``out_dir/comparison.html``: one self-contained page with the comparison section (models,
    per-layer table by relative depth, one figure per statistic, failures by name)."""
    out_dir = Path(out_dir)
    model_keys = ("arch", "n_layers", "d_model", "d_inner", "parameters", "analysed_tokens", "text_characters",
                  "text_tokens", "chars_per_token", "loss")
    models = _table(["model", *model_keys],
                    [[name, *[r4(m.get(k)) if isinstance(m.get(k), float) else m.get(k) for k in model_keys]]
                     for name, m in comparison.get("models", {}).items()])
    rows = comparison.get("layers", [])
    columns = [c for c in (rows[0] if rows else {}) if c not in ("arch",)]
    layers = _table(columns, [[r4(r.get(c)) if isinstance(r.get(c), float) else r.get(c) for c in columns]
                              for r in rows])
    images = []
    for stat, path in (figures or {}).items():
        if isinstance(path, Path) and path.exists():
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            images.append(f'<figure><img alt="{_e(stat)}" src="data:image/png;base64,{data}">'
                          f"<figcaption>{_e(path.name)}</figcaption></figure>")
        else:
            images.append(_note(f"Figure '{stat}' not drawn: {path}"))
    errors = "".join(_error(f"{name}: {reason}") for name, reason in comparison.get("errors", {}).items())
    corpus = comparison.get("corpus", {})
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mambascope comparison</title><style>{CSS}</style></head>
<body><main id="report"><h1>Model comparison</h1>
<p class="muted">{_e(corpus.get("name", ""))} {_e(corpus.get("split", ""))}: each model on the same texts with its own
tokenizer and its own neuron unit; depth is layer / (layers − 1).</p>
<section id="comparison"><h2>Comparison</h2><h3>Models</h3>{models}<h3>Per layer</h3>{layers}
{"".join(images)}{errors}</section></main></body></html>
"""
    path = out_dir / "comparison.html"
    path.write_text(page, encoding="utf-8")
    return path
