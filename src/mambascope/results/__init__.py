"""The results directory: ``results.json``, the neuron store ``store/`` (``mambascope.results.store``), the
per-neuron table, ``figures/`` (docs/design.md §8).

Writing goes through :class:`mambascope.results.outputs.OutputDir` (staged, swapped in when complete); every file
here is itself written atomically, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mambascope.results.layout import REQUIRED_KEYS, read_results_file
from mambascope.results.outputs import write_atomic

__all__ = ["REQUIRED_KEYS", "load_results", "open_results", "read_results_file", "save_json", "save_results",
           "save_table", "to_jsonable"]


def to_jsonable(value: Any) -> Any:
    """Tensors to lists, NaN/inf floats to None (JSON has neither), tuples to lists, keys to strings."""
    if isinstance(value, torch.Tensor):
        finite = not value.is_floating_point() or bool(torch.isfinite(value).all())
        # a finite tensor's tolist() is already JSON (floats and ints, nested lists): no element-wise walk
        return value.tolist() if finite else to_jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return to_jsonable(value.item())
    return value


def save_json(path: Path, value: Any) -> Path:
    """``value`` as JSON at ``path``, atomically (NaN/inf written as null)."""
    write_atomic(path, json.dumps(to_jsonable(value), indent=1, allow_nan=False))
    return path


def save_table(directory: Path, table: pd.DataFrame, stem: str = "neurons") -> Path:
    """``directory/stem.parquet`` (CSV where pyarrow cannot write the table), atomically."""
    for suffix, write in ((".parquet", table.to_parquet), (".csv", table.to_csv)):
        path = directory / f"{stem}{suffix}"
        tmp = directory / f".{stem}{suffix}.tmp-{os.getpid()}"
        try:
            write(tmp, index=False)
        except (ImportError, ValueError):
            tmp.unlink(missing_ok=True)
            continue
        os.replace(tmp, path)
        return path
    raise ValueError(f"cannot write the {stem} table as Parquet or CSV")


def save_results(directory: Path, results: dict[str, Any], *, store: bool = True) -> Path:
    """``directory/results.json`` with the per-neuron fields in ``directory/store/`` (``store.write_store``),
    the store first so that a results.json never names a store older than itself.  ``store=False``: only
    results.json is rewritten (the per-neuron fields have not changed since the last save)."""
    from mambascope.results.store import slim_results, write_store

    jsonable = to_jsonable(results)
    return save_json(directory / "results.json", write_store(directory, jsonable) if store else slim_results(jsonable))


def load_results(path: str | Path, detail: bool = False) -> dict:
    """Read ``results.json`` from a results directory (or the file itself), checked to be one, with the
    per-neuron fields of its neuron store put back (``store.hydrate``; ``detail``: also the top contexts,
    logit effects and attention rows).  A results.json of an older version (everything inline) is returned
    as it is.

    Raises FileNotFoundError / ValueError naming the file for a missing, unreadable or malformed file or store.
    """
    return open_results(path, detail)[0]


def open_results(path: str | Path, detail: bool = False) -> tuple[dict, Any]:
    """:func:`load_results` and the run's ``NeuronStore`` (None for an older, all-inline results.json), for
    callers that read the remaining per-neuron detail from the store as they need it."""
    results = read_results_file(path)
    from mambascope.results.store import NeuronStore, has_store, hydrate

    if not has_store(results):
        return results, None
    path = Path(path)
    store = NeuronStore(path if path.is_dir() else path.parent)
    return hydrate(results, store, detail), store
