"""Ablation and pruning values against an independent loop: the neurons are ablated by a hand-made
``register_forward_pre_hook`` on the module that reads them (Mamba ``mixer.out_proj``, GPT-2 ``mlp.c_proj``)
and the held-out loss is the model's own forward plus ``cross_entropy``; the draws' spread and its figures."""

import statistics

import numpy as np
import pytest
import torch
from matplotlib.container import BarContainer, ErrorbarContainer

import mambascope.interventions.ablation as ablation
from mambascope.data import load_corpus, tokenize_windows
from mambascope.interventions import ablation_study, pruning_study
from mambascope.models import load_model
from mambascope.pipeline import census_interventions, census_pass, run_analysis, run_census
from mambascope.report import figures

REL = 1e-5  # the traced forward (runner) against Hugging Face's forward, float32


@pytest.fixture(scope="module")
def windows(small_tokenizer):
    texts = load_corpus("builtin", "validation").texts[:300]
    return tokenize_windows(texts, small_tokenizer, 32, max_tokens=32 * 12).ids


def _reader(model, layer):
    """The module whose input is the neuron unit of ``layer``."""
    if hasattr(model, "backbone"):
        return model.backbone.layers[layer].mixer.out_proj
    return model.transformer.h[layer].mlp.c_proj


def hooked_loss(model, windows, values=None):
    """Mean next-token loss with ``values`` {layer: {neuron: value}} written into the unit by pre-hooks."""
    hooks = []
    for layer, fixed in (values or {}).items():
        index = torch.tensor(sorted(fixed), dtype=torch.long)
        value = torch.tensor([float(fixed[i]) for i in sorted(fixed)])

        def pre_hook(module, args, index=index, value=value):
            x = args[0].clone()
            x[..., index] = value.to(x.dtype)
            return (x, *args[1:])

        hooks.append(_reader(model, layer).register_forward_pre_hook(pre_hook))
    try:
        with torch.no_grad():
            logits = model(windows).logits
    finally:
        for h in hooks:
            h.remove()
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].double().flatten(0, 1), windows[:, 1:].flatten()))


def zeros(neurons):
    return {layer: dict.fromkeys((int(e) for e in idx), 0.0) for layer, idx in neurons.items() if len(idx)}


def means_of(neurons, means):
    return {layer: {int(e): float(means[layer][e]) for e in idx} for layer, idx in neurons.items() if len(idx)}


