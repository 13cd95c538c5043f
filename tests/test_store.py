"""The neuron store: round trip against the pipeline's in-memory results, the slim results.json, the reader API.

The results are real runs of the pipeline (tests/report_fixtures.py: random Mamba-1 / GPT-2 with loosened
census thresholds so that every neuron group is non-empty; ``run_census``'s own layout; a Mamba-2 census).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest

from mambascope.report import neuron_data, results_schema
from mambascope.report.neuron_payload import top_neurons
from mambascope.results import load_results, read_results_file, save_json, save_results, to_jsonable
from mambascope.results.store import NeuronStore, hydrate, write_store
from report_fixtures import census_results, gpt2_results, mamba_results

MAKERS = {"mamba": mamba_results, "gpt2": gpt2_results, "census": census_results}


def _layers(results: dict) -> dict:
    return results.get("layers") or results["census"]["layers"]


def _saved(tmp_path: Path, results: dict) -> tuple[dict, NeuronStore]:
    save_results(tmp_path, results)
    return read_results_file(tmp_path), NeuronStore(tmp_path)


@pytest.mark.parametrize("name", MAKERS)
def test_every_field_comes_back_from_the_store(name, tmp_path):
    results = MAKERS[name]()
    slim, store = _saved(tmp_path, results)
    for r in _layers(slim).values():  # the per-neuron lists left results.json
        assert "activation_frequency" not in r and "token_detectors" not in r and "dead_neurons" not in r
        assert set(r["top_contexts"]) == {"k", "width"} and "promoted" not in r["logit_effects"]
        assert "frequency_by_position" not in r["positional"]["positional_top"]  # [n_top][window]
    assert hydrate(slim, store) == results
    assert load_results(tmp_path, detail=True) == results


def test_the_groups_are_really_non_empty():
    """So that the round trip above covers detectors, suppression, groups, attention rows and Δ."""
    layers = mamba_results()["layers"].values()
    for key in ("token_detectors", "rarely_active", "positional_neurons"):
        assert any(r[key] for make in MAKERS.values() for r in _layers(make()).values()), key
    assert all(r["suppression"]["detectors"] and r["attention_rows"]["neurons"] and r["delta"]["selectivity"]
               for r in layers)


def test_mamba2_delta_per_head_round_trip(small_checkpoints, tmp_path):
    from mambascope.data import load_corpus, tokenize_windows
    from mambascope.models import load_model
    from mambascope.pipeline import model_info, run_census

    model, tok = load_model(small_checkpoints["mamba2"], device="cpu")
    windows = tokenize_windows(load_corpus("builtin", "validation").texts[:100], tok, 32, max_tokens=32 * 8).ids
    census = run_census(model, tok, windows, ablation=False, progress=False)
    results = json.loads(json.dumps(to_jsonable({"model": model_info(model, "m2"), "corpus": {}, "errors": {},
                                                  "layers": census.pop("layers"), "census": census})))
    _, store = _saved(tmp_path, results)
    assert load_results(tmp_path, detail=True) == results
    r = results["layers"]["1"]
    per = r["n_neurons"] // r["delta"]["n_units"]
    assert per == 8
    neuron = store.neuron(1, 19)
    assert neuron["delta"]["index"] == 2 and neuron["delta"]["selectivity"] == r["delta"]["selectivity"][2]


def test_neuron_is_every_detail_of_one_neuron(tmp_path):
    results = mamba_results()
    _, store = _saved(tmp_path, results)
    r = results["layers"]["1"]
    detector = r["token_detectors"][0]
    e = detector["neuron"]
    n = store.neuron(1, e)
    json.dumps(n, allow_nan=False)  # JSON-ready
    tc = r["top_contexts"]
    assert n["top_contexts"] == {"k": tc["k"], "width": tc["width"],
                                 **{key: tc[key][e] for key in ("values", "windows", "positions", "tokens",
                                                                "activations")}}
    assert n["logit_effects"] == {key: r["logit_effects"][key][e] for key in r["logit_effects"]}
    row = r["attention_rows"]["neurons"].index(e)
    assert n["attention_row"] == {"tokens": r["attention_rows"]["tokens"][row],
                                  "values": r["attention_rows"]["values"][row]}
    assert n["token_detector"] == detector
    assert n["suppression"] == r["suppression"]["detectors"][0]
    s = n["summary"]
    assert s["frequency"] == r["activation_frequency"][e] and s["positional_mi"] == r["positional_mi"][e]
    assert s["dead"] == (e in r["dead_neurons"]) and s["token_detector"]
    assert s["dt_selectivity"] == r["delta"]["selectivity"][e] == n["delta"]["selectivity"]
    for method, per in results["attention_neurons"]["results"].items():
        assert n["attention"][method]["importance"] == per["1"]["importance"][e]
        assert s[f"importance_{method}"] == per["1"]["importance"][e]
    with pytest.raises(KeyError, match="neuron 64 is not in layer 1"):
        store.neuron(1, r["n_neurons"])
    with pytest.raises(KeyError, match="layer 5"):
        store.neuron(5, 0)


def test_table_has_one_row_per_neuron(tmp_path):
    results = mamba_results()
    _, store = _saved(tmp_path, results)
    table = store.table()
    assert store.layers == [0, 1] and store.n_neurons == len(table) == 2 * results["layers"]["0"]["n_neurons"]
    for layer, r in results["layers"].items():
        rows = table[table["layer"] == int(layer)]
        assert rows["neuron"].tolist() == list(range(r["n_neurons"]))
        assert rows.loc[rows["rarely_active"], "neuron"].tolist() == r["rarely_active"]
        assert rows.loc[rows["positional"], "neuron"].tolist() == r["positional_neurons"]
        assert rows.loc[rows["token_detector"], "neuron"].tolist() == [d["neuron"] for d in r["token_detectors"]]
        assert rows["frequency"].tolist() == r["activation_frequency"]
    assert list(store.table(["layer", "frequency"]).columns) == ["layer", "frequency"]
    with pytest.raises(KeyError, match="no column 'nope'"):
        store.table(["nope"])


def _slow_by_token(results: dict, token: str) -> tuple[list, list]:
    """(detector rows, top-context rows) for ``token``, by a plain loop over the results dict."""
    detectors, contexts = [], []
    for layer, r in results["layers"].items():
        for d in r["token_detectors"]:
            for s, c, p in zip(d["token_strings"], d["counts"], d["precision"], strict=True):
                if s == token:
                    detectors.append((-p, -c, int(layer), d["neuron"]))
        tc = r["top_contexts"]
        for e in range(r["n_neurons"]):
            peaks = [v for ctx, v in zip(tc["tokens"][e], tc["values"][e], strict=True) if ctx[-1] == token]
            if peaks:
                contexts.append((int(layer), e, len(peaks), sum(peaks) / len(peaks)))
    return sorted(detectors), contexts


def test_by_token_agrees_with_a_slow_loop(tmp_path):
    results = mamba_results()
    _, store = _saved(tmp_path, results)
    triggers = [s for r in results["layers"].values() for d in r["token_detectors"] for s in d["token_strings"]]
    token = max(set(triggers), key=triggers.count)
    detectors, contexts = _slow_by_token(results, token)
    found = store.by_token(token, k=1000)
    top = found[found["source"] == "detector"]
    assert [(-p, -c, layer, e) for p, c, layer, e in zip(top["precision"], top["count"], top["layer"],
                                                          top["neuron"], strict=True)] == detectors[:len(top)]
    assert len(top) == len({(layer, e) for *_, layer, e in detectors})
    rest = found[found["source"] == "top_context"]
    seen = {(layer, e) for *_, layer, e in detectors}
    expected = sorted(((-n, -abs(m), layer, e) for layer, e, n, m in contexts if (layer, e) not in seen))
    assert [(-n, -abs(m), layer, e) for n, m, layer, e in zip(rest["count"], rest["mean_activation"],
                                                              rest["layer"], rest["neuron"], strict=True)] \
        == expected
    assert len(store.by_token(token, k=3)) == 3
    assert store.by_token("a token no corpus has \u2603").empty


def test_neuron_pages_read_the_same_from_the_store(tmp_path):
    results = mamba_results()
    slim, store = _saved(tmp_path, results)
    assert neuron_data(slim, store) == neuron_data(results)
    assert neuron_data(load_results(tmp_path), store) == neuron_data(results)
    with pytest.raises(ValueError, match="in the neuron store"):
        neuron_data(load_results(tmp_path))  # never "not computed" for data that exists
    assert store.layer_payload(1) == neuron_data(results, layers_neurons={1: None})


def test_a_subset_embeds_only_its_neurons(tmp_path):
    results = mamba_results()
    slim, store = _saved(tmp_path, results)
    chosen = top_neurons(results, k=5)
    assert chosen == top_neurons(slim, store, k=5) and all(len(v) == 5 for v in chosen.values())
    full = neuron_data(results)
    for part in (neuron_data(results, layers_neurons=chosen), neuron_data(slim, store, chosen)):
        for layer, neurons in chosen.items():
            d, f = part["layers"][str(layer)], full["layers"][str(layer)]
            assert d["embedded"] == neurons and d["freq"] == f["freq"]
            for e in range(d["E"]):
                assert (d["ctx"]["a"][e] == f["ctx"]["a"][e]) if e in neurons else d["ctx"]["a"][e] is None
                assert (d["logit"]["v"][e] == f["logit"]["v"][e]) if e in neurons else d["logit"]["v"][e] is None
            assert sorted(int(n) for n in d["attn"]["index"]) == neurons


def test_top_neurons_start_with_what_the_report_links_to():
    results = mamba_results()
    r = results["layers"]["1"]
    linked = {d["neuron"] for d in r["token_detectors"]}
    chosen = top_neurons(results, k=r["n_neurons"] // 2)
    assert linked <= set(chosen[1]) or len(linked) > r["n_neurons"] // 2
    peak = [max(abs(v) for v in vs) for vs in r["top_contexts"]["values"]]
    rest = [e for e in range(r["n_neurons"]) if e not in chosen[1]]
    others = [e for e in chosen[1] if e not in linked]
    if rest and others:
        assert min(peak[e] for e in others) >= max(peak[e] for e in rest) or set(others) - set(
            r["positional"]["positional_top"]["neurons"])


def test_missing_or_foreign_store_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no neuron store in") as info:
        NeuronStore(tmp_path)
    assert "\n" not in str(info.value)
    save_results(tmp_path, mamba_results())
    manifest = tmp_path / "store" / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(ValueError, match="version 99") as info:
        NeuronStore(tmp_path)
    assert "\n" not in str(info.value)
    manifest.write_text("not json")
    with pytest.raises(ValueError, match="not a neuron-store manifest"):
        load_results(tmp_path)
    manifest.unlink()
    with pytest.raises(FileNotFoundError, match="no neuron store"):
        load_results(tmp_path)


def test_slim_results_validate_against_the_schema(tmp_path):
    validator = jsonschema.Draft202012Validator(results_schema())
    for make in MAKERS.values():
        save_results(tmp_path, make())
        validator.validate(read_results_file(tmp_path))
    stripped = copy.deepcopy(mamba_results())
    del stripped["layers"]["0"]["activation_frequency"]
    with pytest.raises(jsonschema.ValidationError):  # an old-format file must still hold every field
        validator.validate(stripped)


def _embedded(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="neuron-data">(.*?)</script>', page, re.S)
    assert m
    return json.loads(m.group(1))


@pytest.mark.parametrize("layout", ["store", "old"])
def test_report_command_renders_both_layouts(layout, tmp_path):
    """``mambascope report DIR`` on a directory with a store, and on an older results.json with everything
    inline (no store): the same neuron pages."""
    from mambascope.cli import main
    from mambascope.results.outputs import MARKER

    results = mamba_results()
    if layout == "store":
        save_results(tmp_path, results)
    else:
        save_json(tmp_path / "results.json", results)
        assert load_results(tmp_path) == results
    (tmp_path / MARKER).write_text(json.dumps({"tool": "mambascope", "kind": "analyze", "status": "complete"}))
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert _embedded(page) == json.loads(json.dumps(neuron_data(results)))


def test_write_store_replaces_an_earlier_store_whole(tmp_path):
    write_store(tmp_path, mamba_results())
    gpt2 = gpt2_results()
    slim = write_store(tmp_path, gpt2)
    assert hydrate(slim, NeuronStore(tmp_path)) == gpt2
    assert [p.name for p in tmp_path.iterdir()] == ["store"]


def test_results_json_stays_small_for_a_wide_model(tmp_path):
    """8 layers x 1024 channels (8,192 neurons), a few hundred tokens: the per-neuron fields alone would be
    several MB of JSON; results.json stays under 5 MB."""
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    from mambascope.data import load_corpus, tokenize_windows
    from mambascope.models.tokenizer import train_tokenizer
    from mambascope.pipeline import model_info, run_analysis

    texts = load_corpus("builtin", "validation").texts[:100]
    tok = train_tokenizer(texts, vocab_size=512)
    windows = tokenize_windows(texts, tok, 32, max_tokens=32 * 12).ids
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=512, hidden_size=512, num_hidden_layers=8, state_size=4,
                                         expand=2)).eval()
    results = run_analysis(model, tok, windows, info={"model": model_info(model, "wide"), "corpus": {}},
                           stages=("census", "attention_neurons"), methods=["attention_weighted"],
                           attention_layers=[0, 7], attention_windows=2, faithfulness=False, progress=False)
    assert not results["errors"], results["errors"]
    inline = len(json.dumps(to_jsonable(results), indent=1))
    path = save_results(tmp_path, results)
    size = path.stat().st_size
    assert inline > 5 * 2**20 and size < 5 * 2**20, (inline, size)
    assert size < inline / 10
    assert NeuronStore(tmp_path).n_neurons == 8 * 1024


def test_an_attention_only_run_round_trips(tmp_path):
    """``mambascope attention``: no census layers, only the attention-neuron arrays go to the store."""
    full = mamba_results()
    results = {**{k: full[k] for k in ("model", "corpus", "errors", "attention_neurons")}, "layers": {},
               "census": None}
    slim, store = _saved(tmp_path, results)
    assert store.layers == [] and store.n_neurons == 0 and store.table().empty
    assert all("importance" not in entry for per in slim["attention_neurons"]["results"].values()
               for entry in per.values())
    assert load_results(tmp_path) == results
    assert store.by_token(" the").empty


def test_the_seed_layout_keeps_one_copy_in_the_store(tmp_path):
    """``run_comprehensive_analysis`` repeats the parts under ``analysis_results``: slim there too."""
    results = mamba_results()
    results["analysis_results"] = {key: results[key] for key in ("census", "attention_neurons", "ablation",
                                                                  "pruning")}
    slim, _ = _saved(tmp_path, results)
    assert slim["analysis_results"]["attention_neurons"] == slim["attention_neurons"]
    assert load_results(tmp_path, detail=True) == json.loads(json.dumps(results))


# -- a damaged store ------------------------------------------------------------------------------------

def damage_parquet(path: Path, how: str) -> None:
    """Truncate a Parquet file to half, or zero its pages (the footer left intact: only a read sees it)."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(data[:len(data) // 2])
        return
    footer = int.from_bytes(data[-8:-4], "little")  # Parquet: ... pages | footer | footer length | "PAR1"
    data[4:len(data) - 8 - footer] = bytes(len(data) - 12 - footer)
    path.write_bytes(data)


