"""The neuron store: every per-neuron field of a results dict as Parquet tables beside ``results.json``.

``results.json`` keeps the run's summaries and per-layer aggregates; the per-neuron lists (statistics, top
contexts, logit effects, hidden-attention rows, detector triggers, Δ statistics, attention-neuron
importance) move to ``DIR/store/`` (schema: docs/results.md, "The neuron store").  Each dict they left
names them in ``in_store`` (dotted paths relative to it), so :func:`hydrate` puts back exactly what the
pipeline computed.

Parquet (pyarrow, already a dependency): no server, one file per table that pandas / polars / duckdb read
as is, and the detail table is partitioned by layer, sorted by neuron, in row groups of
``ROW_GROUP`` neurons, so that one neuron is one row-group read.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mambascope.results.layout import read_results_file
from mambascope.results.outputs import write_atomic
from mambascope.results.pages import neuron_data

FORMAT = "mambascope-neuron-store"
VERSION = 1
STORE_DIR = "store"
# a sparse dictionary's features (results["features"], docs/features.md): a store of their own, the same tables
# with "neuron" meaning the feature index; unit ids "L:fI"
FEATURE_STORE_DIR = "store-features"
ROW_GROUP = 32  # neurons per row group of the detail table: one lookup decodes 32 neurons' contexts

# per-layer path -> summary column: [E] lists, one value per neuron
SUMMARY_FIELDS = {
    "activation_frequency": "frequency", "positional_mi": "positional_mi",
    "activity.active_count": "active_count", "activity.mean_post": "mean_post",
    "activity.mean_abs_post": "mean_abs_post", "activity.mean_post_active": "mean_post_active",
    "positional.positional_mi_plugin": "positional_mi_plugin", "positional.positional_p_value": "positional_p_value",
    "positional.position_correlation": "position_correlation", "detectors.activations": "detector_activations",
}
# group lists (sorted neuron indices) -> boolean summary column
GROUP_FIELDS = {"dead_neurons": "dead", "rarely_active": "rarely_active", "positional_neurons": "positional"}
DELTA_KEYS = ("mean", "std", "mean_log", "selectivity")  # delta.<key>: [n_units], repeated over a unit's neurons
# per-layer path -> detail column: [E] lists of per-neuron lists
DETAIL_FIELDS = {
    "top_contexts.values": "context_values", "top_contexts.windows": "context_windows",
    "top_contexts.positions": "context_positions", "top_contexts.tokens": "context_tokens",
    "top_contexts.activations": "context_activations",
    "logit_effects.promoted": "promoted", "logit_effects.promoted_values": "promoted_values",
    "logit_effects.suppressed": "suppressed", "logit_effects.suppressed_values": "suppressed_values",
}
ATTENTION_ROW_COLUMNS = {"tokens": "attention_tokens", "values": "attention_values"}
RECORD_FIELDS = {"token_detectors": "detectors", "suppression.detectors": "suppression"}  # lists of records
# [n_top][T] per-position frequency of the highest-MI neurons: grows with the window, so stored by neuron
POSITIONAL_TOP = "positional.positional_top.frequency_by_position"
ATTENTION_KEYS = ("activation", "importance")
TOKEN_SCHEMA = pa.schema([("layer", pa.int64()), ("neuron", pa.int64()), ("token", pa.string()),
                          ("source", pa.string()), ("count", pa.int64()), ("precision", pa.float64()),
                          ("mean_activation", pa.float64())])  # attention_neurons.results[method][layer].<key>: [units]


class StoreError(ValueError):
    """The neuron store is missing a table or a layer it lists, or a file of it cannot be read."""


# what pyarrow raises for a truncated or corrupted file: ArrowInvalid (no footer, bad metadata), OSError (a
# decompression failure, a short read), ArrowNotImplementedError / ArrowTypeError (garbage decoded as a type)
_DAMAGE = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OSError)


def _damaged(path: Path, exc: BaseException) -> StoreError:
    if isinstance(exc, PermissionError):
        return StoreError(f"cannot read the neuron store's {path}: permission denied")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return StoreError(f"the neuron store is damaged: {path} cannot be read ({first}); rerun the analysis that "
                      "wrote it (mambascope analyze / census)")


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


# -- dotted paths ----------------------------------------------------------------------------------------

def _get(d: Mapping[str, Any], path: str) -> Any:
    for key in path.split("."):
        if not isinstance(d, Mapping) or key not in d:
            return None
        d = d[key]
    return d


def _put(d: dict[str, Any], path: str, value: Any) -> None:
    *head, last = path.split(".")
    for key in head:
        d = d.setdefault(key, {})
    d[last] = value


def _pop(d: dict[str, Any], path: str) -> None:
    *head, last = path.split(".")
    for key in head:
        d = d[key]
    del d[last]


def _copy_path(d: dict[str, Any], path: str) -> None:
    """Copy the dicts along ``path`` so that popping from them leaves the caller's dict intact."""
    for key in path.split(".")[:-1]:
        d[key] = dict(d[key])
        d = d[key]


