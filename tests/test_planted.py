"""The census recovers planted neurons (tests/planting.py): dead, token detectors, positional, Δ-sensitive,
with recall 1 and no false positive among the planted-against controls; and the positional count stays
near zero without positional information at small sample sizes (issue 13, parts 3 and 5)."""

import pytest
import torch

import mambascope
from mambascope.neurons import LayerCensus, NeuronBatch
from mambascope.pipeline import census_pass, neuron_groups
from planting import (
    POSITION_PATTERNS,
    corpus_types,
    gpt_preactivations,
    mamba_delta_selectivity,
    mamba_gate_range,
    mamba_layer0_truth,
    mamba_mixer_inputs,
    permutation_windows,
    plant_gpt,
    plant_mamba,
)

T, WINDOWS = 128, 64


def _census(planted, windows, layers):
    """The census of every layer (``layers`` None) as the pipeline runs it."""
    return census_pass(planted.model, planted.tokenizer, windows, layers=layers, progress=False, batch_size=16)


def _recall_precision(found, planted, controls):
    """Recall over the planted units; precision over the units of known truth (planted ∪ controls)."""
    found = set(found)
    recall = len(found & set(planted)) / len(planted)
    known = found & (set(planted) | set(controls))
    return recall, (len(known & set(planted)) / len(known)) if known else 1.0


def _check_dead(census, planted):
    """Every layer's planted dead neuron is found, and its always-active controls are not (non-empty)."""
    for layer, neurons in planted.dead.items():
        assert planted.alive[layer], layer
        found = census["layers"][str(layer)]["dead_neurons"]
        assert _recall_precision(found, neurons, planted.alive[layer]) == (1.0, 1.0), layer


@pytest.fixture(scope="module", params=["tiny-mamba", "tiny-mamba2"])
def mamba(request):
    _, tokenizer = mambascope.load_model(request.param)
    types = corpus_types(tokenizer, len(tokenizer), T)
    planted = plant_mamba(request.param, types)
    windows = permutation_windows(types, WINDOWS)
    return planted, types, mamba_mixer_inputs(planted, windows), _census(planted, windows, None)


def test_mamba_constructions_hold_in_the_models_own_forward(mamba):
    planted, types, inputs, _ = mamba
    truth = mamba_layer0_truth(planted, types)
    for neuron, triggers in planted.detectors[0].items():  # the trigger set over the whole vocabulary
        assert (truth["z"][:, neuron] > 0).nonzero().flatten().tolist() == triggers
    assert not set(planted.non_detectors[0]) & set(truth["detectors"])
    gate = mamba_gate_range(planted, inputs)
    for layer, neurons in planted.dead.items():
        assert bool((gate[layer][1][neurons] < 0).all()), layer  # the gate never opens, strictly
        assert bool((gate[layer][0][planted.alive[layer]] > 0).all()), layer  # the control's never closes
    selectivity = mamba_delta_selectivity(planted, inputs, 1)
    order = torch.argsort(selectivity, descending=True).tolist()
    assert sorted(order[:2]) == planted.delta_sensitive[1]
    assert float(selectivity[planted.delta_flat[1]].max()) == 0.0


