"""Read-only accessors over a results dict (docs/design.md §8), shared by the figures and the HTML report.

The report never runs a model: everything comes from ``results.json`` and the neuron store.  Where each
part is comes from ``mambascope.results.layout`` (re-exported here); these helpers add what the report
shows: *why* a part is absent (from ``results["errors"]``), titles, number formatting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from mambascope.results.layout import arch, attention_part, census_part, layer_items, model_name, num, part

__all__ = ["STAGE_KEYS", "arch", "attention_part", "census_part", "detector_strings", "detector_tokens_by_layer",
           "errors", "faithfulness_part", "finite", "fmt", "layer_items", "missing_reason", "model_name", "num",
           "part", "title"]

# Where each analysis's failure is recorded in results["errors"] (the pipeline's stage names first).
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "census": ("census",),
    "ablation": ("ablation", "interventions", "census"),
    "pruning": ("pruning", "interventions", "census"),
    "attention_neurons": ("attention_neurons", "attention"),
    "faithfulness": ("faithfulness", "attention_neurons", "attention"),
}

def faithfulness_part(results: Mapping[str, Any]) -> dict[str, Any] | None:
    """The faithfulness result (inside the attention summary, or top-level); None when absent."""
    att = attention_part(results)
    value = att.get("faithfulness") if att else None
    if not isinstance(value, dict):
        value = part(results, "faithfulness")
    return value if isinstance(value, dict) else None


def errors(results: Mapping[str, Any]) -> dict[str, str]:
    """``results["errors"]`` as {name: reason} (strings)."""
    value = results.get("errors")
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def missing_reason(results: Mapping[str, Any], analysis: str) -> str:
    """Why ``analysis`` has no data: its recorded error, a stage that never ran, or not computed."""
    errs = errors(results)
    keys = STAGE_KEYS.get(analysis, (analysis,))
    if analysis == "faithfulness":
        att = attention_part(results)
        att_errors = att.get("errors") if att else None
        if isinstance(att_errors, dict) and "faithfulness" in att_errors:
            return f"failed: {att_errors['faithfulness']}"
    for key in keys:
        if key in errs:
            return f"failed ({key}): {errs[key]}"
    incomplete = results.get("incomplete")
    if isinstance(incomplete, list):
        for key in keys:
            if key in incomplete:
                return f"did not run: the run stopped before the '{key}' stage"
    if analysis == "census" and (results.get("layers") or census_part(results)):
        return ("results.json has a census, but no layer with the census fields (n_neurons, activation_frequency, "
                "dead_neurons) that this version of mambascope reads")
    return f"not computed in this run (results.json has no '{analysis}')"


def title(results: Mapping[str, Any], what: str, layer: int | str | None = None) -> str:
    """Figure title: "<model> (<arch>) — <what>[, layer <l>]"."""
    a = arch(results)
    head = model_name(results) + (f" ({a})" if a else "")
    return f"{head} — {what}" + (f", layer {layer}" if layer is not None else "")


def finite(values: Sequence[Any] | None) -> list[float]:
    """The finite numbers of ``values`` (None / NaN dropped)."""
    out = []
    for v in values or []:
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
    return out


def fmt(value: Any, digits: int = 4) -> str:
    """A number to ``digits`` significant digits ("n/a" for None / NaN); other values as str."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else "n/a"
    if value is None:
        return "n/a"
    return str(value)


def detector_strings(layer: Mapping[str, Any]) -> dict[int, str]:
    """token id -> decoded string, from a layer's detectors (``token_strings`` next to ``tokens``)."""
    out: dict[int, str] = {}
    for det in layer.get("token_detectors") or []:
        for t, s in zip(det.get("tokens") or [], det.get("token_strings") or [], strict=False):
            out[int(t)] = str(s)
    return out


def detector_tokens_by_layer(results: Mapping[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(layer, {covered, new, n_new, cumulative}) per census layer: the recorded
    ``detector_tokens_by_layer`` (aligned with the layers in order), else computed from ``tokens_covered``."""
    layers = layer_items(results)
    recorded = census_part(results).get("detector_tokens_by_layer")
    if isinstance(recorded, list) and len(recorded) == len(layers):
        return [(layer, entry) for (layer, _), entry in zip(layers, recorded, strict=True)]
    seen: set[int] = set()
    out = []
    for layer, r in layers:
        here = {int(t) for t in r.get("tokens_covered") or []}
        new = sorted(here - seen)
        seen |= here
        out.append((layer, {"covered": len(here), "new": new, "n_new": len(new), "cumulative": len(seen)}))
    return out
