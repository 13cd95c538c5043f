"""TopContextAccumulator against a brute-force search, and its batching/merge invariance."""

import math

import pytest
import torch

from mambascope.neurons import NeuronBatch
from mambascope.neurons.top_contexts import TopContextAccumulator


def _batch(post, ids, valid, windows):
    b, L, _ = post.shape
    return NeuronBatch(post=post, active=post > 0, token_ids=ids, positions=torch.arange(L).expand(b, L),
                       valid=valid, window_ids=windows)


def _data(seed=0, n=7, L=9, E=4, V=20):
    g = torch.Generator().manual_seed(seed)
    post = torch.randn(n, L, E, generator=g).round(decimals=1)  # rounding plants ties
    ids = torch.randint(0, V, (n, L), generator=g)
    valid = torch.rand(n, L, generator=g) > 0.2
    return post, ids, valid


def _reference(post, ids, valid, k, width):
    n, L, E = post.shape
    out = []
    for e in range(E):
        cands = [(-abs(float(post[w, p, e])), w, p) for w in range(n) for p in range(L) if valid[w, p]]
        cands.sort()
        peaks = []
        for _, w, p in cands[:k]:
            ctx = [int(ids[w, q]) if q >= 0 else -1 for q in range(p - width + 1, p + 1)]
            acts = [float(post[w, q, e]) if q >= 0 else None for q in range(p - width + 1, p + 1)]
            peaks.append((float(post[w, p, e]), w, p, ctx, acts))
        out.append(peaks)
    return out


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_matches_brute_force_for_any_batching(batch_size):
    post, ids, valid = _data()
    acc = TopContextAccumulator(k=3, width=4)
    for s in range(0, post.shape[0], batch_size):
        sl = slice(s, s + batch_size)
        acc.update(_batch(post[sl], ids[sl], valid[sl], torch.arange(post.shape[0])[sl]))
    got = acc.finalize()
    for e, peaks in enumerate(_reference(post, ids, valid, 3, 4)):
        assert got["windows"][e] == [w for _, w, *_ in peaks]
        assert got["positions"][e] == [p for _, _, p, *_ in peaks]
        assert got["context_tokens"][e] == [c for *_, c, _ in peaks]
        for mine, (*_, acts) in zip(got["context_post"][e], peaks, strict=True):
            assert all((a is None and b is None) or math.isclose(a, b, rel_tol=1e-6)
                       for a, b in zip(mine, acts, strict=True))
        assert got["values"][e] == pytest.approx([v for v, *_ in peaks])


def test_merge_equals_single_pass():
    post, ids, valid = _data(seed=1)
    whole = TopContextAccumulator(k=4, width=3)
    whole.update(_batch(post, ids, valid, torch.arange(7)))
    a, b = TopContextAccumulator(k=4, width=3), TopContextAccumulator(k=4, width=3)
    a.update(_batch(post[:2], ids[:2], valid[:2], torch.arange(2)))
    b.update(_batch(post[2:], ids[2:], valid[2:], torch.arange(2, 7)))
    assert b.merge(a).finalize() == whole.finalize()


def test_needs_window_ids_and_fewer_tokens_than_k():
    post, ids, valid = _data()
    with pytest.raises(ValueError, match="window_ids"):
        TopContextAccumulator().update(NeuronBatch(post=post, active=post > 0, token_ids=ids,
                                                   positions=torch.zeros_like(ids), valid=valid))
    few = torch.zeros_like(valid)
    few[0, 3] = True
    acc = TopContextAccumulator(k=5, width=2)
    acc.update(_batch(post, ids, few, torch.arange(7)))
    assert all(len(v) == 1 for v in acc.finalize()["values"])