def test_mamba_census_recovers_planted_units(mamba):
    planted, types, inputs, census = mamba
    truth = mamba_layer0_truth(planted, types)
    layer0, layer1 = census["layers"]["0"], census["layers"]["1"]
    # layer 0: the truth of every neuron is known, so precision and recall are over the whole layer
    assert layer0["dead_neurons"] == truth["dead"] and set(planted.dead[0]) <= set(truth["dead"])
    found = {d["neuron"]: sorted(d["tokens"]) for d in layer0["token_detectors"]}
    assert found == truth["detectors"]
    for neuron, triggers in planted.detectors[0].items():
        assert found[neuron] == triggers
    assert all(d["established"] for d in layer0["token_detectors"])  # 64 occurrences each
    # a gate that depends on the current token only, on windows of permuted types: nothing is positional
    assert layer0["positional_neurons"] == [] and layer0["positional"]["windows"] == WINDOWS
    _check_dead(census, planted)
    head_dim = layer1["n_neurons"] // layer1["delta"]["n_units"]
    group = neuron_groups(layer1, planted.arch, head_dim)["delta_sensitive"]
    units = sorted({e // head_dim for e in group})
    recall, precision = _recall_precision(units, planted.delta_sensitive[1], planted.delta_flat[1])
    assert (recall, precision) == (1.0, 1.0)
    sel = torch.tensor(layer1["delta"]["selectivity"], dtype=torch.float64)
    assert torch.allclose(sel, mamba_delta_selectivity(planted, inputs, 1), rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def gpt():
    _, tokenizer = mambascope.load_model("tiny-gpt")
    types = corpus_types(tokenizer, len(tokenizer), T)
    planted = plant_gpt(types)
    windows = permutation_windows(types, WINDOWS)
    return planted, types, windows, _census(planted, windows, None)


def test_gpt_constructions_hold_in_the_models_own_forward(gpt):
    planted, _, windows, _ = gpt
    pre = gpt_preactivations(planted, windows)
    positions = torch.arange(T)
    for neuron, pattern in zip(planted.positional[0], POSITION_PATTERNS.values(), strict=True):
        assert torch.equal(pre[0][..., neuron] > 0, pattern(positions, T).expand(WINDOWS, T))
    for neuron, triggers in planted.detectors[0].items():
        assert torch.equal(pre[0][..., neuron] > 0, torch.isin(windows, torch.tensor(triggers)))
    for layer, neurons in planted.dead.items():
        assert bool((pre[layer][..., neurons] == -1.0).all())
        assert bool((pre[layer][..., planted.alive[layer]] == 1.0).all())


def test_gpt_census_recovers_planted_units(gpt):
    planted, _, _, census = gpt
    layer0 = census["layers"]["0"]
    assert _recall_precision(layer0["positional_neurons"], planted.positional[0],
                             planted.non_positional[0]) == (1.0, 1.0)
    found = {d["neuron"]: sorted(d["tokens"]) for d in layer0["token_detectors"]}
    for neuron, triggers in planted.detectors[0].items():
        assert found.get(neuron) == triggers
    assert _recall_precision(found, planted.detectors[0], planted.non_detectors[0]) == (1.0, 1.0)
    _check_dead(census, planted)
    # the planted-against controls are alive: the rarest, a one-type detector, is active on 1/128 of tokens
    freq = layer0["activation_frequency"]
    assert min(freq[e] for e in planted.detectors[0]) == pytest.approx(1 / T)


def _positional_counts(batches, n_neurons):
    census = LayerCensus("mamba", vocab_size=4096)
    for batch in batches:
        census.update(batch)
    pos = census.finalize()["positional"]
    return pos["n_positional"], pos["n_positional_plugin"], n_neurons


def test_no_positional_information_stays_near_zero_at_12_windows():
    """12 windows of 128 (1536 tokens): the plug-in MI > 0.05 flags most neurons of a model without
    positional information; the bias-corrected, permutation-tested census flags (almost) none.

    (a) tiny-mamba's layer 0 on windows of independent uniform draws from 128 token types: its gate depends
        on the current token only.
    (b) every layer of tiny-mamba on the built-in validation text, positions shuffled within each window.
    """
    model, tokenizer = mambascope.load_model("tiny-mamba")
    types = corpus_types(tokenizer, len(tokenizer), T)
    names = ["mixer.hook_post", "mixer.hook_gate_pre", "mixer.hook_dt"]
    windows = types[torch.randint(0, T, (12, T), generator=torch.Generator().manual_seed(1))]
    tr = mambascope.trace(model, windows, names=names)
    batch = NeuronBatch.from_layer(tr.layer(0), "mamba", windows, bos_token_id=tokenizer.bos_token_id)
    flagged, plugin, E = _positional_counts([batch], 256)
    assert flagged == 0 and plugin > E // 10

    from mambascope.data import load_corpus, tokenize_windows

    text = tokenize_windows(load_corpus("builtin", "validation").texts, tokenizer, T, max_tokens=12 * T).ids
    tr = mambascope.trace(model, text, names=names)
    g = torch.Generator().manual_seed(0)
    for layer in range(model.config.num_hidden_layers):
        batch = NeuronBatch.from_layer(tr.layer(layer), "mamba", text, bos_token_id=tokenizer.bos_token_id)
        for row in range(text.shape[0]):  # shuffle the positions of each window's valid tokens
            slots = batch.valid[row].nonzero().flatten()
            batch.positions[row, slots] = slots[torch.randperm(slots.numel(), generator=g)]
        flagged, plugin, E = _positional_counts([batch], 256)
        assert flagged <= 2 and plugin > E // 10, (layer, flagged, plugin)


@pytest.mark.parametrize("name", ["tiny-mamba", "tiny-gpt"])
def test_a_census_calling_every_neuron_dead_fails_the_dead_check(name, monkeypatch):
    from mambascope.neurons import ActivityAccumulator

    _, tokenizer = mambascope.load_model(name)
    types = corpus_types(tokenizer, len(tokenizer), T)
    planted = plant_mamba(name, types) if name == "tiny-mamba" else plant_gpt(types)
    finalize = ActivityAccumulator.finalize

    def all_dead(self):
        out = finalize(self)
        return out | {"dead_neurons": list(range(self.n_neurons)), "n_dead": self.n_neurons}

    monkeypatch.setattr(ActivityAccumulator, "finalize", all_dead)
    census = _census(planted, permutation_windows(types, 4), None)
    assert all(len(layer["dead_neurons"]) == layer["n_neurons"] for layer in census["layers"].values())
    with pytest.raises(AssertionError):
        _check_dead(census, planted)
