"""Where each part of a results dict is (docs/design.md §8, docs/results.md), and reading results.json.

``run_analysis`` keeps the per-layer census at the top-level ``layers`` and the rest of the census under
``census``; ``run_census`` alone nests ``layers``, ``ablation`` and ``pruning`` inside its own dict.  The
report, the neuron pages and the neuron store all find the parts through these accessors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REQUIRED_KEYS = ("model", "corpus", "errors")  # what every results.json has (report/results_schema.json)
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


def num(value: Any) -> float | None:
    """A finite float, or None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def read_results_file(path: str | Path) -> dict:
    """``results.json`` as written (per-neuron fields not put back), checked to be a results file.

    Raises FileNotFoundError / ValueError naming the file for a missing, unreadable or malformed file.
    """
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no results.json in {path}: give a directory written by mambascope analyze, "
                                "census or attention")
    if file.is_dir():
        raise ValueError(f"{file} is a directory, not a results file")
    try:
        results = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not a text file; expected mambascope's results.json") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                         "rerun the analysis to rewrite it") from None
    if not isinstance(results, dict):
        kind = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(results),
                                                                                                 "null")
        raise ValueError(f"{file} is not a mambascope results file: it holds a JSON {kind}, not an object")
    missing = [key for key in REQUIRED_KEYS if key not in results]
    if missing:
        raise ValueError(f"{file} is not a mambascope results file: it lacks {', '.join(missing)}")
    return results
