"""PositionalAccumulator: MI, bias correction, circular-shift null and correlation against the loop reference;
exact cases; the null against exhaustive enumeration and its calibration; invariance."""

import math

import pytest
import torch

from mambascope.neurons import (
    EmptyAccumulatorError,
    NeuronBatch,
    PositionalAccumulator,
    positional_bias,
    positional_information,
)
from neuron_reference import (
    assert_tree_close,
    check_invariance,
    enumerate_shift_moments,
    make_batch,
    ref_positional,
)


def _batch(active, valid=None, positions=None):
    b, L, E = active.shape
    valid = torch.ones(b, L, dtype=torch.bool) if valid is None else valid
    positions = torch.arange(L).expand(b, L) if positions is None else positions
    return NeuronBatch(torch.randn(b, L, E), active, torch.zeros(b, L).long(), positions, valid)


def test_matches_reference():
    batch = make_batch(seed=3)
    acc = PositionalAccumulator(mi_threshold=0.05, top_k=3)
    acc.update(batch)
    got = acc.finalize()
    ref = ref_positional(batch.post, batch.active, batch.positions, batch.valid, 0.05)
    assert_tree_close(got["positional_mi_plugin"], ref["positional_mi_plugin"], rel=1e-9, abs_tol=1e-12)
    assert_tree_close(got["positional_mi"], ref["positional_mi"], rel=1e-9, abs_tol=1e-12)
    null = acc.shift_null()
    for key in ("statistic", "mean", "variance", "p_value"):
        assert_tree_close(null[key].tolist(), ref["null"][key], rel=1e-8, abs_tol=1e-12, path=key)
    assert got["positional_p_value"] == null["p_value"].tolist()
    assert got["positional_neurons"] == ref["positional_neurons"]
    assert_tree_close(got["position_correlation"], ref["position_correlation"], rel=1e-6, abs_tol=1e-9)
    assert got["tokens_by_position"] == ref["tokens_by_position"]
    # BOS sits at position 0 and is invalid: position 0 is unobserved and left out of the average
    assert got["positional_top"]["positions"] == ref["positions"] and ref["positions"][0] == 1
    # neuron 5 (active at positions < 4) is the most positional; 6 windows are too few to establish it
    assert got["positional_top"]["neurons"][0] == 5 and ref["null"]["p_value"][5] < 0.01
    assert_tree_close(got["positional_top"]["frequency_by_position"][0], ref["curves"][5])
    defined = [abs(r) for r in ref["position_correlation"] if r is not None]
    assert math.isclose(got["mean_abs_position_correlation"], sum(defined) / len(defined), rel_tol=1e-6)
    assert got["position_correlation"][0] is not None and got["position_correlation"][5] > 0.9
    assert got["windows"] == 6 and got["warning"] is not None  # 6 windows per position: bias 1/12


def test_exact_values():
    # two positions; neuron 0 active exactly at position 0 → fr=1/2, I = ln 2 (the maximum);
    # neuron 1 always active → I = 0 (0·ln 0 = 0); neuron 2 active 1/2 at both positions → I = 0.
    active = torch.tensor([[[1, 1, 1], [0, 1, 0]], [[1, 1, 0], [0, 1, 1]]]).bool()
    counts = torch.zeros(2, 3, dtype=torch.long).index_add_(0, torch.tensor([0, 1, 0, 1]),
                                                          active.reshape(4, 3).long())
    mi = positional_information(counts, torch.tensor([2, 2]))
    assert torch.allclose(mi, torch.tensor([math.log(2), 0.0, 0.0], dtype=torch.float64))
    # Panzeri–Treves: neuron 0 has one response per position (R_p = 1) but two overall: −(R−1)/(2N) = −1/8
    # per position; neuron 1 is constant (no correction); neuron 2 has both responses everywhere:
    # (1/(2·2) − 1/(2·4)) = 1/8 per position
    bias = positional_bias(counts, torch.tensor([2, 2]))
    assert torch.allclose(bias, torch.tensor([-0.125, 0.0, 0.125], dtype=torch.float64))
    pos = torch.arange(2).expand(2, 2)
    post = torch.stack([pos.float(), torch.ones(2, 2), torch.tensor([[1.0, 2.0], [3.0, 1.0]])], -1)
    acc = PositionalAccumulator()
    acc.update(NeuronBatch(post, active, torch.zeros(2, 2).long(), pos, torch.ones(2, 2).bool()))
    out = acc.finalize()
    # two windows cannot establish anything: neuron 0's arrangement has probability 1/2 under shuffling
    # (the scaled-χ² p-value, e^-2, is rough this far from its asymptotics, but nowhere near alpha)
    assert out["positional_neurons"] == [] and out["positional_p_value"][0] > 0.1
    # post = position → r = 1; constant post → undefined (None), not 0
    assert math.isclose(out["position_correlation"][0], 1.0) and out["position_correlation"][1] is None
    # neuron 2: x = 1, 2, 3, 1 at p = 0, 1, 0, 1 → Σ(x−x̄)(p−p̄) = −0.5, Σ(x−x̄)² = 2.75, Σ(p−p̄)² = 1
    assert math.isclose(out["position_correlation"][2], -0.5 / math.sqrt(2.75), rel_tol=1e-6)