@pytest.fixture
def recorded_draws(monkeypatch):
    """Every random control set that the studies draw, in call order (the real ``random_groups``)."""
    calls = []

    def recording(n_neurons, size, draws, seed):
        sets = real(n_neurons, size, draws, seed)
        calls.append((n_neurons, size, sets))
        return sets

    real = ablation.random_groups
    monkeypatch.setattr(ablation, "random_groups", recording)
    return calls


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "gpt2"])
def test_ablation_study_matches_hooked_loop(kind, small_checkpoints, windows, recorded_draws):
    model, _ = load_model(small_checkpoints[kind], device="cpu")
    E = _reader(model, 0).weight.shape[1 if kind != "gpt2" else 0]
    g = torch.Generator().manual_seed(1)
    means = {layer: torch.randn(E, generator=g) for layer in (0, 1)}
    groups = {"empty": {0: []}, "a": {0: [1, 5, 7], 1: [2]}, "b": {1: list(range(0, E, 3))}}
    out = ablation_study(model, windows, groups, means, E, draws=3, batch_size=5)

    base = hooked_loss(model, windows)
    assert out["baseline_loss"] == pytest.approx(base, rel=REL)
    assert out["tokens"] == windows[:, 1:].numel()
    assert out["groups"]["empty"]["skipped"] == "group is empty"
    sets = iter(recorded_draws)
    for name in ("a", "b"):
        layers = groups[name]
        entry = out["groups"][name]
        assert entry["neurons"] == sum(len(v) for v in layers.values())
        controls = {layer: next(sets) for layer in layers}  # one call per layer of the group, in order
        for layer, (n, size, drawn) in controls.items():
            assert (n, size) == (E, len(layers[layer])) and len(drawn) == 3
            assert all(len(set(s.tolist())) == size and int(s.min()) >= 0 and int(s.max()) < E for s in drawn)
        for mode, fill in (("zero", zeros), ("mean", lambda idx: means_of(idx, means))):
            want = hooked_loss(model, windows, fill(layers))
            assert entry[mode]["loss"] == pytest.approx(want, rel=REL)
            assert entry[mode]["delta"] == pytest.approx(want - base, rel=1e-3, abs=1e-6)
            rand = [hooked_loss(model, windows, fill({layer: drawn[d] for layer, (_, _, drawn) in controls.items()}))
                    for d in range(3)]
            assert entry[mode]["random"]["draws"] == pytest.approx(rand, rel=REL)
            assert entry[mode]["random"]["mean"] == pytest.approx(statistics.fmean(rand), rel=REL)
            assert entry[mode]["random"]["std"] == pytest.approx(statistics.stdev(rand), rel=1e-2, abs=1e-6)
    assert next(sets, None) is None


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "gpt2"])
def test_pruning_study_matches_hooked_loop(kind, small_checkpoints, windows, recorded_draws):
    model, _ = load_model(small_checkpoints[kind], device="cpu")
    E = _reader(model, 0).weight.shape[1 if kind != "gpt2" else 0]
    g = torch.Generator().manual_seed(2)
    priority = {0: torch.randperm(E, generator=g), 1: torch.randperm(E, generator=g)}
    out = pruning_study(model, windows, priority, (0.25, 0.5), draws=3, batch_size=7)
    assert out["baseline_loss"] == pytest.approx(hooked_loss(model, windows), rel=REL)
    sets = iter(recorded_draws)
    for ratio in (0.25, 0.5):
        k = round(ratio * E)
        entry = out["ratios"][str(ratio)]
        assert entry["pruned_per_layer"] == {"0": k, "1": k}
        want = hooked_loss(model, windows, zeros({layer: order[:k] for layer, order in priority.items()}))
        assert entry["loss"] == pytest.approx(want, rel=REL)
        drawn = {layer: next(sets)[2] for layer in priority}
        rand = [hooked_loss(model, windows, zeros({layer: s[d] for layer, s in drawn.items()})) for d in range(3)]
        assert [len(s[0]) for s in drawn.values()] == [k, k]
        assert entry["random"]["draws"] == pytest.approx(rand, rel=REL)
        assert entry["random"]["std"] == pytest.approx(statistics.stdev(rand), rel=1e-2, abs=1e-6)


def test_census_groups_ablate_the_right_neurons_on_mamba2(small_checkpoints, windows):
    """The census's groups as ablated by census_interventions, on Mamba-2: the Δ-sensitive group is the most
    selective heads, capped at a quarter of the heads, each expanded to its head_dim channels (computed here by
    hand from the Δ selectivities); the other groups are the census lists; mean ablation uses mean_post."""
    model, tok = load_model(small_checkpoints["mamba2"], device="cpu")
    select, heldout = windows[:8], windows[8:]
    layers = census_pass(model, tok, select, progress=False)["layers"]
    out = census_interventions(model, layers, heldout, draws=3, pruning_ratios=(0.5,))
    head_dim, n_heads = model.config.head_dim, model.config.num_heads
    base = hooked_loss(model, heldout)
    assert all(r["delta"]["n_units"] == n_heads for r in layers.values())
    expected = {"dead": {int(la): r["dead_neurons"] for la, r in layers.items()},
                "positional": {int(la): r["positional_neurons"] for la, r in layers.items()},
                "delta_sensitive": {}}
    for la, r in layers.items():
        selectivity = torch.tensor(r["delta"]["selectivity"])
        heads = selectivity.argsort(descending=True)[: n_heads // 4].tolist()
        assert len(heads) == 2 < len(r["delta_sensitive"])  # the cap binds: 10 requested, 8 heads, 2 kept
        expected["delta_sensitive"][int(la)] = [h * head_dim + j for h in heads for j in range(head_dim)]
    means = {int(la): r["activity"]["mean_post"] for la, r in layers.items()}
    assert out["ablation"]["baseline_loss"] == pytest.approx(base, rel=REL)
    ablated = 0
    for name, neurons in expected.items():
        entry = out["ablation"]["groups"][name]
        if not any(neurons.values()):
            assert entry["skipped"] == "group is empty"
            continue
        assert entry["per_layer"] == {str(la): len(v) for la, v in neurons.items() if v}
        assert entry["zero"]["loss"] == pytest.approx(hooked_loss(model, heldout, zeros(neurons)), rel=REL)
        assert entry["mean"]["loss"] == pytest.approx(hooked_loss(model, heldout, means_of(neurons, means)), rel=REL)
        ablated += 1
    assert out["ablation"]["groups"]["delta_sensitive"]["neurons"] == 2 * 2 * head_dim and ablated >= 1


def test_draws_below_three_are_refused_before_any_work(small_checkpoints, windows, monkeypatch):
    model, tok = load_model(small_checkpoints["mamba"], device="cpu")

    def no_work(*args, **kwargs):
        raise AssertionError("work started before --draws was checked")

    monkeypatch.setattr(ablation, "heldout_loss", no_work)
    monkeypatch.setattr("mambascope.pipeline.census_pass", no_work)
    for draws in (0, 1, 2):
        with pytest.raises(ValueError, match=r"--draws must be at least 3 .*draws=" + str(draws)):
            ablation_study(model, windows, {"a": {0: [1]}}, {}, 64, draws=draws)
        with pytest.raises(ValueError, match="--draws must be at least 3"):
            pruning_study(model, windows, {0: torch.arange(64)}, draws=draws)
        with pytest.raises(ValueError, match="--draws must be at least 3"):
            run_analysis(model, tok, windows, info={"model": {}, "corpus": {}}, draws=draws, progress=False)
        with pytest.raises(ValueError, match="--draws must be at least 3"):
            run_census(model, tok, windows, draws=draws, progress=False)
    with pytest.raises(ValueError, match=r"pruning ratio 1\.5"):
        pruning_study(model, windows, {0: torch.arange(64)}, (0.5, 1.5))


def test_std_of_one_value_is_null():
    assert ablation._spread([2.5])["std"] is None
    assert ablation._spread([1.0, 2.0, 4.0])["std"] == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]))


