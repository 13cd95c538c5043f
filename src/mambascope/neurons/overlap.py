"""Overlap between neuron groups of one layer (docs/design.md §5: "counts and Jaccard between all groups")."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor


def group_overlap(groups: Mapping[str, Iterable[int] | Tensor], n_neurons: int | None = None) -> dict[str, Any]:
    """Pairwise intersections and Jaccard indices between named groups of neuron indices.

    ``groups`` maps a name (dead, rarely_active, positional, token_detector, delta_sensitive, …) to
    the neuron indices of one layer (duplicates count once). With the membership matrix
    M [G, E] (M[g,e] = e ∈ group g), intersection = M·Mᵀ [G,G], |g| = diag, union = |a| + |b| − |a∩b|,
    Jaccard(a,b) = |a∩b| / |a∪b|, None when both groups are empty (0/0 is undefined).
    ``n_neurons`` (E) bounds the indices; by default E = largest index + 1.

    Returns ``groups`` (names, in order), ``sizes`` {name: size}, ``intersection`` and ``jaccard``
    ([G][G] lists), and ``pairs``: one record {a, b, intersection, union, jaccard} per unordered pair.
    """
    names = list(groups)
    indices = [torch.as_tensor(list(v) if not isinstance(v, Tensor) else v, dtype=torch.long).flatten().cpu()
               for v in groups.values()]
    for name, idx in zip(names, indices, strict=True):
        if idx.numel() and int(idx.min()) < 0:
            raise ValueError(f"group {name!r} has a negative neuron index")
        if n_neurons is not None and idx.numel() and int(idx.max()) >= n_neurons:
            raise ValueError(f"group {name!r} has neuron index {int(idx.max())} >= n_neurons={n_neurons}")
    if n_neurons is None:
        n_neurons = max((int(i.max()) + 1 for i in indices if i.numel()), default=0)
    member = torch.zeros(len(names), n_neurons, dtype=torch.float64)
    for g, idx in enumerate(indices):  # a loop over the handful of groups
        member[g, idx] = 1.0
    inter = (member @ member.T).long()  # exact: counts << 2^53
    size = inter.diagonal()
    union = size[:, None] + size[None, :] - inter
    jaccard = inter.double() / union.clamp_min(1).double()
    jac = [[None if u == 0 else j for j, u in zip(jr, ur, strict=True)]
           for jr, ur in zip(jaccard.tolist(), union.tolist(), strict=True)]
    pairs = [
        {"a": names[a], "b": names[b], "intersection": int(inter[a, b]), "union": int(union[a, b]),
         "jaccard": jac[a][b]}
        for a in range(len(names)) for b in range(a + 1, len(names))
    ]
    return {
        "groups": names,
        "n_neurons": n_neurons,
        "sizes": dict(zip(names, size.tolist(), strict=True)),
        "intersection": inter.tolist(),
        "jaccard": jac,
        "pairs": pairs,
    }