def test_null_moments_equal_exhaustive_enumeration():
    # windows of different shapes (a BOS-like gap at 0, a short tail, a window with an interior gap: not an
    # interval) and activity patterns from none to all, runs and alternations; S over every combination of shifts
    valid_sets = [(0, 1, 2, 3, 4), (1, 2, 3, 4), (0, 1, 2), (0, 1, 2, 3, 4), (0, 2, 3, 4)]
    patterns = [  # per neuron, each window's activity over its valid positions
        ([1, 1, 0, 0, 0], [0, 1, 1, 0], [1, 0, 0], [1, 1, 1, 0, 0], [0, 0, 1, 1]),
        ([0, 0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0], [1, 0, 1, 0, 0], [1, 0, 1, 0]),
        ([1, 1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1]),
        ([1, 0, 1, 0, 1], [1, 0, 0, 1], [0, 0, 1], [0, 1, 1, 1, 1], [1, 1, 0, 0]),
    ]
    L, E = 5, len(patterns)
    valid = torch.zeros(len(valid_sets), L, dtype=torch.bool)
    active = torch.zeros(len(valid_sets), L, E, dtype=torch.bool)
    for w, pos in enumerate(valid_sets):
        valid[w, list(pos)] = True
        for e, windows in enumerate(patterns):
            active[w, list(pos), e] = torch.tensor(windows[w]).bool()
    acc = PositionalAccumulator()
    acc.update(_batch(active, valid))
    null = acc.shift_null()
    for e, windows in enumerate(patterns):
        mean, var = enumerate_shift_moments(valid_sets, list(windows), L)
        assert math.isclose(float(null["mean"][e]), mean, rel_tol=1e-12, abs_tol=1e-12)
        assert math.isclose(float(null["variance"][e]), var, rel_tol=1e-10, abs_tol=1e-12)
    assert float(null["p_value"][2]) == 1.0  # all-or-nothing windows: S is fixed under shifting


def test_null_is_calibrated_on_shuffled_activity():
    # within-window rates vary across windows (topic), positions are exchangeable: p-values are uniform
    g = torch.Generator().manual_seed(0)
    b, L, E, reps = 8, 48, 200, 40
    rate = torch.rand(b, 1, E, generator=g) ** 2
    p_values, counts = [], []
    for _ in range(reps):
        active = torch.rand(b, L, E, generator=g) < rate
        acc = PositionalAccumulator()
        acc.update(_batch(active))
        out = acc.finalize()
        p_values.append(torch.tensor(out["positional_p_value"]))
        counts.append((out["n_positional"], out["n_positional_plugin"]))
    p = torch.stack(p_values)
    assert 0.04 < float((p < 0.05).double().mean()) < 0.06
    assert float((p < 0.01).double().mean()) < 0.014
    # 8 windows: the plug-in flags many neurons (bias ≈ 1/16 > 0.05 where fr is not small), the census none
    assert sum(c[0] for c in counts) <= 0.002 * E * reps
    assert sum(c[1] for c in counts) > 0.2 * E * reps


def test_detects_position_at_few_windows():
    # 12 windows of 64: neurons active at positions < 8 (I ≈ 0.33) or on odd positions (I = ln 2 ... less
    # the random noise of 10 % flips) are found; a neuron with 50 % activity everywhere is not
    g = torch.Generator().manual_seed(1)
    b, L = 12, 64
    pos = torch.arange(L).expand(b, L)
    flip = torch.rand(b, L, generator=g) < 0.1
    active = torch.stack([pos < 8, (pos % 2 == 1) ^ flip, torch.rand(b, L, generator=g) < 0.5], -1)
    acc = PositionalAccumulator()
    acc.update(_batch(active))
    out = acc.finalize()
    assert out["positional_neurons"] == [0, 1] and out["windows"] == 12 and out["min_tokens_per_position"] == 12


def test_batch_size_and_merge_invariance():
    # row 0 is right-padded: the first block has a shorter window, so tables grow on update and merge
    check_invariance(lambda: PositionalAccumulator(top_k=4), make_batch(seed=4), rel=1e-8)


def test_too_many_window_shapes_drops_the_null_and_says_so():
    batch = make_batch(seed=4)  # interior gaps: every window has its own shape
    acc = PositionalAccumulator(max_window_shapes=3)
    acc.update(batch)
    out = acc.finalize()
    assert out["positional_p_value"] is None and out["windows"] is None and "no circular-shift null" in out["warning"]
    assert out["positional_tested"] is False and out["positional_neurons"] == [] and out["n_positional"] == 0
    assert len(out["positional_mi"]) == batch.n_neurons  # the MI is still reported
    check_invariance(lambda: PositionalAccumulator(max_window_shapes=3), batch)


