"""Read-only accessors over a results dict (docs/design.md §8), shared by the figures and the HTML report.

The report never runs a model: everything comes from ``results.json``.  These helpers find each part
where the pipeline puts it (``run_analysis`` keeps the per-layer census at the top-level ``layers`` and
the rest of the census under ``census``; ``run_census`` alone nests ``layers``, ``ablation`` and
``pruning`` inside its own dict) and say *why* a part is absent, from ``results["errors"]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# Where each analysis's failure is recorded in results["errors"] (the pipeline's stage names first).
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "census": ("census",),
    "ablation": ("ablation", "interventions", "census"),
    "pruning": ("pruning", "interventions", "census"),
    "attention_neurons": ("attention_neurons", "attention"),
    "faithfulness": ("faithfulness", "attention_neurons", "attention"),
}

_LAYER_KEYS = ("n_neurons", "activation_frequency", "dead_neurons")


def census_part(results: Mapping[str, Any]) -> dict[str, Any]:
    """``results["census"]`` as a dict ({} when absent, None or failed)."""
    value = results.get("census")
    return value if isinstance(value, dict) else {}


def _is_layer_map(value: Any) -> bool:
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(v, dict) and any(k in v for k in _LAYER_KEYS) for v in value.values()))


def layer_items(results: Mapping[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """The per-layer census results as (layer, dict), by layer index; [] when there is no census.

    Looks at the top-level ``layers`` (``run_analysis``), then ``census["layers"]`` (``run_census``),
    and also accepts a bare ``run_census`` dict as ``results``.
    """
    for candidate in (results.get("layers"), census_part(results).get("layers")):
        if _is_layer_map(candidate):
            return sorted(((int(k), v) for k, v in candidate.items()), key=lambda kv: kv[0])
    return []


def part(results: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """A top-level analysis dict (``ablation``, ``pruning``, ``attention_neurons``, ...), also looked up
    inside ``census``; None when absent."""
    value = results.get(name)
    if not isinstance(value, dict):
        value = census_part(results).get(name)
    return value if isinstance(value, dict) else None


def attention_part(results: Mapping[str, Any]) -> dict[str, Any] | None:
    """The attention-neuron summary (``run_attention_analysis``), or the seed's
    ``analysis_results["attention_neurons"]``; None when absent."""
    value = part(results, "attention_neurons")
    if value is None:
        nested = results.get("analysis_results")
        if isinstance(nested, dict) and isinstance(nested.get("attention_neurons"), dict):
            value = nested["attention_neurons"]
    return value


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
    return f"not computed in this run (results.json has no '{analysis}')"


def model_name(results: Mapping[str, Any]) -> str:
    """The model's name as recorded (``model.name``), or "model"."""
    model = results.get("model")
    return str(model.get("name") or "model") if isinstance(model, dict) else "model"


def arch(results: Mapping[str, Any]) -> str | None:
    """"mamba" | "mamba2" | "gpt2" from ``model.arch``, a census layer, or the attention summary."""
    model = results.get("model")
    if isinstance(model, dict) and model.get("arch"):
        return str(model["arch"])
    for _, layer in layer_items(results):
        if layer.get("arch"):
            return str(layer["arch"])
    att = attention_part(results)
    return str(att["arch"]) if att and att.get("arch") else None


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


def num(value: Any) -> float | None:
    """A finite float, or None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


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