# -- splitting a layer -----------------------------------------------------------------------------------

def _is_list(value: Any, n: int) -> bool:
    return isinstance(value, list) and len(value) == n


def _ngram_paths(layer: Mapping[str, Any]) -> dict[str, str]:
    orders = _get(layer, "detectors.ngram_coverage") or {}
    return {f"detectors.ngram_coverage.{n}.{key}": f"ngram_{key}_{n}" for n in orders
            for key in ("needed", "needed_lower")}


def _delta_per_unit(layer: Mapping[str, Any], E: int) -> int | None:
    """Neurons per Δ unit (1 on Mamba-1, head_dim on Mamba-2), or None when there is no per-unit Δ."""
    delta = layer.get("delta")
    n = delta.get("n_units") if isinstance(delta, Mapping) else None
    if not isinstance(n, int) or n < 1 or E % n:
        return None
    return E // n


def _split_layer(layer: int, r: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, list], dict[str, list],
                                                          dict[str, list[dict]]]:
    """(slim layer dict, summary columns, detail columns, record lists) of one census layer."""
    E = int(r["n_neurons"])
    slim = dict(r)
    moved: list[str] = []
    summary: dict[str, list] = {"layer": [layer] * E, "neuron": list(range(E))}
    detail: dict[str, list] = {"neuron": list(range(E))}
    records: dict[str, list[dict]] = {}

    def move(path: str) -> None:
        _copy_path(slim, path)
        _pop(slim, path)
        moved.append(path)

    for path, column in {**SUMMARY_FIELDS, **_ngram_paths(r)}.items():
        if _is_list(_get(r, path), E):
            summary[column] = list(_get(r, path))
            move(path)
    for path, column in GROUP_FIELDS.items():
        members = r.get(path)
        if isinstance(members, list) and members == sorted(set(members)) and all(0 <= e < E for e in members):
            flags = [False] * E
            for e in members:
                flags[e] = True
            summary[column] = flags
            move(path)
    per = _delta_per_unit(r, E)
    if per is not None:
        for key in DELTA_KEYS:
            values = _get(r, f"delta.{key}")
            if _is_list(values, E // per):
                summary[f"dt_{key}"] = [v for v in values for _ in range(per)]
                move(f"delta.{key}")
    for path, column in DETAIL_FIELDS.items():
        if _is_list(_get(r, path), E):
            detail[column] = list(_get(r, path))
            move(path)
    rows = r.get("attention_rows")
    if isinstance(rows, Mapping) and _attention_rows_movable(rows, E):
        for key, column in ATTENTION_ROW_COLUMNS.items():
            column_values: list[Any] = [None] * E
            for e, value in zip(rows["neurons"], rows[key], strict=True):
                column_values[e] = value
            detail[column] = column_values
        for key in ("neurons", *ATTENTION_ROW_COLUMNS):
            move(f"attention_rows.{key}")
    for path, table in RECORD_FIELDS.items():
        value = _get(r, path)
        is_records = isinstance(value, list) and all(isinstance(x, Mapping) for x in value)
        keys = [list(x) for x in value] if is_records else []
        if keys and all(k == keys[0] and "neuron" in k for k in keys):  # one kind of record: its keys come back
            records[table] = [{"layer": layer, **x} for x in value]
            slim.setdefault("store_record_keys", {})[table] = keys[0]
            move(path)
        elif value == []:
            records[table] = []
            move(path)
    top = _get(r, "positional.positional_top") or {}
    if isinstance(top.get("neurons"), list) and _is_list(top.get("frequency_by_position"), len(top["neurons"])):
        records["positional_top"] = [{"layer": layer, "neuron": e, "frequency_by_position": f}
                                     for e, f in zip(top["neurons"], top["frequency_by_position"], strict=True)]
        move(POSITIONAL_TOP)
    if "token_detectors" in moved and isinstance(r.get("tokens_covered"), list) \
            and r["tokens_covered"] == sorted({t for d in r["token_detectors"] for t in d.get("tokens", [])}):
        move("tokens_covered")  # the union of the detectors' triggers, sorted: rebuilt from the detectors table
    slim["in_store"] = moved
    return slim, summary, detail, records


def _attention_rows_movable(rows: Mapping[str, Any], E: int) -> bool:
    neurons = rows.get("neurons")
    return (isinstance(neurons, list) and neurons == sorted(set(neurons)) and all(0 <= e < E for e in neurons)
            and all(_is_list(rows.get(key), len(neurons)) for key in ATTENTION_ROW_COLUMNS))


def _derived_columns(summary: dict[str, list], detail: dict[str, list], records: dict[str, list[dict]],
                     E: int) -> None:
    """Sortable columns made from the moved fields: detector flag / tokens / best precision, peak |post|."""
    best: dict[int, dict] = {d["neuron"]: d for d in records.get("detectors", [])}
    summary["token_detector"] = [e in best for e in range(E)]
    strings = {e: d.get("token_strings") or [str(t) for t in d.get("tokens", [])] for e, d in best.items()}
    summary["detector_tokens"] = [" ".join(repr(s) for s in strings.get(e, [])) for e in range(E)]
    summary["detector_token"] = [strings[e][0] if strings.get(e) else None for e in range(E)]
    summary["detector_precision"] = [(best[e].get("precision") or [None])[0] if e in best else None for e in range(E)]
    summary["detector_coverage"] = [best[e].get("coverage") if e in best else None for e in range(E)]
    values = detail.get("context_values")
    summary["peak_abs_post"] = [max((abs(v) for v in vs if v is not None), default=None) for vs in values] \
        if values is not None else [None] * E


def _attention_table(results: dict[str, Any]) -> tuple[dict[str, Any] | None, list[dict]]:
    """(slim attention_neurons, rows (method, layer, unit, activation, importance)) of the per-unit arrays."""
    att = results.get("attention_neurons")
    if not isinstance(att, Mapping) or not isinstance(att.get("results"), Mapping):
        return att, []
    rows: list[dict] = []
    slim_results: dict[str, Any] = {}
    for method, per in att["results"].items():
        if not isinstance(per, Mapping):
            slim_results[method] = per
            continue
        slim_results[method] = {}
        for layer, entry in per.items():
            lists = {k: entry.get(k) for k in ATTENTION_KEYS} if isinstance(entry, Mapping) else {}
            n = len(lists.get("importance") or [])
            if not n or not all(_is_list(v, n) for v in lists.values()):
                slim_results[method][layer] = entry
                continue
            rows += [{"method": method, "layer": int(layer), "unit_kind": entry.get("unit"), "unit": u,
                      **{k: lists[k][u] for k in ATTENTION_KEYS}} for u in range(n)]
            slim_results[method][layer] = {**{k: v for k, v in entry.items() if k not in ATTENTION_KEYS},
                                           "in_store": list(ATTENTION_KEYS)}
    return {**att, "results": slim_results}, rows


def _token_rows(summary: dict[str, list], detail: dict[str, list], records: dict[str, list[dict]]) -> list[dict]:
    """The long (layer, neuron, token) table: detector triggers (count, precision) and top-context peaks
    (how many of the neuron's top contexts peak on the token, their mean post)."""
    layer = summary["layer"][0] if summary["layer"] else None
    rows = [{"layer": layer, "neuron": d["neuron"], "token": s, "source": "detector", "count": c,
             "precision": p, "mean_activation": None}
            for d in records.get("detectors", [])
            for s, c, p in zip(d.get("token_strings") or [str(t) for t in d.get("tokens", [])],
                               d.get("counts", []), d.get("precision", []), strict=False)]
    tokens, values = detail.get("context_tokens"), detail.get("context_values")
    if tokens is None or values is None:
        return rows
    for e, (contexts, peaks) in enumerate(zip(tokens, values, strict=True)):
        by_token: dict[str, list[float]] = {}
        for context, value in zip(contexts, peaks, strict=False):
            if context and value is not None:
                by_token.setdefault(context[-1], []).append(value)
        rows += [{"layer": layer, "neuron": e, "token": s, "source": "top_context", "count": len(vs),
                  "precision": None, "mean_activation": sum(vs) / len(vs)} for s, vs in by_token.items()]
    return rows


# -- writing ---------------------------------------------------------------------------------------------

def _concat(frames: Sequence[dict[str, list]]) -> dict[str, list]:
    """Column dicts of the layers as one, a column missing in a layer filled with nulls."""
    names = list(dict.fromkeys(name for frame in frames for name in frame))
    out: dict[str, list] = {name: [] for name in names}
    for frame in frames:
        n = len(next(iter(frame.values()))) if frame else 0
        for name in names:
            out[name].extend(frame.get(name, [None] * n))
    return out


def _records_table(rows: list[dict], key_columns: Sequence[str]) -> pa.Table:
    if not rows:
        return pa.table({name: pa.array([], pa.int64()) for name in key_columns})
    return pa.Table.from_pylist(rows)


def _write(table: pa.Table, path: Path, row_group_size: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size, compression="zstd")


def _split(results: Mapping[str, Any], store_dir: str = STORE_DIR) -> tuple[dict[str, Any], dict[str, Any]]:
    """(slim results dict, the store's tables as column dicts / row lists)."""
    slim: dict[str, Any] = dict(results)
    layers_key = "layers" if isinstance(results.get("layers"), Mapping) and results.get("layers") else None
    census = results.get("census")
    if layers_key is None and isinstance(census, Mapping) and isinstance(census.get("layers"), Mapping):
        layers_key = "census.layers"  # run_census's own layout
    layer_map: Mapping[str, Any] = _get(results, layers_key) if layers_key else {}
    summaries, details, records_by_table, tokens = [], {}, {"detectors": [], "suppression": [],
                                                             "positional_top": []}, []
    slim_layers = {}
    for key, r in layer_map.items():
        if not (isinstance(r, Mapping) and isinstance(r.get("n_neurons"), int)):
            slim_layers[key] = r
            continue
        layer = int(key)
        slim_layers[key], summary, detail, records = _split_layer(layer, r)
        _derived_columns(summary, detail, records, int(r["n_neurons"]))
        summaries.append(summary)
        details[layer] = detail
        for table, rows in records.items():
            records_by_table[table] += rows
        tokens += _token_rows(summary, detail, records)
    if layers_key == "layers":
        slim["layers"] = slim_layers
    elif layers_key:
        slim["census"] = {**census, "layers": slim_layers}
    attention, attention_rows = _attention_table(slim)
    if "attention_neurons" in results:
        slim["attention_neurons"] = attention
    seed = results.get("analysis_results")  # run_comprehensive_analysis: the same parts again under one key
    if isinstance(seed, Mapping) and seed.get("attention_neurons") == results.get("attention_neurons"):
        slim["analysis_results"] = {**seed, "attention_neurons": attention}
    summary_columns = _concat(summaries)
    _add_importance(summary_columns, attention_rows)
    slim["store"] = {"path": store_dir, "version": VERSION}
    return slim, {"layers_key": layers_key, "summary": summary_columns, "details": details,
                  "records": records_by_table, "tokens": tokens, "attention": attention_rows}


def _features(results: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """``results["features"]`` when it holds a feature census (its own ``layers``)."""
    features = results.get("features")
    return features if isinstance(features, Mapping) and isinstance(features.get("layers"), Mapping) else None


def slim_results(results: Mapping[str, Any], store_dir: str = STORE_DIR) -> dict[str, Any]:
    """What ``write_store`` returns, without writing: ``results`` less the fields the store holds."""
    slim = _split(results, store_dir)[0]
    if store_dir == STORE_DIR and _features(results) is not None:
        slim["features"] = slim_results(_features(results), FEATURE_STORE_DIR)
    return slim


def write_store(directory: str | Path, results: Mapping[str, Any], store_dir: str = STORE_DIR) -> dict[str, Any]:
    """Write the per-neuron fields of ``results`` (a ``run_analysis`` / ``run_census`` dict, JSON-ready:
    ``results.to_jsonable`` first) to ``directory/store/`` and return the slim dict for ``results.json``.
    The per-feature fields of ``results["features"]`` go the same way to ``directory/store-features/``.

    The store is built in a temporary folder beside it and swapped in whole.  The slim dict records
    ``store`` {path, version}; ``hydrate(slim, NeuronStore(directory))`` equals ``results``.
    """
    directory = Path(directory)
    features = _features(results) if store_dir == STORE_DIR else None
    if features is not None:
        results = {**results, "features": write_store(directory, features, FEATURE_STORE_DIR)}
    slim, parts = _split(results, store_dir)
    tmp = directory / f".{store_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_tables(tmp, parts)
        _swap_in(tmp, directory / store_dir)
    except BaseException:  # an interrupt or a full disk leaves the earlier store, never half of a new one
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return slim


def _write_tables(tmp: Path, parts: dict[str, Any]) -> None:
    empty = pa.table({"layer": pa.array([], pa.int64()), "neuron": pa.array([], pa.int64())})
    _write(pa.Table.from_pydict(parts["summary"]) if parts["summary"] else empty, tmp / "summary.parquet")
    for layer, detail in parts["details"].items():
        _write(pa.Table.from_pydict(detail), tmp / "neurons" / f"layer={layer}" / "part-0.parquet", ROW_GROUP)
    for table, rows in parts["records"].items():
        _write(_records_table(rows, ("layer", "neuron")), tmp / f"{table}.parquet")
    token_table = pa.Table.from_pylist(parts["tokens"], schema=TOKEN_SCHEMA).sort_by(
        [("token", "ascending"), ("layer", "ascending"), ("neuron", "ascending")])
    _write(token_table, tmp / "tokens.parquet", 4096)
    _write(_records_table(parts["attention"], ("layer", "unit")), tmp / "attention_neurons.parquet")
    manifest = {"format": FORMAT, "version": VERSION, "layers": sorted(parts["details"]),
                "n_neurons": {str(layer): len(d["neuron"]) for layer, d in sorted(parts["details"].items())},
                "row_group_size": ROW_GROUP, "layers_key": parts["layers_key"]}
    write_atomic(tmp / "manifest.json", json.dumps(manifest, indent=1))


def _add_importance(summary: dict[str, list], rows: list[dict]) -> None:
    """importance_<method> / activation_<method> per neuron, where the attention unit is the channel."""
    if not summary:
        return
    index = {(layer, neuron): i for i, (layer, neuron) in enumerate(zip(summary["layer"], summary["neuron"],
                                                                         strict=True))}
    for row in rows:
        i = index.get((row["layer"], row["unit"]))
        if row["unit_kind"] != "channel" or i is None:
            continue
        for key in ATTENTION_KEYS:
            summary.setdefault(f"{key}_{row['method']}", [None] * len(index))[i] = row[key]


def _swap_in(tmp: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.replaced-{os.getpid()}")  # not ".old-": that names an output swap
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


# -- reading ---------------------------------------------------------------------------------------------

class NeuronStore:
    """Read access to ``DIR/store/`` of an analysis output directory ``DIR``.

    ``layers``: the census layers; ``n_neurons``: neurons over all of them.  Raises FileNotFoundError when
    ``DIR`` has no store and ValueError when the store has another format version.  ``store_dir``
    ``FEATURE_STORE_DIR``: the store of a dictionary's features (``census --dictionary``), whose "neurons" are
    the features and whose ``results`` is ``results.json``'s ``features``.
    """

    def __init__(self, directory: str | Path, store_dir: str = STORE_DIR) -> None:
        self.directory = Path(directory)
        self.store_dir = store_dir
        self.path = self.directory / store_dir
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"no neuron store in {self.directory} (no {store_dir}/manifest.json): give "
                                    "a directory written by mambascope analyze or census"
                                    + (" --dictionary" if store_dir == FEATURE_STORE_DIR else ""))
        try:
            self.manifest = json.loads(manifest.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{manifest} is not a neuron-store manifest; rerun the analysis") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest} is not a mambascope neuron-store manifest; rerun the analysis")
        if self.manifest.get("version") != VERSION:
            raise ValueError(f"{self.path} is neuron-store version {self.manifest.get('version')}; this mambascope "
                             f"reads version {VERSION}: rerun the analysis")
        missing = [key for key in ("layers", "n_neurons") if key not in self.manifest]
        if missing:
            raise ValueError(f"{manifest} lacks {', '.join(missing)}: not a complete neuron-store manifest; "
                             "rerun the analysis")
        self.layers: list[int] = [int(layer) for layer in self.manifest["layers"]]
        self._sizes = {int(k): int(v) for k, v in self.manifest["n_neurons"].items()}
        self.n_neurons: int = sum(self._sizes.values())
        # the footer of each layer's detail file, parsed once, and the identity of the file it was read from
        self._footers: dict[int, tuple[pq.FileMetaData, tuple[int, int, int, int]]] = {}
        self._tables: dict[str, pa.Table] = {}
        self._layer_columns: dict[int, dict[str, list]] = {}
        self._payloads: dict[int, dict[str, Any]] = {}

    def __repr__(self) -> str:
        return f"NeuronStore({str(self.directory)!r}: {len(self.layers)} layers, {self.n_neurons} neurons)"

    # -- tables ------------------------------------------------------------------------------------------
    def _read(self, name: str, columns: Sequence[str] | None = None, filters: Any = None) -> pa.Table:
        path = self.path / f"{name}.parquet"
        if not path.is_file():
            raise StoreError(f"the neuron store {self.path} lacks {path.name}; rerun the analysis")
        try:  # pq.read_table opens its own reader: safe from several threads at once
            return pq.read_table(path, columns=list(columns) if columns is not None else None, filters=filters)
        except _DAMAGE as exc:
            raise _damaged(path, exc) from None

    @cached_property
    def _summary_arrow(self) -> pa.Table:
        return self._read("summary")

    @cached_property
    def _summary(self) -> pd.DataFrame:
        return self._summary_arrow.to_pandas()

    def _layer_summary(self, layer: int) -> dict[str, list]:
        """The summary columns of one layer as plain lists (ints stay ints, nulls None), by neuron."""
        if layer not in self._layer_columns:
            table = self._summary_arrow.filter(pc.equal(self._summary_arrow["layer"], layer)).sort_by("neuron")
            self._layer_columns[layer] = table.to_pydict()
        return self._layer_columns[layer]

    def _small(self, name: str) -> pa.Table:
        """A table small enough to keep (detectors, suppression, attention_neurons), read once."""
        if name not in self._tables:
            self._tables[name] = self._read(name)
        return self._tables[name]

    def table(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """One row per (layer, neuron): every sortable statistic (docs/results.md, ``summary``)."""
        frame = self._summary
        if columns is None:
            return frame.copy()
        unknown = [c for c in columns if c not in frame.columns]
        if unknown:
            raise KeyError(f"no column {unknown[0]!r} in the neuron summary; it has {', '.join(frame.columns)}")
        return frame[list(columns)].copy()

    @cached_property
    def results(self) -> dict[str, Any]:
        """``results.json`` of the directory as written (slim, not hydrated); for a feature store, its
        ``features`` with the run's ``model``."""
        results = read_results_file(self.directory)
        if self.store_dir == FEATURE_STORE_DIR:
            return {"model": results.get("model"), **(results.get("features") or {})}
        return results

    def _check(self, layer: int, neuron: int | None = None) -> None:
        if layer not in self._sizes:
            raise KeyError(f"layer {layer} is not in the neuron store (layers {self.layers})")
        if neuron is not None and not 0 <= neuron < self._sizes[layer]:
            raise KeyError(f"neuron {neuron} is not in layer {layer} (neurons 0..{self._sizes[layer] - 1})")

    def verify(self) -> None:
        """Read the footer of every table and detail file: StoreError (one line naming the file) for a
        truncated file or one that is not Parquet, before any request needs it.  (A table file that is
        missing is named where it is needed.)"""
        for path in sorted(self.path.glob("*.parquet")):
            try:
                pq.read_metadata(path)
            except _DAMAGE as exc:
                raise _damaged(path, exc) from None
        for layer in self.layers:
            with self._detail_file(layer):
                pass

    @contextmanager
    def _detail_file(self, layer: int) -> Iterator[pq.ParquetFile]:
        """A reader of the layer's detail file for one read.

        A ``ParquetFile`` is not safe to share between threads (a server's request threads: pyarrow's read
        cache then raises or crashes the process), so every read opens the file anew, parsing its footer only
        the first time: no file stays open between reads (a reader per thread is about as fast but keeps a
        file per thread and layer open; a lock serialises the reads: benchmarks/bench_serve.py --readers).
        A file replaced since its footer was read (a rerun into DIR while it is served) is refused rather than
        decoded with the old footer."""
        path = self.path / "neurons" / f"layer={layer}" / "part-0.parquet"
        if not path.is_file():
            raise StoreError(f"the neuron store {self.path} lacks the detail of layer {layer}; rerun the analysis")
        try:
            with pa.OSFile(str(path)) as source:
                identity = _identity(os.fstat(source.fileno()))
                if layer not in self._footers:
                    self._footers[layer] = pq.read_metadata(source), identity
                footer, first = self._footers[layer]
                if identity != first:
                    raise StoreError(f"{path} changed after it was first read (a new analysis into "
                                     f"{self.directory}?): open the directory again (restart mambascope serve)")
                yield pq.ParquetFile(source, metadata=footer)
        except _DAMAGE as exc:
            raise _damaged(path, exc) from None

    def detail(self, layer: int, neurons: Sequence[int] | None = None) -> pa.Table:
        """The detail rows (top contexts, logit effects, attention row) of ``neurons`` of ``layer`` (all: None),
        in neuron order.  Safe to call from several threads at once."""
        self._check(layer)
        with self._detail_file(layer) as file:
            if neurons is None:
                return file.read()
            groups = sorted({int(e) // ROW_GROUP for e in neurons})
            table = file.read_row_groups(groups) if groups else file.schema_arrow.empty_table()
        wanted = pa.array(sorted({int(e) for e in neurons}), pa.int64())
        return table.filter(pc.is_in(table["neuron"], value_set=wanted))

    def records(self, table: str, layer: int | None = None) -> list[dict]:
        """Rows of ``detectors`` / ``suppression`` / ``positional_top`` / ``attention_neurons`` (one layer or
        all), in stored order."""
        rows = self._small(table)
        if layer is not None:
            rows = rows.filter(pc.equal(rows["layer"], layer))
        return rows.to_pylist()

    # -- the API of the neuron pages ---------------------------------------------------------------------
    def neuron(self, layer: int, neuron: int) -> dict[str, Any]:
        """Every per-neuron detail of (layer, neuron) as plain JSON values: ``summary`` (its summary row),
        ``top_contexts``, ``logit_effects``, ``attention_row`` (None when not computed), ``token_detector`` and
        ``suppression`` (None unless it is a detector), ``delta`` (its Δ unit's statistics, with its rank
        among the Δ-sensitive units), ``attention`` {method: {unit, activation, importance}}.
        """
        self._check(layer, neuron)
        columns = self._layer_summary(layer)
        out: dict[str, Any] = {"layer": layer, "neuron": neuron,
                               "summary": {name: values[neuron] for name, values in columns.items()}}
        detail = self.detail(layer, [neuron]).to_pylist()[0]
        tc = {key.removeprefix("context_"): detail.get(key) for key in DETAIL_FIELDS.values()
              if key.startswith("context_")}
        layer_result = (self.results.get("layers") or _get(self.results, "census.layers") or {}).get(str(layer), {})
        out["top_contexts"] = {**{k: v for k, v in (layer_result.get("top_contexts") or {}).items()
                                  if k != "in_store"}, **tc} if detail.get("context_values") is not None else None
        out["logit_effects"] = ({k: detail[k] for k in ("promoted", "promoted_values", "suppressed",
                                                        "suppressed_values")}
                                if detail.get("promoted") is not None else None)
        out["attention_row"] = ({"tokens": detail["attention_tokens"], "values": detail["attention_values"]}
                                if detail.get("attention_values") is not None else None)
        out["token_detector"] = self._record("detectors", layer, neuron)
        out["suppression"] = self._record("suppression", layer, neuron)
        out["delta"] = _delta_entry(layer_result, out["summary"], neuron)
        out["attention"] = {r["method"]: {k: r[k] for k in ("unit_kind", "unit", *ATTENTION_KEYS)}
                            for r in self.records("attention_neurons", layer) if r["unit"] == _attention_unit(
                                r, neuron, layer_result)}
        return out

    def _record(self, table: str, layer: int, neuron: int) -> dict | None:
        rows = [r for r in self.records(table, layer) if r["neuron"] == neuron]
        return {k: v for k, v in rows[0].items() if k != "layer"} if rows else None

    def by_token(self, token: str, k: int = 20) -> pd.DataFrame:
        """The neurons that fire most on the token string ``token`` (exact, e.g. ``" the"``), best first:
        detectors of it by precision then count, then neurons whose top contexts peak on it by how many do
        and their mean |post|.  Columns: layer, neuron, token, source, count, precision, mean_activation."""
        rows = self._read("tokens", filters=[("token", "=", token)]).to_pandas()
        if rows.empty:
            return rows.reset_index(drop=True)
        rows["_detector"] = rows["source"] == "detector"
        rows["_abs"] = rows["mean_activation"].abs()
        rows = rows.sort_values(["_detector", "precision", "count", "_abs", "layer", "neuron"],
                                ascending=[False, False, False, False, True, True], na_position="last")
        rows = rows.drop_duplicates(["layer", "neuron"]).head(k)
        return rows.drop(columns=["_detector", "_abs"]).reset_index(drop=True)

    def layer_payload(self, layer: int, neurons: Sequence[int] | None = None) -> dict[str, Any]:
        """``report.neuron_data`` for this one layer (its neuron pages' payload), built from the store;
        ``neurons``: embed the detail of only these (None: all)."""
        self._check(layer)
        if neurons is not None:
            return neuron_data(self.results, self, {layer: neurons})
        if layer not in self._payloads:  # a server asks for the same layer again and again
            self._payloads[layer] = neuron_data(self.results, self, {layer: None})
        return self._payloads[layer]

    # -- back to the pipeline's dict ---------------------------------------------------------------------
    def layer_result(self, layer: int, slim: Mapping[str, Any], detail: bool = True,
                     neurons: Sequence[int] | None = None) -> dict[str, Any]:
        """The layer dict as the pipeline computed it, from its slim ``results.json`` entry and the store.
        ``detail=False`` leaves out top contexts, logit effects and attention rows; ``neurons``: only
        their detail is filled in (the others get empty lists)."""
        self._check(layer)
        r = dict(slim)
        moved = list(r.pop("in_store", []))
        record_keys = r.pop("store_record_keys", {})
        E = self._sizes[layer]
        summary = self._layer_summary(layer)
        detail_table = self.detail(layer, neurons) if detail and any(
            p.split(".")[0] in ("top_contexts", "logit_effects", "attention_rows") for p in moved) else None
        detail_rows = _detail_columns(detail_table, E) if detail_table is not None else None
        columns = {**SUMMARY_FIELDS, **_ngram_paths_from(moved)}
        per = _delta_per_unit(r, E)
        left: list[str] = []
        for path in moved:
            value: Any
            _copy_path(r, path)
            if path in columns:
                value = summary[columns[path]]
            elif path in GROUP_FIELDS:
                value = [e for e, flag in zip(summary["neuron"], summary[GROUP_FIELDS[path]], strict=True) if flag]
            elif path.startswith("delta."):
                value = summary[f"dt_{path.split('.')[1]}"][::per]
            elif path == POSITIONAL_TOP:
                value = [x["frequency_by_position"] for x in self.records("positional_top", layer)]
            elif path in RECORD_FIELDS:
                keys = record_keys.get(RECORD_FIELDS[path], [])
                value = [{k: x[k] for k in keys} for x in self.records(RECORD_FIELDS[path], layer)]
            elif path == "tokens_covered":
                value = sorted({t for d in self.records("detectors", layer) for t in d.get("tokens") or []})
            elif detail_rows is None:
                left.append(path)  # still in the store: neuron_data reads it from there
                continue
            elif path in DETAIL_FIELDS:
                value = detail_rows[DETAIL_FIELDS[path]]
            elif path == "attention_rows.neurons":
                value = [e for e, v in enumerate(detail_rows["attention_values"]) if v is not None]
            else:
                column = detail_rows[ATTENTION_ROW_COLUMNS[path.split(".")[1]]]
                value = [v for v in column if v is not None]
            _put(r, path, value)
        if left:
            r["in_store"] = left
        return r


def _detail_columns(table: pa.Table, E: int) -> dict[str, list]:
    """Detail columns as [E] lists; neurons not in ``table`` get [] (None for the attention row)."""
    rows = {int(e): i for i, e in enumerate(table["neuron"].to_pylist())}
    out = {}
    for name in table.column_names:
        if name == "neuron":
            continue
        values = table[name].to_pylist()
        empty = None if name in ATTENTION_ROW_COLUMNS.values() else []
        out[name] = [values[rows[e]] if e in rows else empty for e in range(E)]
    return out


def _ngram_paths_from(moved: Sequence[str]) -> dict[str, str]:
    out = {}
    for path in moved:
        parts = path.split(".")
        if len(parts) == 4 and parts[:2] == ["detectors", "ngram_coverage"]:
            out[path] = f"ngram_{parts[3]}_{parts[2]}"
    return out


def _attention_unit(row: Mapping[str, Any], neuron: int, layer_result: Mapping[str, Any]) -> int:
    """The attention unit of ``neuron``: itself for channel units, else its head (neuron // head size)."""
    if row.get("unit_kind") == "channel":
        return neuron
    E = layer_result.get("n_neurons")
    n_units = layer_result.get("delta", {}).get("n_units") if isinstance(layer_result.get("delta"), dict) else None
    return neuron // (E // n_units) if E and n_units else -1


def _delta_entry(layer_result: Mapping[str, Any], summary: Mapping[str, Any], neuron: int) -> dict[str, Any] | None:
    delta = layer_result.get("delta")
    if not isinstance(delta, Mapping) or summary.get("dt_selectivity") is None:
        return None
    E = int(layer_result["n_neurons"])
    per = E // int(delta["n_units"])
    unit = neuron // per
    ranked = layer_result.get("delta_sensitive") or []
    rank = next((i + 1 for i, d in enumerate(ranked) if d.get("index") == unit), None)
    top = next((d.get("top_tokens") for d in ranked if d.get("index") == unit), None)
    return {"unit": delta.get("unit"), "index": unit, **{k: summary.get(f"dt_{k}") for k in DELTA_KEYS},
            "sensitive_rank": rank, "top_tokens": top}


def has_store(results: Mapping[str, Any]) -> bool:
    """Whether ``results`` is a slim results dict whose per-neuron fields live in a neuron store."""
    return isinstance(results.get("store"), Mapping)


def hydrate(results: Mapping[str, Any], store: NeuronStore, detail: bool = True) -> dict[str, Any]:
    """The results dict as the pipeline computed it: ``results`` (slim, from ``results.json``) with every
    field the store holds put back (``detail=False``: all but top contexts, logit effects and attention
    rows, which are the bulk on a large model)."""
    out = {k: v for k, v in results.items() if k != "store"}
    features = results.get("features")
    if store.store_dir == STORE_DIR and isinstance(features, Mapping) and has_store(features):
        out["features"] = hydrate(features, NeuronStore(store.directory, FEATURE_STORE_DIR), detail)
    key = store.manifest.get("layers_key")
    layers = _get(results, key) if key else None
    if isinstance(layers, Mapping):
        full = {name: store.layer_result(int(name), r, detail) if isinstance(r, Mapping) and "in_store" in r else r
                for name, r in layers.items()}
        if key == "layers":
            out["layers"] = full
        else:
            out["census"] = {**results["census"], "layers": full}
    att = results.get("attention_neurons")
    if isinstance(att, Mapping) and isinstance(att.get("results"), Mapping):
        rows: dict[tuple[str, int], list[dict]] = {}
        for row in store.records("attention_neurons"):
            rows.setdefault((row["method"], row["layer"]), []).append(row)
        full_results = {}
        for method, per in att["results"].items():
            full_results[method] = {layer: _attention_entry(entry, rows.get((method, int(layer)), []))
                                    for layer, entry in per.items()} if isinstance(per, Mapping) else per
        out["attention_neurons"] = {**att, "results": full_results}
        seed = results.get("analysis_results")
        if isinstance(seed, Mapping) and seed.get("attention_neurons") == att:
            out["analysis_results"] = {**seed, "attention_neurons": out["attention_neurons"]}
    return out


def _attention_entry(entry: Any, rows: list[dict]) -> Any:
    if not isinstance(entry, Mapping) or "in_store" not in entry:
        return entry
    rows = sorted(rows, key=lambda r: r["unit"])
    return {**{k: v for k, v in entry.items() if k != "in_store"},
            **{k: [r[k] for r in rows] for k in entry["in_store"]}}
