"""The results directory: ``results.json``, the per-neuron table, ``figures/`` (docs/design.md §8, §13).

A run writes into a staging directory next to the destination and saves ``results.json`` after every
finished stage, so an interrupted run keeps what it finished.  The destination is replaced only at the
end (or at the interrupt), never half-overwritten; an existing one is refused unless ``overwrite``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import torch


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


class ResultsDir:
    """Staged output directory.  Use ``save(results)`` after each stage and ``commit()`` at the end."""

    def __init__(self, path: str | Path, overwrite: bool = False):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"output directory {self.path} exists; pass --overwrite to replace it")
        parent = self.path.resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        if not os.access(parent, os.W_OK):
            raise PermissionError(f"cannot write to {parent}")
        self.staging = parent / f".{self.path.name}.partial-{os.getpid()}"
        if self.staging.exists():
            shutil.rmtree(self.staging)

    def _ensure(self) -> Path:
        (self.staging / "figures").mkdir(parents=True, exist_ok=True)
        return self.staging

    @property
    def figures(self) -> Path:
        return self._ensure() / "figures"

    def file(self, name: str) -> Path:
        return self._ensure() / name

    def save(self, results: dict) -> None:
        tmp = self._ensure() / "results.json.tmp"
        tmp.write_text(json.dumps(to_jsonable(results), indent=1, allow_nan=False))
        tmp.replace(self.staging / "results.json")

    def save_table(self, table: pd.DataFrame, stem: str = "neurons") -> Path:
        """Parquet, or CSV where pyarrow cannot write the table."""
        try:
            path = self._ensure() / f"{stem}.parquet"
            table.to_parquet(path, index=False)
        except (ImportError, ValueError):
            path = self.staging / f"{stem}.csv"
            table.to_csv(path, index=False)
        return path

    def discard(self) -> None:
        """Drop the staged files (a run that failed before finishing anything)."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def commit(self) -> Path:
        self._ensure()
        if self.path.exists():
            shutil.rmtree(self.path)
        self.staging.replace(self.path)
        return self.path


def load_results(path: str | Path) -> dict:
    """Read ``results.json`` from a results directory (or the file itself)."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no results.json in {path}")
    return json.loads(file.read_text())