@pytest.mark.parametrize("name", ["summary.parquet", "tokens.parquet", "detectors.parquet",
                                  "neurons/layer=1/part-0.parquet"])
def test_a_truncated_store_file_is_named_in_one_line(tmp_path, name):
    from mambascope.results.store import StoreError

    save_results(tmp_path, mamba_results())
    path = tmp_path / "store" / name
    damage_parquet(path, "truncate")
    with pytest.raises(StoreError) as info:
        NeuronStore(tmp_path).verify()
    message = str(info.value)
    assert str(path) in message and "damaged" in message and "rerun the analysis" in message
    assert "\n" not in message


def test_reads_of_a_damaged_store_name_the_file(tmp_path):
    from mambascope.results.store import StoreError

    save_results(tmp_path, mamba_results())
    summary = tmp_path / "store" / "summary.parquet"
    good = summary.read_bytes()
    damage_parquet(summary, "truncate")
    with pytest.raises(StoreError, match=f"damaged: {re.escape(str(summary))} cannot be read"):
        load_results(tmp_path)  # results.json with its store put back: the summary table is read first
    summary.write_bytes(good)
    detail = tmp_path / "store" / "neurons" / "layer=0" / "part-0.parquet"
    damage_parquet(detail, "pages")
    store = NeuronStore(tmp_path)
    store.verify()  # the footer is intact: only reading the pages finds the damage
    with pytest.raises(StoreError, match=f"damaged: {re.escape(str(detail))} cannot be read") as info:
        store.detail(0, [5])
    assert "\n" not in str(info.value)
    assert store.detail(1, [5]).to_pylist()[0]["neuron"] == 5  # the other layer is still read


