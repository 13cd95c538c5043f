"""LayerCensus: docs/design.md §8 keys, JSON-serializable, consistent with its accumulators, merge-invariant."""

import json

import pytest
import torch

from mambascope.neurons import (
    ActivityAccumulator,
    LayerCensus,
    NeuronBatch,
    PositionalAccumulator,
    TokenDetectorAccumulator,
)
from neuron_reference import assert_tree_close

KEYS = {"dead_neurons", "activation_frequency", "rarely_active", "positional_neurons", "positional_mi",
        "token_detectors", "delta_sensitive", "tokens", "warnings"}


def _layer(arch, b=4, L=12, E=6, H=3, V=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (b, L), generator=g)
    ids[:, 0] = 0  # BOS
    post = torch.randn(b, L, E, generator=g)
    if arch == "gpt2":
        return {"mlp.hook_post": post}, ids
    gate = torch.randn(b, L, E, generator=g)
    gate[..., 1] = torch.where(ids == 3, 1.0, -1.0)  # a token-3 detector
    C = H if arch == "mamba2" else E
    return {"mixer.hook_post": post, "mixer.hook_gate_pre": gate,
            "mixer.hook_dt": torch.rand(b, L, C, generator=g) + 0.01}, ids


@pytest.mark.parametrize("arch", ["mamba", "mamba2", "gpt2"])
def test_keys_json_and_consistency(arch):
    layer, ids = _layer(arch)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on row 0
    batch = NeuronBatch.from_layer(layer, arch, ids, mask, bos_token_id=0, label=1)
    census = LayerCensus(arch, vocab_size=7, layer=1, min_occurrences=3, top_k_delta=2)
    census.update(batch)
    out = census.finalize()
    assert set(out) >= KEYS and out["layer"] == 1 and out["arch"] == arch
    json.dumps(out, allow_nan=False)  # plain JSON, no NaN
    act = ActivityAccumulator()
    act.update(batch)
    pos = PositionalAccumulator()
    pos.update(batch)
    det = TokenDetectorAccumulator(vocab_size=7, min_occurrences=3)
    det.update(batch)
    a, p, d = act.finalize(), pos.finalize(), det.finalize()
    assert out["tokens"] == a["tokens"] == int(batch.valid.sum())
    for key in ("dead_neurons", "activation_frequency", "rarely_active"):
        assert out[key] == a[key]
    assert out["positional_mi"] == p["positional_mi"] and out["positional_neurons"] == p["positional_neurons"]
    assert out["token_detectors"] == d["token_detectors"]
    # 44 tokens, a few windows: every small-sample warning of the parts is carried up, in order
    assert out["warnings"] == [w for w in (a["warning"], p["warning"], d["warning"]) if w is not None]
    assert out["warnings"][0].startswith("dead:") and any(w.startswith("positional:") for w in out["warnings"])
    if arch == "gpt2":
        assert out["delta_sensitive"] is None and out["delta"] is None
    else:
        assert {"neuron": 1, "tokens": [3]} in [{k: r[k] for k in ("neuron", "tokens")} for r in out["token_detectors"]]
        assert len(out["delta_sensitive"]) == 2 and out["delta"]["n_units"] == (3 if arch == "mamba2" else 6)
        assert out["delta"]["unit"] == ("head" if arch == "mamba2" else "channel")


def test_merge_invariance():
    layer, ids = _layer("mamba", b=6)
    whole = LayerCensus("mamba", vocab_size=7, min_occurrences=3)
    whole.update(NeuronBatch.from_layer(layer, "mamba", ids, bos_token_id=0))
    parts = []
    for rows in (slice(0, 2), slice(2, 6)):
        part = LayerCensus("mamba", vocab_size=7, min_occurrences=3)
        part.update(NeuronBatch.from_layer({k: v[rows] for k, v in layer.items()}, "mamba", ids[rows],
                                           bos_token_id=0))
        parts.append(part)
    merged = LayerCensus("mamba", vocab_size=7, min_occurrences=3).merge(parts[1]).merge(parts[0])
    assert_tree_close(merged.finalize(), whole.finalize(), rel=1e-9)


def test_bad_use():
    layer, ids = _layer("mamba")
    del layer["mixer.hook_dt"]
    with pytest.raises(ValueError, match="no Δ"):
        LayerCensus("mamba", vocab_size=7).update(NeuronBatch.from_layer(layer, "mamba", ids))
    with pytest.raises(ValueError, match="unknown architecture"):
        LayerCensus("opt", vocab_size=7)
    with pytest.raises(ValueError, match="same architecture"):
        LayerCensus("mamba", vocab_size=7).merge(LayerCensus("gpt2", vocab_size=7))
    post = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="GPT-2 has none"):
        LayerCensus("gpt2", vocab_size=7).update(NeuronBatch(post, post > 0, torch.zeros(1, 2).long(),
                                                             torch.arange(2)[None], torch.ones(1, 2).bool(),
                                                             dt=post))


def test_summary_prints_each_warning_once_with_its_layers():
    import io

    from mambascope.pipeline import print_analysis_summary

    layers = {}
    for index in (0, 1):
        layer, ids = _layer("mamba", seed=index)
        census = LayerCensus("mamba", vocab_size=7, layer=index, min_occurrences=3)
        census.update(NeuronBatch.from_layer(layer, "mamba", ids, bos_token_id=0))
        layers[str(index)] = census.finalize()
    out = io.StringIO()
    print_analysis_summary({"model": {}, "corpus": {}, "layers": layers, "errors": {}}, file=out)
    text = out.getvalue()
    assert layers["0"]["warnings"] and layers["0"]["warnings"][0] == layers["1"]["warnings"][0]
    assert text.count("WARNING (layers 0, 1): dead:") == 1
    assert "plug-in MI alone:" in text and "tokens per position" in text