def test_moe_style_noise_without_a_null_flags_nothing():
    # a MoE expert sees the tokens routed to it (here 1 in 64): every window has its own valid positions, so
    # the shapes overflow and no null exists; pure noise must then flag nothing (the bias-corrected MI alone
    # under-corrects at ~3 tokens per position and used to flag ~40 % of these neurons)
    g = torch.Generator().manual_seed(7)
    b, L, E = 200, 128, 2000
    valid = torch.rand(b, L, generator=g) < 1 / 64
    active = torch.rand(b, L, E, generator=g) < torch.rand(E, generator=g) * 0.9 + 0.05
    acc = PositionalAccumulator()
    for rows in torch.arange(b).split(25):
        acc.update(_batch(active[rows], valid[rows]))
    out = acc.finalize()
    assert out["positional_tested"] is False and out["positional_p_value"] is None
    assert out["positional_neurons"] == [] and out["n_positional"] == 0 and "untested" in out["warning"]
    assert sum(mi > 0.05 for mi in out["positional_mi"]) > 0.2 * E  # what would have been flagged on MI alone


def test_repeated_position_in_a_window_is_refused():
    batch = make_batch(seed=5)
    batch.positions[1, 4] = batch.positions[1, 5]
    batch.valid[1, 4:6] = True
    with pytest.raises(ValueError, match="repeats a position"):
        PositionalAccumulator().update(batch)


@pytest.mark.parametrize("thr", [0.0, -0.1, 0.7, float("nan")])
def test_threshold_out_of_range(thr):
    with pytest.raises(ValueError, match="mi_threshold"):
        PositionalAccumulator(mi_threshold=thr)


def test_bad_arguments_and_empty():
    with pytest.raises(ValueError, match="top_k"):
        PositionalAccumulator(top_k=0)
    with pytest.raises(ValueError, match="alpha"):
        PositionalAccumulator(alpha=1.0)
    with pytest.raises(EmptyAccumulatorError, match="PositionalAccumulator"):
        PositionalAccumulator().finalize()
    batch = make_batch(seed=5)
    batch.positions[1, 4] = -1
    with pytest.raises(ValueError, match="positions"):
        PositionalAccumulator().update(batch)


def _markov_runs(b, L, E, run, rate, g):
    """[b, L, E] bool: a stationary two-state chain per (window, neuron): runs of activity of mean length
    ``run`` (geometric), P(active) = ``rate`` [E] at every position: bursty, but carries no position."""
    leave = 1.0 / run
    enter = rate * leave / (1 - rate)  # keeps P(active) = rate: rate·leave = (1 − rate)·enter
    active = torch.empty(b, L, E, dtype=torch.bool)
    active[:, 0] = torch.rand(b, E, generator=g) < rate
    for t in range(1, L):  # a loop over positions
        u = torch.rand(b, E, generator=g)
        active[:, t] = torch.where(active[:, t - 1], u >= leave, u < enter)
    return active


def _binomial_upper(n, p, tail=1e-6):
    """Smallest q with P(Binomial(n, p) > q) <= tail (exact sum of the pmf)."""
    total, q = 0.0, 0
    while True:
        total += math.exp(math.lgamma(n + 1) - math.lgamma(q + 1) - math.lgamma(n - q + 1)
                          + q * math.log(p) + (n - q) * math.log1p(-p))
        if 1.0 - total <= tail:
            return q
        q += 1


def test_bursty_null_is_calibrated_and_a_planted_neuron_is_found():
    # 12 windows of 128 tokens, activity in runs of 20 (as text comes in topics and phrases) and no position:
    # a within-window shuffle gives p < 0.001 to 443 of these 2,999 neurons; the circular-shift null keeps
    # the runs. A calibrated test puts p < alpha on each null neuron with probability alpha, independently
    # here, so the false positives F ~ Binomial(E, alpha) and F <= q except with probability 1e-6.
    # (The shift joins a window's end to its start, one junction the data do not have: docs/census.md
    # gives the rates measured on 20,000 such neurons, somewhat above alpha in the far tail.)
    g = torch.Generator().manual_seed(11)
    b, L, E = 12, 128, 3000
    active = _markov_runs(b, L, E, 20, torch.rand(E, generator=g) * 0.4 + 0.05, g)
    pos = torch.arange(L).expand(b, L)
    active[:, :, 0] |= pos < 16  # planted: the same bursty activity plus every one of the first 16 positions
    acc = PositionalAccumulator()
    acc.update(_batch(active))
    out = acc.finalize()
    p = torch.tensor(out["positional_p_value"])
    assert out["positional_tested"] is True and 0 in out["positional_neurons"] and float(p[0]) < 1e-6
    for alpha in (0.001, 0.01, 0.05):  # bounds 14, 59, 210 for 2,999 neurons
        assert int((p[1:] < alpha).sum()) <= _binomial_upper(E - 1, alpha), alpha
    assert len(out["positional_neurons"]) - 1 <= int((p[1:] < 0.001).sum())
