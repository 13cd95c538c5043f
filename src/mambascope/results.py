"""The results directory: ``results.json``, the per-neuron table, ``figures/`` (docs/design.md §8).

Writing goes through :class:`mambascope.outputs.OutputDir` (staged, swapped in when complete); every file
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

from mambascope.outputs import write_atomic

REQUIRED_KEYS = ("model", "corpus", "errors")  # what every results.json has (report/results_schema.json)


def to_jsonable(value: Any) -> Any:
    """Tensors to lists, NaN/inf floats to None (JSON has neither), tuples to lists, keys to strings."""
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.tolist())
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
    from mambascope.store import slim_results, write_store

    jsonable = to_jsonable(results)
    return save_json(directory / "results.json", write_store(directory, jsonable) if store else slim_results(jsonable))


def load_results(path: str | Path, detail: bool = False) -> dict:
    """Read ``results.json`` from a results directory (or the file itself), checked to be one, with the
    per-neuron fields of its neuron store put back (``store.hydrate``; ``detail``: also the top contexts,
    logit effects and attention rows).  A results.json of an older version (everything inline) is returned
    as it is.

    Raises FileNotFoundError / ValueError naming the file for a missing, unreadable or malformed file or store.
    """
    results = read_results_file(path)
    from mambascope.store import NeuronStore, has_store, hydrate

    if not has_store(results):
        return results
    path = Path(path)
    return hydrate(results, NeuronStore(path if path.is_dir() else path.parent), detail)


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
