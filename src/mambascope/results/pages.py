"""The compact per-neuron JSON that the neuron pages render from (:func:`neuron_data`): the static report
embeds it, and ``NeuronStore.layer_payload`` serves it one layer at a time (``store`` below is a
``mambascope.results.store.NeuronStore``; not imported, the store imports this module).

Size: per-neuron floats are rounded to 4 significant digits; the activation arrays of the contexts, the
logit effects and the attention rows are int16 relative to each neuron's largest |value| (base64), and
the context tokens are stored once per corpus window they come from.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mambascope.results import layout

__all__ = ["TOP_NEURONS", "neuron_data", "r4", "r4list", "top_neurons"]

TOP_NEURONS = 100  # neurons per layer whose pages a size-capped report embeds (``top_neurons``)
DETAIL = ("top_contexts", "logit_effects", "attention_rows")  # the fields a neuron page reads per neuron


def r4(value: Any) -> float | None:
    """Rounded to 4 significant digits; None for None / NaN / inf."""
    v = layout.num(value)
    if v is None:
        return None
    return float(f"{v:.4g}")


def r4list(values: Sequence[Any] | None) -> list[float | None] | None:
    return None if values is None else [r4(v) for v in values]


def _q16(values: Sequence[Any]) -> tuple[str, float]:
    """(base64 of little-endian int16 = round(v / scale · 32767), scale = max |v|); None → −32768."""
    arr = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    scale = float(np.abs(finite).max()) if finite.size else 0.0
    q = np.full(arr.shape, -32768, dtype="<i2")
    ok = np.isfinite(arr)
    if scale > 0:
        q[ok] = np.clip(np.round(arr[ok] / scale * 32767), -32767, 32767).astype("<i2")
    else:
        q[ok] = 0
    return base64.b64encode(q.tobytes()).decode("ascii"), float(f"{scale:.6g}")


class _Strings:
    """Interned token strings: each distinct string stored once, referenced by index."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.index: dict[str, int] = {}

    def __call__(self, s: Any) -> int:
        s = "" if s is None else str(s)
        i = self.index.get(s)
        if i is None:
            i = self.index[s] = len(self.items)
            self.items.append(s)
        return i


def _valid_contexts(tc: Any, E: int) -> bool:
    return (isinstance(tc, dict) and all(isinstance(tc.get(k), list) and len(tc[k]) == E
                                          for k in ("values", "tokens", "activations"))
            and isinstance(tc.get("width"), int))


def _window_table(layers: list[tuple[int, dict]], sid: _Strings,
                  embedded: Mapping[int, set[int] | None]) -> dict[int, dict[int, int]] | None:
    """Token (string index) at each (window, position) the top contexts show, or None when the contexts
    cannot be keyed that way (no window ids, or two contexts disagree) and are stored explicitly."""
    table: dict[int, dict[int, int]] = {}
    for layer, r in layers:
        tc = r.get("top_contexts")
        if not _valid_contexts(tc, r.get("n_neurons", -1)):
            continue
        windows, positions = tc.get("windows"), tc.get("positions")
        if not isinstance(windows, list) or not isinstance(positions, list):
            return None
        keep = embedded.get(layer)
        for e, contexts in enumerate(tc["tokens"]):
            if keep is not None and e not in keep:
                continue
            for j, tokens in enumerate(contexts):
                try:
                    win, pos = int(windows[e][j]), int(positions[e][j])
                except (IndexError, TypeError, ValueError):
                    return None
                if win < 0 or pos < 0:
                    return None
                row = table.setdefault(win, {})
                start = pos - (len(tokens) - 1)
                for i, s in enumerate(tokens):
                    p = start + i
                    if p < 0:
                        continue
                    k = sid(s)
                    if row.setdefault(p, k) != k:
                        return None
    return table


