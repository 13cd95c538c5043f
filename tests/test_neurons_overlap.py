"""group_overlap against set arithmetic."""

import pytest
import torch

from mambascope.neurons import group_overlap
from neuron_reference import ref_overlap


def test_matches_sets():
    groups = {"dead": [0, 3, 5], "rarely_active": [], "positional": torch.tensor([3, 4, 5, 5]),
              "token_detector": [1, 3], "delta_sensitive": [9]}
    out = group_overlap(groups, n_neurons=10)
    inter, jac = ref_overlap({k: [int(i) for i in v] for k, v in groups.items()})
    assert out["intersection"] == inter and out["jaccard"] == jac
    assert out["sizes"] == {"dead": 3, "rarely_active": 0, "positional": 3, "token_detector": 2,
                            "delta_sensitive": 1}
    assert out["jaccard"][1][1] is None  # empty vs empty: undefined, not 0 or 1
    pair = next(p for p in out["pairs"] if p["a"] == "dead" and p["b"] == "positional")
    assert pair == {"a": "dead", "b": "positional", "intersection": 2, "union": 4, "jaccard": 0.5}
    assert len(out["pairs"]) == 10
    assert group_overlap(groups)["n_neurons"] == 10  # inferred from the largest index


def test_bad_indices():
    with pytest.raises(ValueError, match="n_neurons=4"):
        group_overlap({"a": [4]}, n_neurons=4)
    with pytest.raises(ValueError, match="negative"):
        group_overlap({"a": [-1]})
