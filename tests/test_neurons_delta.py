"""DeltaAccumulator: moments, selectivity, driving tokens against the loop reference; invariance; bad input."""

import pytest
import torch

from mambascope.neurons import DeltaAccumulator, EmptyAccumulatorError
from neuron_reference import assert_tree_close, check_invariance, make_batch, ref_delta


def _batch():
    batch = make_batch(seed=11, C=5)
    batch.dt[..., 3] *= torch.exp(2 * batch.post[..., 6])  # channel 3: much wider ln Δ → most selective
    return batch


def test_matches_reference():
    batch = _batch()
    acc = DeltaAccumulator(vocab_size=8, top_k=3, top_tokens=4, min_occurrences=12, layer=2)
    acc.update(batch)
    got = acc.finalize()
    ref = ref_delta(batch.dt.double(), batch.token_ids, batch.valid, 3, 4, 12)
    for key in ("mean", "std", "selectivity"):
        assert_tree_close(got[key], ref[key], rel=1e-9, path=key)
    assert [r["index"] for r in got["top_k"]] == ref["top"] and ref["top"][0] == 3
    for record in got["top_k"]:
        expected = ref["drivers"][record["index"]]
        assert [d["token"] for d in record["top_tokens"]] == [t for t, _, _ in expected]
        assert_tree_close([d["mean_dt"] for d in record["top_tokens"]], [m for _, m, _ in expected])
        assert [d["count"] for d in record["top_tokens"]] == [n for _, _, n in expected]
        assert all(d["count"] >= 12 for d in record["top_tokens"])  # the occurrence filter bites
        assert record["selectivity"] == got["selectivity"][record["index"]]
    assert got["unit"] == "channel" and got["n_units"] == 5 and got["tokens"] == int(batch.valid.sum())


def test_token_channel_subset_and_none():
    batch = _batch()
    sub = DeltaAccumulator(vocab_size=8, top_k=3, token_channels=[3, 0], unit="head")
    sub.update(batch)
    full = DeltaAccumulator(vocab_size=8, top_k=3, unit="head")
    full.update(batch)
    got, ref = sub.finalize(), full.finalize()
    assert sub.token_sum.width == 2 and got["unit"] == "head"
    for mine, theirs in zip(got["top_k"], ref["top_k"], strict=True):
        assert mine["top_tokens"] == (theirs["top_tokens"] if mine["index"] in (0, 3) else None)
    off = DeltaAccumulator(vocab_size=8, token_channels=None)
    off.update(batch)
    assert all(r["top_tokens"] is None for r in off.finalize()["top_k"])


def test_batch_size_and_merge_invariance():
    check_invariance(lambda: DeltaAccumulator(vocab_size=8, top_k=5, min_occurrences=3), _batch())


def test_bad_input():
    batch = _batch()
    batch.dt[1, 6, 2] = 0.0
    if not batch.valid[1, 6]:
        batch.valid[1, 6] = True
    with pytest.raises(ValueError, match=r"layer 9 is <= 0 at batch row 1, position 6"):
        DeltaAccumulator(vocab_size=8, layer=9).update(batch)
    with pytest.raises(ValueError, match="no Δ"):
        DeltaAccumulator(vocab_size=8).update(make_batch())
    with pytest.raises(ValueError, match="token_channels"):
        DeltaAccumulator(vocab_size=8, max_table_bytes=100).update(_batch())
    with pytest.raises(ValueError, match="token_channels index 7"):
        DeltaAccumulator(vocab_size=8, token_channels=[7]).update(_batch())
    with pytest.raises(ValueError, match="unit"):
        DeltaAccumulator(vocab_size=8, unit="neuron")
    with pytest.raises(ValueError, match="token_channels"):
        DeltaAccumulator(vocab_size=8, token_channels=[])
    with pytest.raises(EmptyAccumulatorError):
        DeltaAccumulator(vocab_size=8).finalize()
