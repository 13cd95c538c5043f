"""ActivityAccumulator against the loop reference, batching/merge invariance, bad input."""

import pytest
import torch

from mambascope.neurons import ActivityAccumulator, EmptyAccumulatorError, NeuronBatch
from neuron_reference import assert_tree_close, check_invariance, make_batch, ref_activity, ref_dead_bound

THRESHOLDS = [0.01, 0.1, 0.5, 1.0, 2.0]


def _batch():
    batch = make_batch(seed=1)
    batch.post[0, 1, 6] = 0.5  # exactly on a threshold: |post| > θ is strict
    batch.post[..., 0] = 0.0  # neuron 0 is dead under every rule
    return batch


def test_matches_reference():
    batch = _batch()
    acc = ActivityAccumulator(rare_threshold=0.01, thresholds=THRESHOLDS, layer=0)
    acc.update(batch)
    got = acc.finalize()
    ref = ref_activity(batch.post, batch.active, batch.valid, THRESHOLDS, 0.01)
    for key in ("tokens", "active_count", "activation_frequency", "dead_neurons", "pct_dead", "rarely_active",
                "mean_frequency_alive", "mean_post", "mean_abs_post", "mean_post_active"):
        assert_tree_close(got[key], ref[key], rel=1e-6, path=key)
    assert got["dead_neurons"] == [0] and got["rarely_active"] == [1]  # the planted neurons
    assert got["dead_sensitivity"]["pct_dead"] == ref["sensitivity_pct_dead"]
    assert got["dead_sensitivity"]["thresholds"] == THRESHOLDS
    assert got["n_dead"] == 1 and got["tokens"] == int(batch.valid.sum())


@pytest.mark.parametrize(("tokens", "warned"), [(50, True), (298, True), (299, False), (5000, False)])
def test_dead_bound_and_small_sample_warning(tokens, warned):
    post = torch.zeros(1, tokens, 2)
    post[0, :, 1] = 1.0
    batch = NeuronBatch(post, post > 0, torch.zeros(1, tokens).long(), torch.arange(tokens)[None],
                        torch.ones(1, tokens).bool())
    acc = ActivityAccumulator(rare_threshold=0.01)
    acc.update(batch)
    out = acc.finalize()
    assert out["dead_neurons"] == [0]
    assert out["dead_frequency_upper_bound"] == pytest.approx(ref_dead_bound(tokens), rel=1e-9)
    # 299 tokens: a 1 %-neuron is missed with probability 0.99^299 < 5 %, at 298 it is not
    assert (out["warning"] is not None) == warned
    if warned:
        assert ">= 299 tokens" in out["warning"]


def test_sensitivity_counts_are_strict_and_monotone():
    post = torch.tensor([[[0.5, 0.25], [0.125, 0.0]]])  # exact in float32, like the thresholds
    batch = NeuronBatch(post, post > 0, torch.zeros(1, 2).long(), torch.arange(2)[None], torch.ones(1, 2).bool())
    acc = ActivityAccumulator(thresholds=[0.125, 0.25, 0.5])
    acc.update(batch)
    # neuron 0: |post| = 0.5, 0.125; neuron 1: 0.25, 0 → dead at θ=0.25 (0.25 is not > 0.25) and θ=0.5
    assert acc.max_abs.tolist() == [0.5, 0.25]  # C_{k,e} = 0 ⇔ max |post| <= θ_k
    assert acc.finalize()["dead_sensitivity"]["pct_dead"] == [0.0, 50.0, 100.0]


def test_batch_size_and_merge_invariance():
    check_invariance(lambda: ActivityAccumulator(thresholds=THRESHOLDS), _batch())


def test_all_dead_has_no_alive_mean():
    post = torch.zeros(1, 3, 2)
    batch = NeuronBatch(post, post > 0, torch.zeros(1, 3).long(), torch.arange(3)[None], torch.ones(1, 3).bool())
    acc = ActivityAccumulator()
    acc.update(batch)
    out = acc.finalize()
    assert out["mean_frequency_alive"] is None and out["pct_dead"] == 100.0
    assert out["mean_post_active"] == [None, None]


@pytest.mark.parametrize("rare", [0.0, 1.0, -0.1, 2.0, float("nan")])
def test_rare_threshold_out_of_range(rare):
    with pytest.raises(ValueError, match="rare_threshold"):
        ActivityAccumulator(rare_threshold=rare)


@pytest.mark.parametrize("grid", [[], [0.5, 0.1], [0.1, 0.1], [-1.0, 1.0], [0.1, float("inf")]])
def test_bad_threshold_grid(grid):
    with pytest.raises(ValueError, match="thresholds"):
        ActivityAccumulator(thresholds=grid)


def test_empty_finalize_and_mismatched_merge():
    with pytest.raises(EmptyAccumulatorError, match="layer 4"):
        ActivityAccumulator(layer=4).finalize()
    only_padding = make_batch(seed=2)
    only_padding.valid[:] = False
    acc = ActivityAccumulator()
    acc.update(only_padding)
    with pytest.raises(EmptyAccumulatorError):
        acc.finalize()
    with pytest.raises(ValueError, match="rare_threshold"):
        ActivityAccumulator(rare_threshold=0.02).merge(ActivityAccumulator())
    a, b = ActivityAccumulator(), ActivityAccumulator()
    a.update(make_batch(E=8))
    b.update(make_batch(E=9))
    with pytest.raises(ValueError, match="9 units into 8"):
        a.merge(b)
    with pytest.raises(ValueError, match="units"):
        a.update(make_batch(E=9))
