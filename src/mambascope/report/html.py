"""The single-file HTML report of a results dict (docs/design.md §8): ``report.html``.

One self-contained file (inline CSS and JavaScript, figures embedded as base64 PNG, no network): a
summary of the model and corpus, a section per analysis with its figures and tables, the errors, and
**neuron pages** rendered in the browser from a compact JSON of the per-neuron data (statistics,
top-activating contexts shaded by activation, direct logit effects, hidden-attention row), reached by a
search box ("L2 N37", "2:37") or the URL hash ``#neuron-<layer>-<neuron>``.

The page is rendered from the Jinja2 templates in ``report/templates`` (autoescaping on: every string
from the results, token strings from the corpus included, is escaped by the engine) with the CSS and
JavaScript of ``report/static`` inlined; ``mambascope serve`` renders the same templates with those files
linked and the neuron pages fetched from its API.  The functions below turn the results into plain data
(:class:`Table` rows of :class:`Frag` text pieces, notes, figures) and never build HTML.  A section whose
analysis is absent or failed says so with the recorded reason; no number is ever a placeholder.

Size: the neuron pages' JSON (:func:`mambascope.report.neuron_payload.neuron_data`) is embedded whole up to
:data:`EMBED_ALL_MAX` neurons; above that, the report embeds every neuron's statistics but the contexts,
logit effects and attention rows of the top ``TOP_NEURONS`` neurons of each layer only
(:func:`~mambascope.report.neuron_payload.top_neurons`), and says on the page how to open the rest with
``mambascope serve DIR``.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import jinja2
from markupsafe import Markup

from mambascope.report import _access as acc
from mambascope.report.attribute_plots import ranked, row_label
from mambascope.report.figures import GROUP_LABELS, create_comprehensive_report
from mambascope.report.neuron_payload import TOP_NEURONS, neuron_data, r4, top_neurons
from mambascope.report.patching_plots import PATCHING_FIGURES, UNIT_STYLE, top_cells

__all__ = ["EMBED_ALL_MAX", "SECTIONS", "embedded_neuron_data", "render_comparison_report", "render_report"]

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
    "attribution": "Token attribution",
    "leaderboard": "Attribution leaderboard",
    "features": "Dictionary features",
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
    "attribution": "attribution",
    "leaderboard": "leaderboard",
}

MAX_LIST = 200  # neuron links listed inline per layer and group before "… and N more"
MAX_DETECTOR_ROWS = 300  # detector rows per layer in the static table (every one is on its neuron page)

EMBED_ALL_MAX = 16_384
"""Neurons (all census layers together) up to which report.html embeds every neuron page: about 1 KB of
JSON per neuron (docs/design.md §8), so at most ~16 MB, which a browser opens comfortably; a 130m Mamba
(36,864 neurons) is above it.  Above it the report embeds the pages of ``TOP_NEURONS`` neurons per layer
(:func:`mambascope.report.neuron_payload.top_neurons`)."""


# ---------------------------------------------------------------------------------------- plain data

class Frag(NamedTuple):
    """A piece of text in a cell or paragraph; the template decides its markup by ``kind``."""

    kind: str  # "text", "link" (href), "tok" (a token chip; title = the exact string), "muted"
    text: str
    href: str = ""
    title: str = ""


class Cell(NamedTuple):
    num: bool  # right-aligned, tabular digits
    parts: list[Frag]


class Table(NamedTuple):
    headers: list[str]
    rows: list[list[Cell]]
    cls: str = ""


class Block(NamedTuple):
    """A piece of a section body: ``note`` / ``error`` / ``muted`` (text), ``table``, ``h3`` (text),
    ``details`` (summary text, a list of blocks)."""

    kind: str
    text: str = ""
    table: Table | None = None
    blocks: list[Block] | None = None


def _visible(token: str) -> str:
    """A token with its invisible characters shown (newline ↵, tab ⇥, CR ␍; empty ∅)."""
    if token == "":
        return "∅"
    return token.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")


def tok(token: Any) -> Frag:
    """A token chip: invisible characters shown, spaces as middle dots, the exact string as tooltip."""
    text = str(token)
    return Frag("tok", _visible(text).replace(" ", "·"), title=json.dumps(text))


def link(layer: int | str, neuron: int, text: str | None = None) -> Frag:
    return Frag("link", text or f"L{layer} N{neuron}", href=f"#neuron-{int(layer)}-{int(neuron)}")


def text(value: Any) -> Frag:
    return Frag("text", str(value))


def muted(value: Any) -> Frag:
    return Frag("muted", str(value))


def cell(value: Any) -> Cell:
    """A table cell from a number (formatted, right-aligned), None/bool, a string, a Frag or a list of them."""
    if isinstance(value, Frag):
        return Cell(False, [value])
    if isinstance(value, list):
        return Cell(False, value)
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if numeric or isinstance(value, bool) or value is None:
        return Cell(numeric, [text(acc.fmt(value))])
    return Cell(False, [text(value)])


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "") -> Table:
    return Table(list(headers), [[cell(v) for v in r] for r in rows], cls)


def _tb(headers: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "") -> Block:
    return Block("table", table=table(headers, rows, cls))


def _note(message: str) -> Block:
    return Block("note", message)


def _error(message: str) -> Block:
    return Block("error", message)


def _kv(mapping: Mapping[str, Any] | None) -> Block:
    if not mapping:
        return Block("muted", "not recorded")
    rows = [(k, v) for k, v in mapping.items() if not isinstance(v, dict | list)]
    rows += [(k, json.dumps(v)[:300]) for k, v in mapping.items() if isinstance(v, list) and len(v) <= 20]
    return _tb(["key", "value"], rows, "kv")


def _layer_label(layer: int, r: Mapping[str, Any]) -> str:
    """The layer's index with its kind (``mamba2``, ``mlp``, ...) as the census recorded it."""
    kind = r.get("layer_kind")
    return f"{layer} ({kind})" if kind else str(layer)


