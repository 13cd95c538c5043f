"""PositionalAccumulator: MI and correlation against the loop reference, exact cases, invariance."""

import math

import pytest
import torch

from mambascope.neurons import EmptyAccumulatorError, NeuronBatch, PositionalAccumulator, positional_information
from neuron_reference import assert_tree_close, check_invariance, make_batch, ref_positional


def test_matches_reference():
    batch = make_batch(seed=3)
    acc = PositionalAccumulator(mi_threshold=0.05, top_k=3)
    acc.update(batch)
    got = acc.finalize()
    ref = ref_positional(batch.post, batch.active, batch.positions, batch.valid, 0.05)
    assert_tree_close(got["positional_mi"], ref["positional_mi"], rel=1e-9, abs_tol=1e-12)
    assert got["positional_neurons"] == ref["positional_neurons"]
    assert_tree_close(got["position_correlation"], ref["position_correlation"], rel=1e-6, abs_tol=1e-9)
    assert got["tokens_by_position"] == ref["tokens_by_position"]
    # BOS sits at position 0 and is invalid: position 0 is unobserved and left out of the average
    assert got["positional_top"]["positions"] == ref["positions"] and ref["positions"][0] == 1
    assert 5 in got["positional_neurons"] and got["positional_top"]["neurons"][0] == 5
    assert_tree_close(got["positional_top"]["frequency_by_position"][0], ref["curves"][5])
    defined = [abs(r) for r in ref["position_correlation"] if r is not None]
    assert math.isclose(got["mean_abs_position_correlation"], sum(defined) / len(defined), rel_tol=1e-6)
    assert got["position_correlation"][0] is not None and got["position_correlation"][5] > 0.9


def test_exact_values():
    # two positions; neuron 0 active exactly at position 0 → fr=1/2, I = ln 2 (the maximum);
    # neuron 1 always active → I = 0 (0·ln 0 = 0); neuron 2 active 1/2 at both positions → I = 0.
    active = torch.tensor([[[1, 1, 1], [0, 1, 0]], [[1, 1, 0], [0, 1, 1]]]).bool()
    counts = torch.zeros(2, 3, dtype=torch.long).index_add_(0, torch.tensor([0, 1, 0, 1]),
                                                          active.reshape(4, 3).long())
    mi = positional_information(counts, torch.tensor([2, 2]))
    assert torch.allclose(mi, torch.tensor([math.log(2), 0.0, 0.0], dtype=torch.float64))
    pos = torch.arange(2).expand(2, 2)
    post = torch.stack([pos.float(), torch.ones(2, 2), torch.tensor([[1.0, 2.0], [3.0, 1.0]])], -1)
    acc = PositionalAccumulator()
    acc.update(NeuronBatch(post, active, torch.zeros(2, 2).long(), pos, torch.ones(2, 2).bool()))
    out = acc.finalize()
    assert out["positional_neurons"] == [0]
    # post = position → r = 1; constant post → undefined (None), not 0
    assert math.isclose(out["position_correlation"][0], 1.0) and out["position_correlation"][1] is None
    # neuron 2: x = 1, 2, 3, 1 at p = 0, 1, 0, 1 → Σ(x−x̄)(p−p̄) = −0.5, Σ(x−x̄)² = 2.75, Σ(p−p̄)² = 1
    assert math.isclose(out["position_correlation"][2], -0.5 / math.sqrt(2.75), rel_tol=1e-6)


def test_batch_size_and_merge_invariance():
    # row 0 is right-padded: the first block has a shorter window, so tables grow on update and merge
    check_invariance(lambda: PositionalAccumulator(top_k=4), make_batch(seed=4), rel=1e-8)


@pytest.mark.parametrize("thr", [0.0, -0.1, 0.7, float("nan")])
def test_threshold_out_of_range(thr):
    with pytest.raises(ValueError, match="mi_threshold"):
        PositionalAccumulator(mi_threshold=thr)


def test_bad_arguments_and_empty():
    with pytest.raises(ValueError, match="top_k"):
        PositionalAccumulator(top_k=0)
    with pytest.raises(EmptyAccumulatorError, match="PositionalAccumulator"):
        PositionalAccumulator().finalize()
    batch = make_batch(seed=5)
    batch.positions[1, 4] = -1
    with pytest.raises(ValueError, match="positions"):
        PositionalAccumulator().update(batch)
