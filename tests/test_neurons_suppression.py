"""Direct logit effects and detector self-suppression against the loop reference and, in the census, against
a hand-hooked forward of the bundled Mamba."""

import pytest
import torch

from mambascope.data import load_corpus, tokenize_windows
from mambascope.models import load_model
from mambascope.neurons import detector_suppression, direct_logit_effects, top_logit_tokens
from mambascope.pipeline import census_pass
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
    sign = torch.tensor([1.0, 1.0, -0.3, 1.0, 2.0])
    got = detector_suppression(out_proj, norm, unembed, dets, k=2, chunk_size=2, activation_sign=sign)
    ref = ref_effects(out_proj, norm, unembed, sign=sign.tolist())
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
    empty = detector_suppression(out_proj, norm, unembed, [], activation_sign=sign)
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
        detector_suppression(out_proj, norm, unembed, [{"neuron": 0, "tokens": [9]}], activation_sign=torch.ones(5))
    with pytest.raises(ValueError, match="activation_sign must be finite"):
        direct_logit_effects(out_proj, norm, unembed, activation_sign=torch.full((5,), float("nan")))


def test_a_negative_detector_suppresses_what_it_lowers_when_it_fires():
    """Writing exactly against its trigger suppresses it for a positive activation; a detector whose typical
    activation is negative raises that trigger instead (rank V, not 1)."""
    out_proj, norm, unembed = _weights(3)
    out_proj[:, 1] = -unembed[4] / norm
    dets = [{"neuron": 1, "tokens": [4]}]
    up = detector_suppression(out_proj, norm, unembed, dets, k=2, activation_sign=torch.ones(5))
    down = detector_suppression(out_proj, norm, unembed, dets, k=2, activation_sign=-torch.ones(5))
    assert up["detectors"][0]["suppression_rank"] == [1] and up["fraction_suppressing_own_triggers"] == 1.0
    assert down["detectors"][0]["suppression_rank"] == [9] and down["fraction_suppressing_own_triggers"] == 0.0


def _hooked_units(model, windows):
    """Per layer (post, z): the input of out_proj and the gate half of in_proj's output, by hand-made hooks."""
    seen, hooks = {}, []
    for layer, block in enumerate(model.backbone.layers):
        mixer = block.mixer
        E = mixer.out_proj.in_features
        hooks += [mixer.in_proj.register_forward_hook(
                      lambda m, args, out, layer=layer, E=E: seen.__setitem__((layer, "z"), out[..., E:])),
                  mixer.out_proj.register_forward_pre_hook(
                      lambda m, args, layer=layer: seen.__setitem__((layer, "post"), args[0]))]
    try:
        with torch.no_grad():
            model(windows)
    finally:
        for h in hooks:
            h.remove()
    return {layer: (seen[layer, "post"], seen[layer, "z"]) for layer in range(len(model.backbone.layers))}


def test_census_suppression_uses_the_sign_of_the_typical_activation():
    """census_pass on tiny-mamba against an independent computation: post and the gate z from hand-made hooks
    (``_hooked_units``); the typical activation is the mean post over gate-open non-BOS tokens; effect = sign ·
    W_U (g ⊙ w_e) in float64. Detectors whose typical activation is negative must exist (else the test would
    not test the sign)."""
    model, tok = load_model("tiny-mamba", device="cpu")
    windows = tokenize_windows(load_corpus("builtin", "validation").texts[:300], tok, 32, max_tokens=32 * 48).ids
    # loose detector thresholds so that 1.5k tokens yield detectors on the bundled model
    options = {"min_occurrences": 2, "coverage": 0.5, "min_precision": 0.6}
    layers = census_pass(model, tok, windows, progress=False, census_options=options)["layers"]
    W_U, g = model.lm_head.weight.detach().double(), model.backbone.norm_f.weight.detach().double()
    negative = []
    for layer, (post, z) in _hooked_units(model, windows).items():
        result = layers[str(layer)]
        active = (z > 0) & (windows != tok.bos_token_id)[..., None]
        mean_active = (post.double() * active).sum((0, 1)) / active.sum((0, 1))
        W = model.backbone.layers[layer].mixer.out_proj.weight.detach().double()
        for r in result["suppression"]["detectors"]:
            e = r["neuron"]
            if mean_active[e] < 0:
                negative.append((layer, e))
            effect = torch.sign(mean_active[e]) * (W_U @ (g * W[:, e]))
            assert r["effect"] == pytest.approx([float(effect[t]) for t in r["tokens"]], rel=1e-4, abs=1e-5)
            assert r["suppression_rank"] == [1 + int((effect < effect[t]).sum()) for t in r["tokens"]]
            promoted = effect.sort(descending=True).values[:10]
            assert result["logit_effects"]["promoted_values"][e] == pytest.approx(promoted.tolist(), rel=1e-4,
                                                                                  abs=1e-5)
    assert negative, "no detector with a negative typical activation: the sign is not exercised"