def _more(items: Sequence[Any]) -> list[Frag]:
    return [text(f" … and {len(items) - MAX_LIST} more")] if len(items) > MAX_LIST else []


def _links(layer: int, neurons: Sequence[int]) -> list[Frag]:
    neurons = list(neurons)
    if not neurons:
        return [muted("none")]
    out: list[Frag] = []
    for i, n in enumerate(neurons[:MAX_LIST]):
        out += [text(", ")] if i else []
        out.append(link(layer, n, str(n)))
    return out + _more(neurons)


def _joined(parts: Iterable[list[Frag]], sep: str = ", ") -> list[Frag]:
    out: list[Frag] = []
    for i, p in enumerate(parts):
        out += ([text(sep)] if i else []) + p
    return out


def _script_json(data: Any) -> Markup:
    """JSON safe inside <script>: ASCII only, and no "<", ">" or "&" (escaped as \\u003c …)."""
    dumped = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return Markup(dumped.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


# ---------------------------------------------------------------------------------------- templates

@cache
def environment() -> jinja2.Environment:
    """The Jinja2 environment of the report and the server's pages (autoescape on for every template)."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("mambascope.report", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters["script_json"] = _script_json
    return env


def static_text(name: str) -> Markup:
    """A CSS or JavaScript file of ``report/static``, to inline in <style>/<script> (our own file, no
    ``</`` in it: checked)."""
    body = resources.files("mambascope.report").joinpath("static", name).read_text(encoding="utf-8")
    if "</" in body:
        raise ValueError(f"report/static/{name} contains '</', which would end its inline element")
    return Markup(body)


# ---------------------------------------------------------------------------------------- figures

class Figure(NamedTuple):
    stem: str
    name: str
    src: str  # a data: URI (the static report) or a URL (the server)


def _figure_section(path: Path) -> str:
    stem = path.stem
    base = "attention_neurons" if stem.startswith("attention_neurons_L") else stem
    return _FIGURE_SECTION.get(base, "other")


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _figures(section: str, figures: list[Path], skipped: dict[str, str],
             src: Callable[[Path], str]) -> tuple[list[Figure], list[Block]]:
    shown, notes = [], []
    for path in figures:
        if _figure_section(path) != section:
            continue
        try:
            shown.append(Figure(path.stem, path.name, src(path)))
        except OSError as exc:
            notes.append(_note(f"figure {path.name} could not be read: {exc}"))
    for name, reason in skipped.items():
        if _FIGURE_SECTION.get(name, "other") == section:
            notes.append(_note(f"Figure '{name}' not drawn: {reason}"))
    return shown, notes


# ---------------------------------------------------------------------------------------- sections

def _missing(results: Mapping[str, Any], analysis: str, label: str) -> Block:
    reason = acc.missing_reason(results, analysis)
    return (_error if reason.startswith("failed") else _note)(f"{label}: {reason}")


def _no_census(results: Mapping[str, Any]) -> dict[str, Any]:
    return {"missing": _missing(results, "census", "Neuron census")}


def _summary(results: Mapping[str, Any]) -> dict[str, Any]:
    census = acc.census_part(results)
    layers = acc.layer_items(results)
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
    timings = results.get("timings")
    out: dict[str, Any] = {
        "model": _kv(results.get("model")), "corpus": _kv(results.get("corpus")),
        "losses": _tb(["", "value"], rows, "kv") if rows else None,
        "timings": _tb(["stage", "seconds"], list(timings.items())) if isinstance(timings, dict) and timings
        else None,
        "incomplete": [str(x) for x in results.get("incomplete") or []] if isinstance(results.get("incomplete"),
                                                                                        list) else [],
        "n_errors": len(acc.errors(results)), "missing": None, "layers": None,
        "candidates": _candidates(results),
    }
    if not layers:
        out["missing"] = _no_census(results)["missing"]
        return out
    cover = dict(acc.detector_tokens_by_layer(results))
    table_rows = []
    for layer, r in layers:
        delta = r.get("delta_sensitive")
        sel = acc.num(delta[0].get("selectivity")) if delta else None
        c = cover.get(layer) or {}
        table_rows.append([
            link(layer, 0, str(layer)), r.get("n_neurons"), r.get("tokens"),
            r.get("n_dead", len(r.get("dead_neurons") or [])),
            r.get("pct_dead"), len(r.get("rarely_active") or []), r.get("mean_frequency_alive"),
            _positional_count(r), len(r.get("token_detectors") or []),
            f"{c.get('covered', 'n/a')} / {c.get('n_new', 'n/a')}",
            "n/a (no Δ)" if delta is None else sel])
    out["layers"] = table(["layer", "neurons", "tokens N", "dead", "% dead", "rarely active", "mean freq. (alive)",
                           "positional", "token detectors", "tokens covered / new", "top Δ selectivity"], table_rows)
    return out


def _candidates(results: Mapping[str, Any]) -> list[Block]:
    """The strongest candidates of each kind (``census.candidates``), each against its threshold."""
    cand = acc.census_part(results).get("candidates")
    if not isinstance(cand, dict) or not cand:
        return []
    thr = acc.fmt

    def kind(key: str, heading: str, headers: list[str], row: Callable[[dict], list[Any]]) -> list[Block]:
        entry = cand.get(key) or {}
        items = entry.get("units" if key == "delta_sensitive" else "neurons") or []
        if not items:
            return []
        return [Block("h3", heading), _tb(headers, [row(x) for x in items])]

    pos, det, act = cand.get("positional") or {}, cand.get("token_selective") or {}, cand.get("least_active") or {}
    return [
        *kind("positional", f"Most positional (positional: MI > {thr(pos.get('threshold'))} nats and p < "
              f"{thr(pos.get('alpha'))})", ["neuron", "MI (nats)", "p-value", "verdict"],
              lambda x: [link(x["layer"], x["neuron"]), x["mi"], x["p_value"], x["status"]]),
        *kind("token_selective", f"Most token-selective (detector: ≤ {thr(det.get('threshold'))} token types cover "
              "its activations, each with high precision)", ["neuron", "types needed", "activations", "verdict"],
              lambda x: [link(x["layer"], x["neuron"]), x["types_needed"], x["activations"], x["status"]]),
        *kind("least_active", f"Least active (dead: frequency 0; rarely active: < {thr(act.get('threshold'))})",
              ["neuron", "activation frequency", "tokens N", "verdict"],
              lambda x: [link(x["layer"], x["neuron"]), x["frequency"], x["tokens"], x["status"]]),
        *kind("delta_sensitive", "Most Δ-selective units (std of ln Δ; no threshold, a ranking)",
              ["layer", "unit", "selectivity", "verdict"],
              lambda x: [x["layer"], x["unit"], x["selectivity"], x["status"]]),
    ]


def _dead_section(results: Mapping[str, Any]) -> dict[str, Any]:
    layers = acc.layer_items(results)
    if not layers:
        return _no_census(results)
    rows = [[_layer_label(layer, r), r.get("tokens"), r.get("n_neurons"), len(r.get("dead_neurons") or []),
             _links(layer, r.get("dead_neurons") or []), len(r.get("rarely_active") or []),
             _links(layer, r.get("rarely_active") or [])] for layer, r in layers]
    return {"rare_threshold": acc.fmt((layers[0][1].get("activity") or {}).get("rare_threshold")),
            "table": table(["layer", "tokens N", "neurons", "dead", "dead neurons", "rarely active",
                            "rarely active neurons"], rows)}


def _positional_count(r: Mapping[str, Any]) -> Any:
    """The layer's positional count, or "untested" when it had no null (nothing is flagged then)."""
    if (r.get("positional") or {}).get("positional_tested") is False:
        return muted("untested (no null)")
    return len(r.get("positional_neurons") or [])


def _positional_section(results: Mapping[str, Any]) -> dict[str, Any]:
    layers = acc.layer_items(results)
    if not layers:
        return _no_census(results)
    rows = []
    for layer, r in layers:
        pos = r.get("positional") or {}
        top = pos.get("positional_top") or {}
        tops = _joined([link(layer, n, str(n)), text(f" ({acc.fmt(mi, 3)})")]
                       for n, mi in zip(top.get("neurons") or [], top.get("mi") or [], strict=False))
        rows.append([_layer_label(layer, r), pos.get("positional_threshold"), _positional_count(r),
                     _links(layer, r.get("positional_neurons") or []), pos.get("mean_abs_position_correlation"),
                     tops or [muted("not recorded")]])
    return {"warnings": sorted({w for _, r in layers for w in (r.get("warnings") or []) if w.startswith("positional")}),
            "table": table(["layer", "MI threshold", "positional", "positional neurons", "mean |corr(post, pos)|",
                            "highest-MI neurons (I)"], rows)}


def _detectors_section(results: Mapping[str, Any]) -> dict[str, Any]:
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
        new = c.get("new") or []
        sup = r.get("suppression") or {}
        summary_rows.append([_layer_label(layer, r), len(r.get("token_detectors") or []), c.get("covered"),
                             c.get("n_new"), c.get("cumulative"),
                             [tok(strings.get(int(t), f"#{t}")) for t in new[:MAX_LIST]] + _more(new),
                             sup.get("fraction_suppressing_own_triggers"), sup.get("fraction_suppressing_any_trigger")])
    per_layer = []
    for layer, r in layers:
        dets = r.get("token_detectors") or []
        if not dets:
            continue
        ranks = {s["neuron"]: s for s in (r.get("suppression") or {}).get("detectors") or []}
        rows = []
        for det in dets[:MAX_DETECTOR_ROWS]:
            toks = det.get("token_strings") or [f"#{t}" for t in det.get("tokens") or []]
            prec = det.get("precision") or []
            chips = [f for s, p in zip(toks, prec + [None] * (len(toks) - len(prec)), strict=False)
                     for f in (tok(s), muted(acc.fmt(p, 3)), text(" "))]
            s = ranks.get(det["neuron"]) or {}
            rows.append([link(layer, det["neuron"], str(det["neuron"])), chips, det.get("coverage"),
                         "n/a" if not s else ("all" if s.get("suppresses_all") else
                                              "some" if s.get("suppresses_any") else "none")])
        blocks = [_tb(["neuron", "trigger tokens (precision)", "coverage", "suppresses own triggers"], rows)]
        if len(dets) > MAX_DETECTOR_ROWS:
            blocks.append(Block("muted", f"{len(dets) - MAX_DETECTOR_ROWS} more detectors: see their neuron pages."))
        per_layer.append(Block("details", f"Layer {layer}: {len(dets)} token detectors", blocks=blocks))
    crit = (layers[0][1].get("detectors") or {}).get("criteria") or {}
    return {"criteria": {"max_types": crit.get("max_types", 5), "coverage": crit.get("coverage", 0.95),
                         "min_precision": crit.get("min_precision", 0.95),
                         "min_occurrences": crit.get("min_occurrences", 5)},
            "table": table(["layer", "detectors", "tokens covered", "new", "cumulative", "new tokens",
                            "suppress own triggers (all)", "(any)"], summary_rows),
            "blocks": per_layer}


def _delta_section(results: Mapping[str, Any]) -> dict[str, Any]:
    if acc.arch(results) == "gpt2":
        return {"missing": _note("Not applicable: GPT-2 has no Δ (the selective-scan step size is a Mamba "
                                 "quantity).")}
    layers = acc.layer_items(results)
    if not layers:
        return _no_census(results)
    blocks = []
    for layer, r in layers:
        delta = r.get("delta")
        top = r.get("delta_sensitive")
        if not isinstance(delta, dict) or top is None:
            blocks.append(_note(f"Layer {layer}: no Δ statistics recorded."))
            continue
        per = max(1, int(r.get("n_neurons") or 1) // max(1, int(delta.get("n_units") or 1)))
        rows = []
        for rank, t in enumerate(top, 1):
            label = f"head {t['index']}" if delta.get("unit") == "head" else f"channel {t['index']}"
            chips = [f for x in t.get("top_tokens") or []
                     for f in (tok(x.get("string", x.get("token"))), muted(acc.fmt(x.get("mean_dt"), 3)), text(" "))]
            rows.append([rank, link(layer, int(t["index"]) * per, label), t.get("mean"), t.get("std"),
                         t.get("selectivity"), chips or "not recorded"])
        blocks += [Block("h3", f"Layer {layer}"),
                   _tb(["rank", delta.get("unit", "channel"), "mean Δ", "std Δ", "selectivity", "top tokens (mean Δ)"],
                       rows)]
    return {"blocks": blocks}


def _overlap_section(results: Mapping[str, Any]) -> dict[str, Any]:
    layers = acc.layer_items(results)
    if not layers:
        return _no_census(results)
    blocks = []
    for layer, r in layers:
        ov = r.get("overlap")
        if not isinstance(ov, dict):
            blocks.append(_note(f"Layer {layer}: no overlap recorded."))
            continue
        sizes = ", ".join(f"{GROUP_LABELS.get(k, k)} {v}" for k, v in (ov.get("sizes") or {}).items())
        rows = [[GROUP_LABELS.get(p["a"], p["a"]), GROUP_LABELS.get(p["b"], p["b"]), p.get("intersection"),
                 p.get("union"), p.get("jaccard")] for p in ov.get("pairs") or []]
        blocks.append(Block("details", f"Layer {layer}: {sizes}",
                            blocks=[_tb(["group a", "group b", "|a∩b|", "|a∪b|", "Jaccard"], rows)]))
    return {"blocks": blocks}


def _spread(entry: Mapping[str, Any] | None, base: float | None) -> str:
    if not isinstance(entry, dict):
        return "n/a"
    mean, std = acc.num(entry.get("mean")), acc.num(entry.get("std"))
    if mean is None:
        return "n/a"
    shift = mean - base if base is not None else mean
    return f"{shift:+.4g} ± {acc.fmt(std)}"


def _ablation_section(results: Mapping[str, Any]) -> dict[str, Any]:
    ab = acc.part(results, "ablation")
    if not ab or not isinstance(ab.get("groups"), dict):
        return {"missing": _missing(results, "ablation", "Ablation")}
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
    return {"baseline": acc.fmt(base), "tokens": ab.get("tokens"), "draws": ab.get("draws"),
            "table": table(["group", "neurons", "per layer", "zero Δloss", "zero random Δloss", "mean Δloss",
                            "mean random Δloss"], rows)}


def _pruning_section(results: Mapping[str, Any]) -> dict[str, Any]:
    pr = acc.part(results, "pruning")
    if not pr or not isinstance(pr.get("ratios"), dict):
        return {"missing": _missing(results, "pruning", "Pruning")}
    base = acc.num(pr.get("baseline_loss"))
    rows = []
    for ratio, v in sorted(pr["ratios"].items(), key=lambda kv: float(kv[0])):
        per_layer = ", ".join(f"L{k}: {n}" for k, n in (v.get("pruned_per_layer") or {}).items())
        rnd = v.get("random") or {}
        rows.append([float(ratio), per_layer, v.get("loss"), v.get("delta"),
                     f"{acc.fmt(rnd.get('mean'))} ± {acc.fmt(rnd.get('std'))}", _spread(rnd, base)])
    return {"priority": pr.get("priority", "not recorded"), "baseline": acc.fmt(base), "tokens": pr.get("tokens"),
            "table": table(["ratio", "pruned per layer", "loss", "Δloss", "random loss (mean ± std)",
                            "random Δloss"], rows)}


def _attention_section(results: Mapping[str, Any]) -> dict[str, Any]:
    att = acc.attention_part(results)
    if not att:
        return {"missing": _missing(results, "attention_neurons", "Attention neurons")}
    blocks = [_tb(["", "value"], [(k, att.get(k) if not isinstance(att.get(k), list) else ", ".join(map(str, att[k])))
                                  for k in ("arch", "layers", "methods", "n_windows", "window", "query") if k in att],
                  "kv")]
    errs = att.get("errors") or {}
    blocks += [_error(f"{name} failed: {reason}") for name, reason in errs.items()]
    per_method = att.get("results") if isinstance(att.get("results"), dict) else {}
    wanted = att.get("methods") if isinstance(att.get("methods"), list) else list(per_method)
    blocks += [_note(f"method {method}: no results recorded") for method in wanted
               if method not in per_method and method not in errs]
    rows = []
    for method, per in per_method.items():
        for layer, e in sorted((per or {}).items(), key=lambda kv: int(kv[0])):
            if not isinstance(e, dict):
                continue
            top = (e.get("top_neurons") or {}).get("indices") or []
            if e.get("unit") == "channel":
                top_cell: Any = _joined([link(layer, n, str(n))] for n in top)
            else:
                top_cell = ", ".join(map(str, top))
            rows.append([method, int(layer), e.get("unit", "unit"), e.get("num_neurons"), e.get("mean_activation"),
                         e.get("activation_std"), e.get("neuron_diversity"), e.get("effective_neurons"), top_cell])
    if rows:
        blocks.append(_tb(["method", "layer", "unit", "units", "mean activation", "activation std", "diversity",
                           "effective units", "top units by importance"], rows))
    missing_keys = [k for k in ("num_neurons", "mean_activation", "activation_std", "top_neurons", "neuron_diversity")
                    if any(isinstance(e, dict) and k not in e
                           for per in per_method.values() for e in (per or {}).values())]
    if missing_keys:
        blocks.append(_note("Keys missing from some method/layer entries: " + ", ".join(missing_keys)))
    return {"blocks": blocks}


def _interval(entry: Any) -> str:
    if not isinstance(entry, dict):
        return "n/a"
    return f"{acc.fmt(entry.get('mean'), 3)} [{acc.fmt(entry.get('low'), 3)}, {acc.fmt(entry.get('high'), 3)}]"


def _ci(entry: Any) -> str:
    if not isinstance(entry, dict) or entry.get("low") is None:
        return "n/a"
    return f"[{acc.fmt(entry.get('low'), 3)}, {acc.fmt(entry.get('high'), 3)}]"


def _faithfulness_section(results: Mapping[str, Any]) -> dict[str, Any]:
    faith = acc.faithfulness_part(results)
    if not faith:
        return {"missing": _missing(results, "faithfulness", "Faithfulness")}
    out: dict[str, Any] = {"split": faith.get("split", "not recorded"),
                           "errors": [_error(f"{name} failed: {reason}")
                                      for name, reason in (faith.get("errors") or {}).items()],
                           "token": None, "neuron": None}
    tok_part = faith.get("token")
    if isinstance(tok_part, dict) and isinstance(tok_part.get("methods"), dict):
        def curve_row(method: str, layer: int | str, e: Mapping[str, Any]) -> list:
            above = e.get("above_random")
            return [method, layer, e.get("morf_area"), e.get("lerf_area"), e.get("difference"),
                    _ci(e.get("difference_ci")), "n/a" if above is None else ("yes" if above else "no")]

        rows = [curve_row(method, int(layer), e) for method, per in tok_part["methods"].items()
                for layer, e in sorted((per or {}).items(), key=lambda kv: int(kv[0]))]
        rows += [curve_row(method, "whole model", e) for method, e in (tok_part.get("whole_model") or {}).items()]
        rnd = tok_part.get("random") or {}
        if rnd:
            rows.append([f"random ({rnd.get('seeds', '?')} seeds)", "all", rnd.get("morf_area"), rnd.get("lerf_area"),
                         f"{acc.fmt(rnd.get('difference'))} ± {acc.fmt(rnd.get('difference_std'))} (seed std)",
                         _ci(rnd.get("difference_ci")), ""])
        out["token"] = {
            "n_windows": tok_part.get("n_windows"), "window": tok_part.get("window"),
            "query": tok_part.get("query_rule") or f"query position {tok_part.get('query_position')}",
            "target": tok_part.get("target", "n/a"), "baseline": acc.fmt(tok_part.get("baseline_logprob")),
            "masked": acc.fmt(tok_part.get("masked_context_logprob")),
            "interval": tok_part.get("interval", "not recorded"),
            "table": table(["method", "layer", "MoRF area", "LeRF area", "difference", "95% CI", "above random"],
                           rows)}
    neu = faith.get("neuron")
    if isinstance(neu, dict) and isinstance(neu.get("methods"), dict):
        rows = []
        rnd = neu.get("random") or {}
        for method, per in neu["methods"].items():
            for layer, e in sorted((per or {}).items(), key=lambda kv: int(kv[0])):
                r = rnd.get(str(layer)) or {}
                draws = len(r.get("deltas") or [])
                rows.append([method, int(layer), e.get("k"), e.get("delta"),
                             f"{acc.fmt(r.get('delta_mean'))} ± {acc.fmt(r.get('delta_std'))}",
                             f"{acc.fmt(e.get('p_vs_random'))} ({e.get('random_at_least', '?')} of {draws} random ≥; "
                             f"p ≥ {acc.fmt(r.get('smallest_p_value'), 2)})"])
        out["neuron"] = {
            "unit": neu.get("unit", "unit"), "baseline": acc.fmt(neu.get("baseline_loss")), "tokens": neu.get("tokens"),
            "n_eval": neu.get("n_eval_windows"), "n_select": neu.get("n_select_windows"),
            "table": table(["method", "layer", "k", "Δloss", "random Δloss (mean ± std)",
                                    "Monte Carlo p vs random (floor 1/(draws+1))"], rows)}
    return out


def _ground_truth_section(results: Mapping[str, Any]) -> dict[str, Any]:
    truth = acc.part(results, "ground_truth")
    if not truth or not isinstance(truth.get("rows"), list):
        return {"missing": _missing(results, "ground_truth", "Ground truth")}
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
    return {"truth": {k: truth.get(k) for k in ("task", "seq_len", "num_pairs", "task_accuracy_queries", "n_queries",
                                                "rank_among", "interval")},
            "accuracy": acc.fmt(truth.get("task_accuracy")),
            "errors": [_error(f"{name} failed: {reason}") for name, reason in (truth.get("errors") or {}).items()],
            "table": table(["true source", "method", "layer", "top-1 hit rate [95% CI]", "MRR [95% CI]",
                            "significance"], rows)}


def _patching_section(results: Mapping[str, Any]) -> dict[str, Any]:
    """``mambascope patch``: the prompts and metric, each grid's strongest cells, attribution agreement."""
    patching = results["patching"]
    prompts = patching.get("prompts") or {}
    metric = patching.get("metric") or {}
    noise = patching.get("noise")
    corrupt = (f"the clean prompt with Gaussian noise (ν = {acc.fmt(noise.get('nu'))}) on the embeddings of "
               f"positions {noise.get('subject_positions')}" if isinstance(noise, dict) else prompts.get("corrupt"))
    setup = _tb(["", "value"], [
        ("clean prompt", prompts.get("clean")), ("corrupted", corrupt),
        ("target", tok(prompts.get("target", ""))), ("against", tok(prompts.get("corrupt_target") or "")),
        ("metric", f"{metric.get('kind')}: {metric.get('formula')}"), ("direction", patching.get("direction")),
        ("clean metric", patching.get("clean_metric")), ("corrupted metric", patching.get("corrupt_metric"))], "kv")
    attribution = patching.get("attribution") or {}
    rows = []
    for unit in patching["grids"]:
        top = ", ".join(f"{label} ({value:+.3f})" for label, value in top_cells(patching, unit))
        agree = attribution.get(unit) or {}
        rows.append([UNIT_STYLE.get(unit, (unit,))[0], top, agree.get("pearson"), agree.get("spearman"),
                     agree.get("cells")])
    return {"blocks": [setup, _note("Effect = (m_patched − m_corrupt) / (m_clean − m_corrupt): the fraction of the "
                                    "clean metric restored by patching one unit at one position."),
                       _tb(["unit", "strongest cells (layer @position token (effect))", "attribution Pearson",
                            "attribution Spearman", "cells compared"], rows)]}


def _attribution_section(results: Mapping[str, Any]) -> dict[str, Any]:
    """``mambascope attribute``: the prediction explained, each method's top tokens, its settings and timing."""
    attribution = results["attribution"]
    target = attribution.get("target") or {}
    settings = attribution.get("settings") or {}
    setup = _tb(["", "value"], [
        ("text", attribution.get("text")), ("target", tok(target.get("token", ""))),
        ("position", target.get("position")), ("chosen", target.get("chosen")),
        ("log-probability", target.get("logprob")), ("baseline (IG, occlusion)", settings.get("baseline")),
        ("IG steps", settings.get("ig_steps")), ("explained", settings.get("explained"))], "kv")
    timings = attribution.get("timings") or {}
    rows = []
    for r in attribution.get("rows") or []:
        if not isinstance(r, dict):
            continue
        top = _joined([[tok(t), text(f" @{p} {v:+.3g}")] for p, t, v in ranked(attribution, r, 5)])
        delta = r.get("convergence_delta")
        rows.append([row_label(r), top, r.get("explains"), "" if delta is None else f"{delta:+.3g}",
                     timings.get(r.get("method"))])
    failed = [_error(f"{name} failed: {reason}") for name, reason in (attribution.get("errors") or {}).items()]
    return {"blocks": [setup, _tb(["method", "most relevant tokens (@position relevance)", "explains",
                                   "IG convergence delta", "seconds (all layers)"], rows), *failed]}


FEATURES_PAGE = "features.html"  # beside report.html: the feature pages of census --dictionary


def feature_results(results: Mapping[str, Any]) -> dict[str, Any] | None:
    """The feature census of ``results`` (``census --dictionary``) as a results dict of its own (its ``layers``
    are the dictionary's features), which the report's sections and pages read like a neuron census; None
    when the run has none."""
    features = results.get("features")
    if not isinstance(features, Mapping) or not isinstance(features.get("layers"), Mapping):
        return None
    return {"model": results.get("model"), "corpus": results.get("corpus"), "errors": {}, "unit": "feature",
            **features}


def _unit_row(label: str, row: Mapping[str, Any]) -> list[Any]:
    need = row.get("types_needed") or {}
    return [label, row.get("units"), row.get("alive"), row.get("dead"), row.get("rarely_active"), row.get("positional"),
            row.get("token_detectors"), r4(row.get("share_of_alive")), r4(row.get("mean_precision")),
            row.get("tokens_covered"), need.get("median"), need.get("at_most_max_types"), need.get("at_most_20"),
            need.get("units_counted")]


def _features_section(results: Mapping[str, Any], page: str | None) -> dict[str, Any]:
    """The dictionary, its features beside the neurons of its layer (token detectors at the same precision on the
    same tokens) and where the feature pages are."""
    features = feature_results(results) or {}
    d = features.get("dictionary") or {}
    blocks = [_kv({"dictionary": d.get("path"), "kind": d.get("kind"), "reads": d.get("hook_in"),
                   "writes": d.get("hook_out"), "latents (d_sae)": d.get("d_sae"), "k": d.get("k"),
                   "logit effects": features.get("logit_effects")})]
    vs = features.get("versus_neurons")
    if isinstance(vs, Mapping):
        c = vs.get("criteria") or {}
        blocks.append(Block("h3", f"Features versus the neurons of layer {vs.get('layer')}"))
        blocks.append(Block("muted", f"Token detectors at precision >= {c.get('min_precision')} (<= "
                                     f"{c.get('max_types')} types covering >= {c.get('coverage')} of the unit's "
                                     f"activations, >= {c.get('min_occurrences')} occurrences), on the same "
                                     f"{vs.get('tokens')} tokens. Types to cover: how many token types cover "
                                     f"{c.get('coverage')} of a unit's activations, whatever their precision "
                                     "(units with enough activations)."))
        blocks.append(_tb(["units", "count", "alive", "dead", "rarely active", "positional", "token detectors",
                           "detectors / alive", "mean precision", "tokens covered", "types to cover: median",
                           f"<= {c.get('max_types')} types", "<= 20 types", "units with enough activations"],
                          [_unit_row("neurons", vs.get("neurons") or {}),
                           _unit_row("features", vs.get("features") or {})]))
    else:
        blocks.append(_note("No side-by-side with neurons: the dictionary's layer has no neuron census in this run."))
    for layer, r in acc.layer_items(features):
        dets = r.get("token_detectors") or []
        rows = [[Frag("link", f"L{layer} F{det['neuron']}", href=f"{page}#neuron-{layer}-{det['neuron']}")
                 if page else text(f"L{layer} F{det['neuron']}"),
                 _joined([[tok(t)] for t in det.get("token_strings") or []]), r4(min(det.get("precision") or [0])),
                 r4(det.get("coverage"))] for det in dets[:MAX_DETECTOR_ROWS]]
        blocks.append(Block("h3", f"Token-detector features of layer {layer}: {len(dets)}"))
        if rows:
            blocks.append(_tb(["feature", "trigger tokens", "min precision", "coverage"], rows))
    return {"blocks": blocks, "page": page}


def _neurons_section(results: Mapping[str, Any], partial: Mapping[str, Any] | None) -> dict[str, Any]:
    layers = acc.layer_items(results)
    if not layers:
        return _no_census(results)
    examples = []
    for layer, r in layers:
        for label, neurons in (("token detector", [d["neuron"] for d in r.get("token_detectors") or []]),
                               ("positional", r.get("positional_neurons") or []),
                               ("rarely active", r.get("rarely_active") or [])):
            if neurons:
                examples.append([link(layer, neurons[0]), text(f" ({label})")])
    missing = []
    first = layers[0][1]
    for key, label in (("top_contexts", "top-activating contexts"), ("logit_effects", "logit effects"),
                       ("attention_rows", "hidden-attention rows")):
        if not any(isinstance(r.get(key), dict) for _, r in layers):
            if key == "attention_rows" and (first.get("arch") == "gpt2" or acc.arch(results) == "gpt2"):
                continue
            missing.append(label)
    return {"examples": _joined(examples[:12]),
            "missing": _note("Not computed in this run: " + ", ".join(missing) + ".") if missing else None,
            "partial": partial}


def _marks(entry: Mapping[str, Any]) -> str:
    return "".join(m for b, m in (("random", " R"), ("recency", " C")) if (entry.get(f"beats_{b}") or {}).get("mrr"))


def _leaderboard_section(results: Mapping[str, Any]) -> dict[str, Any]:
    """``mambascope leaderboard``: per task model, every method's hit@1 / MRR, knockout effect and time; ΔA^F."""
    board = results["leaderboard"]
    blocks = [_note("Value / key: the position of the token to recall / of the matching key. R, C: the MRR beats "
                    "random, recency (paired 95% bootstrap interval above 0). Knockout effect: the drop in the "
                    "answer's log-prob when the method's top-ranked context token is knocked out of every later "
                    "token in every SSM layer (scan term) and attention layer. Time: per query, every layer of a "
                    "per-layer method together (docs/methods.md, \"The leaderboard\").")]
    for name, model in (board.get("models") or {}).items():
        ref = (model.get("knockout_reference") or {}).get("value")
        blocks.append(_note(f"{name} ({model.get('arch')}, task {model.get('task')}): accuracy "
                            f"{acc.fmt(model.get('task_accuracy'))}, {model.get('n_queries')} queries; knockout "
                            f"effect of the true value {_interval(ref)}"))
        rows = [[r.get("method"), "–" if r.get("layer") is None else r.get("layer"),
                 _interval(r["value"].get("hit_rate")), _interval(r["value"].get("mrr")) + _marks(r["value"]),
                 _interval(r["key"].get("hit_rate")), _interval(r["key"].get("mrr")) + _marks(r["key"]),
                 _interval(r.get("knockout_effect")), f"{1000 * float(r.get('seconds_per_query') or 0):.1f}"]
                for r in model.get("rows") or []]
        blocks.append(_tb(["method", "layer", "value hit@1", "value MRR", "key hit@1", "key MRR",
                           "knockout effect", "ms / query"], rows))
        blocks += [_note(f"{m}: does not apply ({why})") for m, why in (model.get("not_applicable") or {}).items()]
        blocks += [_error(f"{m} failed: {why}") for m, why in (model.get("errors") or {}).items()]
    for name, flip in (board.get("flipping") or {}).items():
        blocks.append(_note(f"{name}: ΔA^F = A(LeRF) − A(MoRF) at {flip.get('n_positions')} context-dependent "
                            f"positions (of {flip.get('scanned')} windows of {flip.get('window')} tokens); flipped to "
                            f"{flip.get('flip_to')}"))
        blocks.append(_tb(["method", "metric", "A(MoRF)", "A(LeRF)", "ΔA^F", "s / position"],
                          [[r.get("method"), r.get("metric"), _interval(r.get("a_morf")), _interval(r.get("a_lerf")),
                            _interval(r.get("delta_a_f")), f"{float(r.get('seconds_per_position') or 0):.3f}"]
                           for r in flip.get("rows") or []]))
    blocks += [_error(f"{m} failed: {why}") for m, why in (board.get("errors") or {}).items()]
    return {"blocks": blocks}


def _errors_section(results: Mapping[str, Any], skipped: dict[str, str]) -> dict[str, Any]:
    rows = [[name, reason] for name, reason in acc.errors(results).items()]
    att = acc.attention_part(results)
    rows += [[f"attention_neurons: {name}", reason] for name, reason in ((att or {}).get("errors") or {}).items()]
    faith = acc.faithfulness_part(results)
    rows += [[f"faithfulness: {name}", reason] for name, reason in ((faith or {}).get("errors") or {}).items()]
    incomplete = results.get("incomplete")
    return {"table": table(["analysis", "reason"], rows) if rows else None,
            "incomplete": [str(x) for x in incomplete] if isinstance(incomplete, list) else [],
            "skipped": table(["figure", "reason"], list(skipped.items())) if skipped else None}


def report_context(results: Mapping[str, Any], figures: Sequence[Path], skipped: Mapping[str, str],
                   figure_src: Callable[[Path], str],
                   partial: Mapping[str, Any] | None = None, features_page: str | None = FEATURES_PAGE
                   ) -> dict[str, Any]:
    """Everything the report template shows except the neuron data: the sections as plain data, in page order.

    ``figure_src(path) -> str`` gives an image's ``src`` (a data: URI here, a URL in the server)."""
    skipped = dict(skipped)
    paths = [Path(p) for p in figures]
    sections = {
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
        "neurons": _neurons_section(results, partial),
        "errors": _errors_section(results, skipped),
    }
    has_patching = isinstance(results.get("patching"), dict) and isinstance(results["patching"].get("grids"), dict)
    if has_patching:
        sections["patching"] = _patching_section(results)
    has_attribution = isinstance(results.get("attribution"), dict) and isinstance(results["attribution"].get("rows"),
                                                                                   list)
    if has_attribution:
        sections["attribution"] = _attribution_section(results)
    has_leaderboard = isinstance(results.get("leaderboard"), dict) and isinstance(results["leaderboard"].get("models"),
                                                                                   dict)
    if has_leaderboard:
        sections["leaderboard"] = _leaderboard_section(results)
    has_features = feature_results(results) is not None
    if has_features:
        sections["features"] = _features_section(results, features_page)
    optional = {"patching": has_patching, "attribution": has_attribution, "leaderboard": has_leaderboard,
                "features": has_features}
    headings = {sid: label for sid, label in SECTIONS.items() if optional.get(sid, True)}
    figs = {sid: _figures(sid, paths, skipped, figure_src) for sid in [*headings, "other"]}
    corpus = results.get("corpus") if isinstance(results.get("corpus"), dict) else {}
    arch = acc.arch(results)
    return {"sections": sections, "headings": headings, "figs": figs, "name": acc.model_name(results),
            "subtitle": ", ".join(str(x) for x in (arch, corpus.get("name"), corpus.get("split")) if x)}


# ---------------------------------------------------------------------------------- neurons embedded

def _n_neurons(results: Mapping[str, Any]) -> int:
    return sum(int(r.get("n_neurons") or 0) for _, r in acc.layer_items(results))


def embedded_neuron_data(results: Mapping[str, Any], store: Any = None, max_neurons: int = EMBED_ALL_MAX,
                         per_layer: int = TOP_NEURONS) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the neuron pages' JSON, None) when the model has at most ``max_neurons`` neurons; above that, (the
    JSON with the detail of :func:`top_neurons` of each layer only, {per_layer, total, max, message})."""
    total = _n_neurons(results)
    if total <= max_neurons:
        return neuron_data(results, store), None
    data = neuron_data(results, store, top_neurons(results, store, per_layer))
    message = (f"This report embeds the full pages (contexts, logit effects, attention rows) of the top {per_layer} "
               f"neurons of each layer only: the model has {total:,} neurons, above the {max_neurons:,} a "
               "self-contained report embeds. Statistics are shown for every neuron. To open every neuron page, "
               "run: mambascope serve DIR (DIR: this report's output directory).")
    partial = {"per_layer": per_layer, "total": total, "max": max_neurons, "message": message}
    return dict(data, partial=partial), partial


# ------------------------------------------------------------------------------------------ render

def render_report(results: Mapping[str, Any], out_dir: str | Path, figures: Sequence[str | Path] | None = None, *,
                  store: Any = None, max_embedded_neurons: int = EMBED_ALL_MAX,
                  top_per_layer: int = TOP_NEURONS) -> Path:
    """Write ``out_dir/report.html`` (one self-contained file) and return its path.

    ``figures``: PNG paths to embed (e.g. from :func:`create_comprehensive_report`; a :class:`FigureSet`
    also carries the reasons of the figures not drawn).  None draws them into ``out_dir/figures``.
    ``store``: the run's ``NeuronStore`` when ``results`` is the slim results.json (per-neuron fields read
    from it).  Models with more than ``max_embedded_neurons`` neurons get the full pages of
    ``top_per_layer`` neurons per layer and a note on how to open the rest with ``mambascope serve``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if figures is None:
        figures = create_comprehensive_report(results, out_dir / "figures")
    skipped = dict(getattr(figures, "skipped", {}) or {})
    data, partial = embedded_neuron_data(results, store, max_embedded_neurons, top_per_layer)
    page = environment().get_template("report.html").render(
        **report_context(results, [Path(p) for p in figures], skipped, _data_uri, partial),
        served=False, css=static_text("report.css"), js=static_text("neurons.js"), neuron_data=data)
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    features = feature_results(results)
    if features is not None:
        render_feature_pages(features, out_dir, store=store)
    return path


