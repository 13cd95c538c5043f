"""Direct logit effects and detector self-suppression against the loop reference."""

import pytest
import torch

from mambascope.neurons import detector_suppression, direct_logit_effects, top_logit_tokens
from neuron_reference import assert_tree_close, ref_effects, ref_suppression_rank


def _weights(seed=0, D=4, E=5, V=9):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(D, E, generator=g), torch.rand(D, generator=g) + 0.5, torch.randn(V, D, generator=g))


@pytest.mark.parametrize("center", [False, True])
def test_effects_match_reference(center):
    out_proj, norm, unembed = _weights()
    sign = torch.tensor([1.0, -2.0, 0.5, -0.1, 3.0])
    got = direct_logit_effects(out_proj, norm, unembed, activation_sign=sign, center=center, chunk_size=2)
    assert got.shape == (5, 9)
    assert_tree_close(got.tolist(), ref_effects(out_proj, norm, unembed, center, sign.tolist()), rel=1e-5,
                      abs_tol=1e-5)
    subset = direct_logit_effects(out_proj, None, unembed, [4, 1])
    assert_tree_close(subset.tolist(), [ref_effects(out_proj, None, unembed)[e] for e in (4, 1)], rel=1e-5,
                      abs_tol=1e-5)


def test_top_tokens():
    out_proj, norm, unembed = _weights(1)
    top = top_logit_tokens(out_proj, norm, unembed, k=3, chunk_size=2)
    ref = ref_effects(out_proj, norm, unembed)
    for e in range(5):
        order = sorted(range(9), key=lambda v, e=e: ref[e][v])
        assert top["suppressed_tokens"][e].tolist() == order[:3]
        assert top["promoted_tokens"][e].tolist() == order[::-1][:3]
    assert top["suppressed_effects"].shape == (5, 3) and top["neurons"].tolist() == [0, 1, 2, 3, 4]


def test_detector_suppression():
    out_proj, norm, unembed = _weights(2)
    # neuron 0 writes exactly against token 3's unembedding: token 3 is its most suppressed token
    out_proj[:, 0] = -unembed[3] / norm
    dets = [{"neuron": 0, "tokens": [3]}, {"neuron": 2, "tokens": [1, 3, 8]}, {"neuron": 4, "tokens": [0]}]
    got = detector_suppression(out_proj, norm, unembed, dets, k=2, chunk_size=2)
    ref = ref_effects(out_proj, norm, unembed)
    all_in = []
    for record, det in zip(got["detectors"], dets, strict=True):
        row = ref[det["neuron"]]
        ranks = [ref_suppression_rank(row, t) for t in det["tokens"]]
        assert record["suppression_rank"] == ranks
        assert record["in_top_k"] == [r <= 2 for r in ranks]
        assert record["negative"] == [row[t] < 0 for t in det["tokens"]]
        all_in.append(all(r <= 2 for r in ranks))
    assert got["detectors"][0]["suppression_rank"] == [1] and got["detectors"][0]["suppresses_all"]
    assert got["fraction_suppressing_own_triggers"] == sum(all_in) / 3
    n_pairs = sum(len(d["tokens"]) for d in dets)
    assert got["trigger_fraction_in_top_k"] == sum(sum(r["in_top_k"]) for r in got["detectors"]) / n_pairs
    empty = detector_suppression(out_proj, norm, unembed, [])
    assert empty["n_detectors"] == 0 and empty["fraction_suppressing_own_triggers"] is None


def test_bad_input():
    out_proj, norm, unembed = _weights()
    with pytest.raises(ValueError, match="unembed"):
        direct_logit_effects(out_proj, norm, unembed.T)
    with pytest.raises(ValueError, match="norm_weight"):
        direct_logit_effects(out_proj, norm[:3], unembed)
    with pytest.raises(ValueError, match="neuron indices"):
        direct_logit_effects(out_proj, norm, unembed, [5])
    with pytest.raises(ValueError, match="trigger token"):
        detector_suppression(out_proj, norm, unembed, [{"neuron": 0, "tokens": [9]}])
    with pytest.raises(ValueError, match="activation_sign must be finite"):
        direct_logit_effects(out_proj, norm, unembed, activation_sign=torch.full((5,), float("nan")))