def test_a_detail_file_replaced_after_its_footer_was_read_is_refused(tmp_path):
    """A new analysis into DIR while a server reads it: the old footer must not decode the new file."""
    from mambascope.results.store import StoreError

    results = mamba_results()
    save_results(tmp_path, results)
    store = NeuronStore(tmp_path)
    want = results["layers"]["0"]["top_contexts"]["values"][3]
    assert store.detail(0, [3]).to_pylist()[0]["context_values"] == want
    save_results(tmp_path, gpt2_results())
    with pytest.raises(StoreError, match="changed after it was first read"):
        store.detail(0, [3])


PARALLEL_READS = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
from mambascope.results.store import NeuronStore
rounds = []
for _ in range(5):  # a fresh store each round: the first reads also open the files
    store = NeuronStore(sys.argv[1])
    picks = [(layer, e) for layer in store.layers for e in range(store.manifest["n_neurons"][str(layer)])] * 4
    with ThreadPoolExecutor(16) as pool:
        rows = list(pool.map(lambda p: store.detail(p[0], [p[1]]).to_pylist(), picks))
    rounds.append([[row["neuron"], row["context_values"]] for [row] in rows])
print(json.dumps({"picks": picks, "rounds": rounds}))
"""


def test_parallel_reads_equal_reads_one_at_a_time(tmp_path):
    """The server's request threads read one store at once.  One ParquetFile shared by them made 16 threads
    reading every neuron's row group hang, crash the process (segfault), or raise ``ReadRangeCache did not
    find matching cache entry``; hence a separate process, with a time limit.  Every answer is checked
    against the pipeline's own values."""
    import os
    import subprocess
    import sys

    results = mamba_results()
    save_results(tmp_path, results)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", PARALLEL_READS, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    out = json.loads(proc.stdout)
    want = [[e, results["layers"][str(layer)]["top_contexts"]["values"][e]] for layer, e in out["picks"]]
    assert len(want) == 4 * 128 and all(got == want for got in out["rounds"])


def test_report_command_on_a_truncated_store_is_one_line(tmp_path, capsys):
    from mambascope.cli import main
    from mambascope.results.outputs import MARKER

    save_results(tmp_path, mamba_results())
    (tmp_path / MARKER).write_text(json.dumps({"tool": "mambascope", "kind": "analyze", "status": "complete"}))
    detail = tmp_path / "store" / "neurons" / "layer=1" / "part-0.parquet"
    damage_parquet(detail, "truncate")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(detail) in err and "damaged" in err, err
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "figures").exists()