def render_feature_pages(features: Mapping[str, Any], out_dir: str | Path, *, store: Any = None) -> Path:
    """Write ``out_dir/features.html``: the report's page layout over the feature census (``feature_results``):
    its dead, positional and detector sections, and a page per feature (the neuron pages' layout, "feature" for
    "neuron").  ``store``: the run's neuron store when ``features`` is slim (its features' store is read)."""
    from mambascope.results.store import FEATURE_STORE_DIR, NeuronStore

    feature_store = None if store is None else NeuronStore(store.directory, FEATURE_STORE_DIR)
    data, partial = embedded_neuron_data(features, feature_store)
    context = report_context(features, [], {}, _data_uri, partial, features_page=None)
    d = features.get("dictionary") or {}
    context["name"] = f"{context['name']}: features of {d.get('hook_in')} ({d.get('d_sae')} latents, k = {d.get('k')})"
    page = environment().get_template("report.html").render(
        **context, served=False, css=static_text("report.css"), js=static_text("neurons.js"),
        neuron_data={**data, "unit": "feature"})
    path = Path(out_dir) / FEATURES_PAGE
    path.write_text(page, encoding="utf-8")
    return path


def render_comparison_report(comparison: Mapping[str, Any], out_dir: str | Path,
                             figures: Mapping[str, Any] | None = None) -> Path:
    """Write ``out_dir/comparison.html``: one self-contained page with the comparison section (models,
    per-layer table by relative depth, one figure per statistic, failures by name)."""
    out_dir = Path(out_dir)
    model_keys = ("arch", "n_layers", "d_model", "d_inner", "parameters", "analysed_tokens", "text_characters",
                  "text_tokens", "chars_per_token", "loss")
    models = table(["model", *model_keys],
                   [[name, *[r4(m.get(k)) if isinstance(m.get(k), float) else m.get(k) for k in model_keys]]
                    for name, m in comparison.get("models", {}).items()])
    rows = comparison.get("layers", [])
    columns = [c for c in (rows[0] if rows else {}) if c not in ("arch",)]
    layers = table(columns, [[r4(r.get(c)) if isinstance(r.get(c), float) else r.get(c) for c in columns]
                             for r in rows])
    images, notes = [], []
    for stat, path in (figures or {}).items():
        if isinstance(path, Path) and path.exists():
            images.append(Figure(stat, path.name, _data_uri(path)))
        else:
            notes.append(_note(f"Figure '{stat}' not drawn: {path}"))
    page = environment().get_template("comparison.html").render(
        css=static_text("report.css"), corpus=comparison.get("corpus", {}), models=models, layers=layers,
        images=images, notes=notes,
        errors=[_error(f"{name}: {reason}") for name, reason in comparison.get("errors", {}).items()])
    path = out_dir / "comparison.html"
    path.write_text(page, encoding="utf-8")
    return path