def _layer_payload(r: dict[str, Any], arch: str | None, sid: _Strings, keyed: bool,
                   importance: dict[str, list[float | None]], embedded: set[int] | None) -> dict[str, Any]:
    E = int(r.get("n_neurons") or len(r.get("activation_frequency") or []))
    keep = (lambda e: True) if embedded is None else embedded.__contains__
    activity = r.get("activity") or {}
    positional = r.get("positional") or {}
    d: dict[str, Any] = {
        "E": E, "tokens": r.get("tokens"),
        "freq": r4list(r.get("activation_frequency")), "mi": r4list(r.get("positional_mi")),
        "corr": r4list(positional.get("position_correlation")),
        "mp": r4list(activity.get("mean_post")), "map": r4list(activity.get("mean_abs_post")),
        "mpa": r4list(activity.get("mean_post_active")),
        "mi_thr": positional.get("positional_threshold"),
        "dead": list(r.get("dead_neurons") or []), "rare": list(r.get("rarely_active") or []),
        "pos": list(r.get("positional_neurons") or []),
    }
    ranks = {s["neuron"]: s.get("suppression_rank") for s in (r.get("suppression") or {}).get("detectors") or []}
    d["det"] = [[det["neuron"], [sid(s) for s in det.get("token_strings") or det.get("tokens") or []],
                 r4list(det.get("precision")), r4(det.get("coverage")), det.get("counts"),
                 ranks.get(det["neuron"])] for det in r.get("token_detectors") or []]
    delta = r.get("delta")
    if isinstance(delta, dict) and delta.get("selectivity"):
        n_units = int(delta.get("n_units") or len(delta["selectivity"]))
        top = [[t["index"], rank + 1, [[sid(x.get("string", x.get("token"))), r4(x.get("mean_dt")), x.get("count")]
                                       for x in t.get("top_tokens") or []]]
               for rank, t in enumerate(r.get("delta_sensitive") or [])]
        d["delta"] = {"unit": delta.get("unit", "channel"), "per": max(1, E // max(1, n_units)),
                      "mean": r4list(delta.get("mean")), "std": r4list(delta.get("std")),
                      "sel": r4list(delta.get("selectivity")), "top": top}
    else:
        d["delta"] = None
    d["imp"] = {m: v for m, v in importance.items() if len(v) == E}

    tc = r.get("top_contexts")
    if _valid_contexts(tc, E):
        W = int(tc["width"])
        ctx: dict[str, Any] = {"k": tc.get("k"), "w": W, "v": [], "a": [], "s": []}
        if keyed:
            ctx["wp"] = [[int(x) for pair in zip(w, p, strict=False) for x in pair] if keep(e) else None
                         for e, (w, p) in enumerate(zip(tc["windows"], tc["positions"], strict=True))]
        else:
            ctx["t"] = [[[sid(s) for s in tokens] for tokens in contexts] if keep(e) else None
                        for e, contexts in enumerate(tc["tokens"])]
        for e in range(E):
            if not keep(e):
                for key in ("v", "a", "s"):
                    ctx[key].append(None)
                continue
            flat = []
            for values in tc["activations"][e]:
                values = list(values)[-W:]
                flat.extend([None] * (W - len(values)) + values)
            b64, scale = _q16(flat)
            ctx["v"].append(r4list(tc["values"][e]))
            ctx["a"].append(b64)
            ctx["s"].append(scale)
        d["ctx"] = ctx
    else:
        d["ctx"] = None

    le = r.get("logit_effects")
    if isinstance(le, dict) and all(isinstance(le.get(k), list) and len(le[k]) == E
                                    for k in ("promoted", "promoted_values", "suppressed", "suppressed_values")):
        lg: dict[str, Any] = {"p": [], "n": [], "v": [], "s": []}
        for e in range(E):
            if not keep(e):
                for key in ("p", "n", "v", "s"):
                    lg[key].append(None)
                continue
            lg["p"].append([sid(s) for s in le["promoted"][e]])
            lg["n"].append([sid(s) for s in le["suppressed"][e]])
            b64, scale = _q16(list(le["promoted_values"][e]) + list(le["suppressed_values"][e]))
            lg["v"].append(b64)
            lg["s"].append(scale)
        d["logit"] = lg
    else:
        d["logit"] = None

    ar = r.get("attention_rows")
    if isinstance(ar, dict) and all(isinstance(ar.get(k), list) for k in ("neurons", "tokens", "values")):
        unit = "head" if r.get("arch", arch) == "mamba2" else "channel"  # the layer's neuron kind on a hybrid
        at: dict[str, Any] = {"unit": unit, "index": {}, "t": [], "v": [], "s": []}
        first = tc["tokens"] if _valid_contexts(tc, E) else None
        rows = [row for row in zip(ar["neurons"], ar["tokens"], ar["values"], strict=True) if keep(int(row[0]))]
        for i, (n, tokens, values) in enumerate(rows):
            at["index"][str(int(n))] = i
            same = bool(first) and 0 <= int(n) < E and first[int(n)] and list(first[int(n)][0]) == list(tokens)
            at["t"].append(0 if same else [sid(s) for s in tokens])
            b64, scale = _q16(values)
            at["v"].append(b64)
            at["s"].append(scale)
        d["attn"] = at
    else:
        d["attn"] = None
    if embedded is not None:
        d["embedded"] = sorted(embedded)
    return d


def _importance_from_results(results: Mapping[str, Any]) -> dict[int, dict[str, list[float | None]]]:
    importance: dict[int, dict[str, list[float | None]]] = {}
    att = layout.attention_part(results)
    if att and isinstance(att.get("results"), dict):
        for method, per in att["results"].items():
            for layer, entry in (per or {}).items():
                if (isinstance(entry, dict) and entry.get("unit") == "channel"
                        and isinstance(entry.get("importance"), list)):
                    importance.setdefault(int(layer), {})[method] = r4list(entry["importance"])
    return importance


def _importance_from_store(store: Any, layer: int) -> dict[str, list[float | None]]:
    per: dict[str, list[tuple[int, Any]]] = {}
    for row in store.records("attention_neurons", layer):
        if row.get("unit_kind") == "channel":
            per.setdefault(row["method"], []).append((row["unit"], row["importance"]))
    return {method: r4list([v for _, v in sorted(rows)]) for method, rows in per.items()}


def _in_store(r: Mapping[str, Any]) -> bool:
    """Whether a layer dict's neuron-page fields were left in the neuron store."""
    return any(str(path).split(".")[0] in DETAIL for path in r.get("in_store") or [])


def neuron_data(results: Mapping[str, Any], store: Any = None,
                layers_neurons: Mapping[int, Sequence[int] | None] | None = None) -> dict[str, Any]:
    """The compact per-neuron JSON the report's neuron pages render from.

    ``{"model", "arch", "strings": [token strings], "windows": {window: [string index per position]},
    "layers": {layer: {...}}}``; per layer the neuron count ``E``, columnar statistics (``freq``, ``mi``,
    ``corr``, ``mp``/``map``/``mpa`` mean post / |post| / post while active; 4 significant digits), the
    group lists (``dead``, ``rare``, ``pos``), detectors ``det`` [[neuron, [string], [precision],
    coverage, [count], [suppression rank]]], ``delta`` (per-unit Δ statistics and the top-k), ``imp``
    (attention-neuron importance per method, channel units only), and ``ctx`` / ``logit`` / ``attn``
    (None when not computed) whose float arrays are base64 int16 relative to a per-neuron scale.

    ``store``: a ``NeuronStore`` of the run; the per-neuron fields are read from it (``results`` may be
    the slim results.json).  ``layers_neurons`` {layer: neurons or None}: only these layers, and of each
    the detail (``ctx``, ``logit``, ``attn``) of only those neurons (None: all); such a layer lists them in
    ``embedded`` and has null entries for the others.  Statistics always cover every neuron.
    """
    sid = _Strings()
    chosen = None if layers_neurons is None else {int(k) for k in layers_neurons}
    embedded = {int(k): None if v is None else {int(e) for e in v} for k, v in (layers_neurons or {}).items()}
    layers = [(layer, r) for layer, r in layout.layer_items(results) if chosen is None or layer in chosen]
    if store is not None:
        layers = [(layer, store.layer_result(layer, r, neurons=None if embedded.get(layer) is None
                                             else sorted(embedded[layer])) if "in_store" in r else r)
                  for layer, r in layers]
        importance = {layer: _importance_from_store(store, layer) for layer, _ in layers}
    else:
        stored = [layer for layer, r in layers if _in_store(r)]
        if stored:
            raise ValueError(f"the neuron-page fields of layer {stored[0]} are in the neuron store: pass "
                             "neuron_data(results, NeuronStore(directory))")
        importance = _importance_from_results(results)
    arch = layout.arch(results)
    table = _window_table(layers, sid, embedded)
    out_layers = {str(layer): _layer_payload(r, arch, sid, table is not None, importance.get(layer, {}),
                                             embedded.get(layer))
                  for layer, r in layers}
    windows = {}
    for win, row in (table or {}).items():
        seq = [-1] * (max(row) + 1)
        for p, k in row.items():
            seq[p] = k
        windows[str(win)] = seq
    return {"model": layout.model_name(results), "arch": arch, "strings": sid.items, "windows": windows,
            "layers": out_layers}


def top_neurons(results: Mapping[str, Any], store: Any = None,
                k: int = TOP_NEURONS) -> dict[int, list[int]]:
    """{layer: up to ``k`` neurons, ascending} whose pages a size-capped report embeds.

    Criterion: first the neurons the report's summary links to (token detectors, the highest-MI positional
    neurons ``positional_top``, the first neuron of each Δ-sensitive unit, each attention method's
    ``top_neurons`` on channel units), then the others by peak |post| of their top contexts, largest first.
    """
    attention: dict[int, list[int]] = {}
    att = layout.attention_part(results)
    for per in ((att or {}).get("results") or {}).values():
        for layer, entry in (per or {}).items():
            if isinstance(entry, dict) and entry.get("unit") == "channel":
                attention.setdefault(int(layer), []).extend((entry.get("top_neurons") or {}).get("indices") or [])
    summary = store.table(["layer", "neuron", "token_detector", "peak_abs_post"]) if store is not None else None
    out = {}
    for layer, r in layout.layer_items(results):
        E = int(r["n_neurons"])
        if summary is not None:
            rows = summary[summary["layer"] == layer].sort_values("neuron")
            detectors = rows.loc[rows["token_detector"].astype(bool), "neuron"].tolist()
            peak = [None if v != v else float(v) for v in rows["peak_abs_post"].tolist()]
        else:
            detectors = [d["neuron"] for d in r.get("token_detectors") or []]
            values = (r.get("top_contexts") or {}).get("values") or [[] for _ in range(E)]
            peak = [max((abs(v) for v in vs if v is not None), default=None) for vs in values]
        per = max(1, E // int((r.get("delta") or {}).get("n_units") or E))
        linked = [*detectors, *((r.get("positional") or {}).get("positional_top") or {}).get("neurons", []),
                  *(int(d["index"]) * per for d in r.get("delta_sensitive") or []), *attention.get(layer, [])]
        rest = sorted(range(E), key=lambda e: -(peak[e] if peak[e] is not None else -1.0))
        chosen = list(dict.fromkeys(int(e) for e in [*linked, *rest] if 0 <= int(e) < E))[:k]
        out[layer] = sorted(chosen)
    return out
