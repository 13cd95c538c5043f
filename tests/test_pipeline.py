"""The census pipeline and the staged analysis: splits, invariance, priorities, failure isolation."""

import json

import pytest
import torch

from mambascope.data import load_corpus, tokenize_windows
from mambascope.models import load_model
from mambascope.pipeline import (
    census_pass,
    neuron_table,
    pruning_priority,
    run_analysis,
    run_census,
    split_windows,
)
from mambascope.results import to_jsonable


@pytest.fixture(scope="module")
def windows(small_tokenizer):
    texts = load_corpus("builtin", "validation").texts[:300]
    return tokenize_windows(texts, small_tokenizer, 32, max_tokens=32 * 16).ids


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "gpt2"])
def test_census_is_complete_and_json(kind, small_checkpoints, windows):
    model, tok = load_model(small_checkpoints[kind], device="cpu")
    out = run_census(model, tok, windows, draws=3, progress=False, pruning_ratios=(0.5,))
    assert out["tokens"] + out["heldout_tokens"] == windows.numel()
    assert set(out["layers"]) == {"0", "1"}
    layer = out["layers"]["0"]
    for key in ("dead_neurons", "activation_frequency", "rarely_active", "positional_neurons", "positional_mi",
                "token_detectors", "delta_sensitive", "suppression", "overlap", "top_contexts", "logit_effects"):
        assert key in layer
    assert (layer["delta_sensitive"] is None) == (kind == "gpt2")
    assert set(out["ablation"]["groups"]) == {"dead", "rarely_active", "positional", "token_detector",
                                              "delta_sensitive"}
    assert len(out["pruning"]["ratios"]["0.5"]["random"]["draws"]) == 3
    json.dumps(to_jsonable(out), allow_nan=False)
    table = neuron_table(out)
    assert len(table) == 2 * layer["n_neurons"]


def test_census_does_not_depend_on_batch_size(small_checkpoints, windows):
    model, tok = load_model(small_checkpoints["mamba"], device="cpu")
    a = census_pass(model, tok, windows, batch_size=3, progress=False)
    b = census_pass(model, tok, windows, batch_size=16, progress=False)
    for layer in a["layers"]:
        x, y = a["layers"][layer], b["layers"][layer]
        assert x["activity"]["active_count"] == y["activity"]["active_count"]
        assert x["token_detectors"] == y["token_detectors"]
        assert x["top_contexts"]["windows"] == y["top_contexts"]["windows"]
        assert x["positional_mi"] == pytest.approx(y["positional_mi"], rel=1e-9, abs=1e-12)


def test_selection_and_heldout_are_disjoint():
    w = torch.arange(40).reshape(10, 4)
    select, heldout = split_windows(w, 0.3)
    assert select.shape[0] == 7 and heldout.shape[0] == 3
    assert not set(select.flatten().tolist()) & set(heldout.flatten().tolist())
    with pytest.raises(ValueError, match="cannot be split"):
        split_windows(w[:1], 0.25)


def test_pruning_priority_order():
    result = {"activation_frequency": [0.5, 0.0, 0.004, 0.3, 0.002, 0.6],
              "dead_neurons": [1], "rarely_active": [2, 4],
              "activity": {"mean_abs_post": [1.0, 0.0, 5.0, 0.1, 9.0, 2.0]}}
    order = pruning_priority(result, torch.ones(6))
    assert order.tolist() == [1, 4, 2, 3, 0, 5]


def test_a_failing_stage_is_recorded_and_the_others_run(small_checkpoints, windows, monkeypatch):
    import mambascope.attention_neurons as an

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(an, "run_attention_analysis", broken)
    model, tok = load_model(small_checkpoints["mamba"], device="cpu")
    saved = []
    results = run_analysis(model, tok, windows, info={"model": {}, "corpus": {}}, draws=3, progress=False,
                           save=lambda r: saved.append(json.dumps(to_jsonable(r))))
    assert results["errors"] == {"attention_neurons": "RuntimeError: kernel exploded"}
    assert results["layers"] and results["ablation"]["groups"]
    assert results["incomplete"] == []
    assert len(saved) == 3  # one save per stage


def test_an_interrupt_keeps_finished_stages(small_checkpoints, windows, monkeypatch):
    import mambascope.pipeline as pipeline

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "census_interventions", interrupt)
    model, tok = load_model(small_checkpoints["mamba"], device="cpu")
    saved = []
    with pytest.raises(KeyboardInterrupt):
        run_analysis(model, tok, windows, info={}, progress=False, save=saved.append)
    assert saved[-1]["layers"] and saved[-1]["incomplete"] == ["interventions", "attention_neurons"]


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_context_attention_rows_are_the_hidden_attention(kind, small_checkpoints, windows):
    from mambascope.ssm import hidden_attention
    from mambascope.trace import mixer_params, trace

    model, tok = load_model(small_checkpoints[kind], device="cpu")
    out = census_pass(model, tok, windows, layers=[1], progress=False)
    layer = out["layers"]["1"]
    rows, top = layer["attention_rows"], layer["top_contexts"]
    assert rows["neurons"] == list(range(layer["n_neurons"]))
    params = mixer_params(model, 1)
    for e in (0, layer["n_neurons"] - 1):
        w, t = top["windows"][e][0], top["positions"][e][0]
        full = hidden_attention(trace(model, windows[w:w + 1]).layer(1), params, "s6")[0, e // params.head_dim, t]
        expected = [float(full[s]) if s >= 0 else None for s in range(t - top["width"] + 1, t + 1)]
        assert rows["values"][e] == pytest.approx(expected, rel=1e-5, abs=1e-7)
        assert rows["tokens"][e] == top["tokens"][e][0]
