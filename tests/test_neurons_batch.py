"""NeuronBatch construction from a traced layer: activity rules, positions, validity, bad input."""

import pytest
import torch

from mambascope.neurons import NeuronBatch, NonFiniteError


def _mamba_layer(b=2, L=5, E=4, C=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "mixer.hook_post": torch.randn(b, L, E, generator=g),
        "mixer.hook_gate_pre": torch.randn(b, L, E, generator=g),
        "mixer.hook_dt": torch.rand(b, L, C, generator=g) + 0.1,
    }


def test_mamba_gate_rule_left_padding_and_bos():
    layer = _mamba_layer()
    ids = torch.tensor([[9, 9, 0, 5, 6], [0, 1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    batch = NeuronBatch.from_layer(layer, "mamba", ids, mask, bos_token_id=0, label=3)
    assert torch.equal(batch.active, layer["mixer.hook_gate_pre"] > 0)
    assert batch.post is layer["mixer.hook_post"] and batch.dt is layer["mixer.hook_dt"]
    # positions count from the first non-pad token; BOS keeps position 0 but is invalid
    assert batch.positions.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert batch.valid.tolist() == [[False, False, False, True, True], [False, True, True, True, True]]
    assert batch.layer == 3 and batch.token_ids.dtype == torch.long


def test_magnitude_rule_and_gpt2():
    layer = _mamba_layer()
    ids = torch.ones(2, 5, dtype=torch.long)
    mag = NeuronBatch.from_layer(layer, "mamba2", ids, rule="magnitude", eps=0.5)
    assert torch.equal(mag.active, layer["mixer.hook_post"].abs() > 0.5)
    assert mag.valid.all() and mag.positions[1].tolist() == [0, 1, 2, 3, 4]
    post = torch.tensor([[[-0.1, 0.0, 0.3]]])
    gpt = NeuronBatch.from_layer({"mlp.hook_post": post, "mixer.hook_dt": post}, "gpt2", torch.zeros(1, 1).long())
    assert gpt.active.tolist() == [[[False, False, True]]] and gpt.dt is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"arch": "rwkv"}, ValueError, "unknown architecture"),
        ({"rule": "relu"}, ValueError, "unknown activity rule"),
        ({"eps": 0.1}, ValueError, "eps applies only"),
        ({"rule": "magnitude", "eps": -1.0}, ValueError, "eps must be"),
        ({"input_ids": torch.zeros(2, 4).long()}, ValueError, "input_ids shape"),
    ],
)
def test_from_layer_bad_arguments(kwargs, error, match):
    args = {"layer": _mamba_layer(), "arch": "mamba", "input_ids": torch.zeros(2, 5).long(), **kwargs}
    with pytest.raises(error, match=match):
        NeuronBatch.from_layer(**args)


def test_missing_units_are_named():
    layer = _mamba_layer()
    del layer["mixer.hook_gate_pre"]
    with pytest.raises(KeyError, match="hook_gate_pre"):
        NeuronBatch.from_layer(layer, "mamba", torch.zeros(2, 5).long())
    with pytest.raises(KeyError, match=r"mlp\.hook_post"):
        NeuronBatch.from_layer(layer, "gpt2", torch.zeros(2, 5).long())


def test_non_finite_post_and_dt_name_layer_row_position():
    layer = _mamba_layer()
    layer["mixer.hook_post"][1, 2, 3] = float("nan")
    layer["mixer.hook_post"][1, 4, 0] = float("inf")
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(NonFiniteError, match=r"layer 7 .*batch row 1, position 2, channel 3"):
        NeuronBatch.from_layer(layer, "mamba", ids, label=7)
    # a NaN on a padding token never enters a statistic, so it is accepted
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 2] = mask[1, 4] = 0
    NeuronBatch.from_layer(layer, "mamba", ids, mask)
    layer = _mamba_layer()
    layer["mixer.hook_dt"][0, 1, 2] = float("inf")
    with pytest.raises(NonFiniteError, match=r"Δ .*layer blocks.2 .*batch row 0, position 1"):
        NeuronBatch.from_layer(layer, "mamba", ids, label="blocks.2")


def test_constructor_validates_shapes():
    post = torch.zeros(2, 3, 4)
    ok = {"post": post, "active": post > 0, "token_ids": torch.zeros(2, 3).long(),
          "positions": torch.zeros(2, 3).long(), "valid": torch.ones(2, 3, dtype=torch.bool)}
    NeuronBatch(**ok)
    for name, bad in [("active", post), ("token_ids", torch.zeros(2, 3)), ("valid", torch.ones(2, 3)),
                      ("positions", torch.zeros(3, 2).long()), ("dt", torch.zeros(2, 4, 1))]:
        with pytest.raises(ValueError, match=name if name != "positions" else "positions must have shape"):
            NeuronBatch(**{**ok, name: bad})


def test_accumulators_recheck_edited_batches():
    from mambascope.neurons import ActivityAccumulator, DeltaAccumulator, PositionalAccumulator
    from neuron_reference import make_batch

    batch = make_batch(C=3, layer="blocks.5")
    batch.post[2, 7, 1] = float("nan")  # edited after construction
    batch.valid[2, 7] = True
    for acc in (ActivityAccumulator(), PositionalAccumulator()):
        with pytest.raises(NonFiniteError, match=r"blocks\.5 .*batch row 2, position 7"):
            acc.update(batch)
    batch = make_batch(C=3)
    batch.dt[0, 4, 2] = float("-inf")
    batch.valid[0, 4] = True
    with pytest.raises(NonFiniteError, match=r"layer 3 .*batch row 0, position 4"):
        DeltaAccumulator(vocab_size=8, layer=3).update(batch)