def _captured(monkeypatch):
    figs = []

    def keep(fig, out_dir, name):
        figs.append(fig)
        return out_dir

    monkeypatch.setattr(figures, "_save", keep)
    return figs


def test_null_std_draws_no_error_bar(monkeypatch, tmp_path):
    """A null std (undefined) draws no error bar; a number draws one of that half-length."""
    figs = _captured(monkeypatch)
    rnd = {"loss": 4.2, "delta": 0.2, "random": {"mean": 4.1, "std": None, "draws": [4.1]}}
    spread = {"loss": 4.3, "delta": 0.3, "random": {"mean": 4.05, "std": 0.02, "draws": [4.03, 4.05, 4.07]}}
    results = {"ablation": {"baseline_loss": 4.0, "tokens": 100, "draws": 1,
                            "groups": {"dead": {"neurons": 2, "zero": rnd, "mean": spread}}},
               "pruning": {"baseline_loss": 4.0, "tokens": 100,
                           "ratios": {"0.1": {"loss": 4.2, "random": {"mean": 4.1, "std": None, "draws": [4.1]}},
                                      "0.5": {"loss": 4.6, "random": {"mean": 4.5, "std": 0.1, "draws": [4.5]}}}}}
    figures.plot_ablation(results, tmp_path)
    bars = [c for c in figs[0].axes[0].containers if isinstance(c, BarContainer) and c.errorbar is not None]
    assert len(bars) == 1  # only the mean-ablation control, whose std is 0.02
    (segment,) = bars[0].errorbar.lines[2][0].get_segments()
    assert segment[1][1] - segment[0][1] == pytest.approx(0.04)

    figures.plot_pruning(results, tmp_path)
    (container,) = [c for c in figs[1].axes[0].containers if isinstance(c, ErrorbarContainer)]
    segments = [s for s in container.lines[2][0].get_segments() if len(s) and np.isfinite(s).all()]
    assert len(segments) == 1 and segments[0][0][0] == pytest.approx(0.5)
    assert segments[0][1][1] - segments[0][0][1] == pytest.approx(0.2)


def test_null_faithfulness_std_draws_no_error_bar(monkeypatch, tmp_path):
    figs = _captured(monkeypatch)
    methods = {"rollout": {"0": {"delta": 0.3, "k": 4}, "1": {"delta": 0.2, "k": 4}}}
    random = {"0": {"delta_mean": 0.1, "delta_std": None, "k": 4}, "1": {"delta_mean": 0.1, "delta_std": 0.05, "k": 4}}
    figures.plot_faithfulness_neurons({"faithfulness": {"neuron": {"methods": methods, "random": random}}}, tmp_path)
    with_bars = [[c for c in ax.containers if isinstance(c, BarContainer) and c.errorbar is not None]
                 for ax in figs[0].axes[:2]]
    assert [len(bars) for bars in with_bars] == [0, 1]
