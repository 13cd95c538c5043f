"""Token detectors and n-gram coverage: loop reference, hand-made cases, invariance, bad input."""

from collections import Counter

import pytest
import torch

from mambascope.neurons import (
    CountTable,
    EmptyAccumulatorError,
    NeuronBatch,
    TokenDetectorAccumulator,
    cover_counts,
    detector_tokens_by_layer,
    ngram_ids,
)
from mambascope.neurons._common import DIRECT_KEYS
from mambascope.neurons.detectors import cover_columns
from neuron_reference import check_invariance, make_batch, ref_detectors, ref_wilson_lower


def _row_batch(tokens, active, valid=None):
    """One window; ``active`` [L, E] lists."""
    tok = torch.tensor([tokens])
    act = torch.tensor([active], dtype=torch.bool)
    valid = torch.ones_like(tok, dtype=torch.bool) if valid is None else torch.tensor([valid])
    return NeuronBatch(torch.zeros(act.shape), act, tok, torch.arange(tok.shape[1])[None], valid)


@pytest.fixture(params=["direct", "sorted"])
def key_index(request, monkeypatch):
    """Run a test with the tables' direct key index (toy vocabularies) and with the sorted one (real ones)."""
    if request.param == "sorted":
        monkeypatch.setattr("mambascope.neurons._common.DIRECT_KEYS", 0)
    return request.param


@pytest.mark.parametrize("seed", [0, 7])
def test_matches_brute_force_reference(seed, key_index):
    batch = make_batch(seed=seed)
    acc = TokenDetectorAccumulator(vocab_size=8, min_occurrences=5)
    acc.update(batch)
    got = acc.finalize()
    ref = ref_detectors(batch.token_ids, batch.active, batch.valid, min_occurrences=5)
    assert {d["neuron"]: sorted(d["tokens"]) for d in got["token_detectors"]} == ref["detectors"]
    assert ref["detectors"][2] == [2, 5]  # the planted detector is found; the random neurons are not
    assert not {0, 6, 7} & set(ref["detectors"])
    assert got["activations"] == ref["activations"]
    assert got["tokens_covered"] == sorted({t for ts in ref["detectors"].values() for t in ts})
    for n in (1, 2, 3):
        assert got["ngram_coverage"][str(n)]["needed"] == ref["needed"][n], n
    occ = torch.bincount(batch.token_ids[batch.valid], minlength=8)
    for d in got["token_detectors"]:
        assert d["precision"] == [d["counts"][i] / int(occ[t]) for i, t in enumerate(d["tokens"])]
        assert d["counts"] == sorted(d["counts"], reverse=True)
        assert d["occurrences"] == [int(occ[t]) for t in d["tokens"]]
        lower = [ref_wilson_lower(c, o) for c, o in zip(d["counts"], d["occurrences"], strict=True)]
        assert d["precision_lower_bound"] == pytest.approx(lower, abs=1e-9)
        assert d["established"] == all(b >= 0.95 for b in lower)


def test_few_occurrences_are_flagged_not_established():
    # neuron 0 fires on every one of 5 occurrences of token 1 (lower bound 0.65), neuron 1 on each of 60
    # occurrences of token 2 (lower bound 0.957): both pass Voita's test, only the second is established
    tokens = [1] * 5 + [2] * 60 + [3] * 20
    active = [[t == 1, t == 2] for t in tokens]
    acc = TokenDetectorAccumulator(vocab_size=4, min_occurrences=5)
    acc.update(_row_batch(tokens, active))
    out = acc.finalize()
    by_neuron = {d["neuron"]: d for d in out["token_detectors"]}
    assert set(by_neuron) == {0, 1} and out["n_established"] == 1
    assert not by_neuron[0]["established"] and by_neuron[1]["established"]
    assert by_neuron[0]["precision_lower_bound"][0] == pytest.approx(ref_wilson_lower(5, 5), abs=1e-9)
    assert "1 of 2" in out["warning"] and ">= 52 occurrences" in out["warning"]
    strong = TokenDetectorAccumulator(vocab_size=4, min_occurrences=5)
    strong.update(_row_batch(tokens, [[False, t == 2] for t in tokens]))
    assert strong.finalize()["warning"] is None


def test_precision_and_type_limits():
    tokens = [1, 2] * 5 + [3] * 5
    # neuron 0 fires on every 1; neuron 1 on every token (3 types, all precise); neuron 2 on 1 and on one 2
    active = [[t == 1, True, t == 1 or (k == 1)] for k, t in enumerate(tokens)]
    acc = TokenDetectorAccumulator(vocab_size=4, min_occurrences=5, max_types=5)
    acc.update(_row_batch(tokens, active))
    dets = {d["neuron"]: d["tokens"] for d in acc.finalize()["token_detectors"]}
    # neuron 2: token 2 fires it on 1/5 of its occurrences, token 1 covers 5/6 < 95% → not a detector
    assert dets == {0: [1], 1: [1, 2, 3]}
    narrow = TokenDetectorAccumulator(vocab_size=4, min_occurrences=5, max_types=2)
    narrow.update(_row_batch(tokens, active))
    assert {d["neuron"] for d in narrow.finalize()["token_detectors"]} == {0}
    rare = TokenDetectorAccumulator(vocab_size=4, min_occurrences=6)  # every type occurs only 5 times
    rare.update(_row_batch(tokens, active))
    assert rare.finalize()["token_detectors"] == []


def test_precision_boundary_is_inclusive():
    tokens = [1] * 20 + [2] * 5
    # neuron 0 fires on 19 of the 20 ones (precision exactly 95%), neuron 1 on 18 of them (90%)
    active = [[t == 1 and k != 0, t == 1 and k > 1] for k, t in enumerate(tokens)]
    acc = TokenDetectorAccumulator(vocab_size=3)
    acc.update(_row_batch(tokens, active))
    out = acc.finalize()["token_detectors"]
    assert [(d["neuron"], d["tokens"], d["precision"]) for d in out] == [(0, [1], [0.95])]


def test_ngrams_end_at_the_active_token():
    tokens = [5, 1, 2, 6, 1, 2, 7]
    # neuron 0 fires at k = 2 and k = 5: backward bigrams (1,2),(1,2) → 1 needed (forward ones would be 2);
    # trigrams (5,1,2),(6,1,2) → 2. Neuron 1 fires at k = 0 only: no bigram/trigram exists there.
    active = [[k in (2, 5), k == 0] for k in range(7)]
    acc = TokenDetectorAccumulator(vocab_size=8, min_occurrences=1)
    acc.update(_row_batch(tokens, active))
    cov = acc.finalize()["ngram_coverage"]
    assert cov["1"]["needed"] == [1, 1]
    assert cov["2"]["needed"] == [1, None] and cov["3"]["needed"] == [2, None]
    assert cov["2"]["activations_counted"] == 2 and cov["1"]["activations_counted"] == 3
    # an invalid (padding) token at k = 4 breaks the n-grams that contain it
    gap = TokenDetectorAccumulator(vocab_size=8, min_occurrences=1)
    gap.update(_row_batch(tokens, active, [k != 4 for k in range(7)]))
    assert gap.finalize()["ngram_coverage"]["2"]["needed"] == [1, None]
    assert gap.finalize()["ngram_coverage"]["2"]["activations_counted"] == 1


def test_ngram_ids_encoding():
    tok = torch.tensor([[3, 1, 2, 0]])
    valid = torch.tensor([[True, True, True, False]])
    ids, ok = ngram_ids(tok, valid, 3, 10)
    assert ok.tolist() == [[False, False, True, False]]
    assert int(ids[0, 2]) == 3 * 100 + 1 * 10 + 2
    ids, ok = ngram_ids(tok[:, :2], valid[:, :2], 3, 10)  # window shorter than n
    assert not ok.any()


@pytest.mark.parametrize("M", [50, DIRECT_KEYS + 50])  # a direct index, and the sorted one
def test_count_table_matches_counter(M):
    """Rows of counts per n-gram, added in batches with new and repeated n-grams, merged and cloned, against a
    Counter of (neuron, n-gram) events; the float32 rows turn float64 before a count could pass 2²⁴ (where
    float32 integers stop being exact)."""
    g = torch.Generator().manual_seed(0)
    E = 3
    table, other, expected = CountTable(E, M), CountTable(E, M), Counter()
    for i in range(7):
        grams = torch.unique(torch.randint(0, 49, (12,), generator=g)) * ((M - 1) // 49)  # never M − 1
        counts = torch.randint(0, 3, (grams.numel(), E), generator=g, dtype=torch.int32)
        for r, gram in enumerate(grams.tolist()):
            for e in range(E):
                expected[(e, gram)] += int(counts[r, e])
        (table if i % 2 else other).count_rows(grams, counts, 2)
    table.merge(other.clone())
    neuron, gram, count = table.entries()
    assert dict(zip(zip(neuron.tolist(), gram.tolist(), strict=True), count.tolist(), strict=True)) == {
        k: v for k, v in expected.items() if v}
    assert list(zip(neuron.tolist(), gram.tolist(), strict=True)) == sorted(k for k, v in expected.items() if v)
    assert table.by_id()[0].tolist() == sorted({k[1] for k in expected})  # the index: every n-gram seen, once
    assert table.values.dtype == torch.float32
    table.count(torch.tensor([7, -1, 7]), torch.ones(3, E, dtype=torch.int32), 2**24)  # −1: a slot without n-gram
    table.count(torch.tensor([M - 1]), torch.tensor([[0, 1, 0]], dtype=torch.int32), 1)  # lands in the cleared row
    assert table.values.dtype == torch.float64
    for e in range(E):
        expected[(e, 7)] += 2
    expected[(1, M - 1)] += 1
    neuron, gram, count = table.entries()
    assert dict(zip(zip(neuron.tolist(), gram.tolist(), strict=True), count.tolist(), strict=True)) == {
        k: v for k, v in expected.items() if v}


@pytest.mark.parametrize("coverage", [0.95, 0.5, 0.25, 1.0])
def test_cover_columns_equals_the_sorted_cover(coverage):
    """The bisection over count values gives the sort-based cover exactly, also where coverage·total is hit
    exactly (0.5, 0.25 of even totals) and for neurons without counts."""
    g = torch.Generator().manual_seed(3)
    values = (torch.rand(40, 9, generator=g) ** 3 * 12).floor()
    values[:, 4] = 0  # a neuron that never fired
    values[:5, 5], values[5:, 5] = 3.0, 0.0  # ties at the cut
    row, neuron = values.T.nonzero(as_tuple=True)[::-1]
    order = torch.argsort(neuron * 100 + row)
    expected = cover_counts(neuron[order], values[row, neuron][order].long(), 9, coverage)
    for dtype in (torch.float32, torch.float64):
        got = cover_columns(values.to(dtype), coverage)
        assert got[0].tolist() == expected[0].tolist() and got[1].tolist() == expected[1].tolist()


def test_batch_size_and_merge_invariance(key_index):
    check_invariance(lambda: TokenDetectorAccumulator(vocab_size=8), make_batch(seed=8))


def test_tokens_by_layer():
    out = detector_tokens_by_layer([[3, 1], [1, 4, 4], [], [5, 3]])
    assert [o["covered"] for o in out] == [2, 2, 0, 2]
    assert [o["new"] for o in out] == [[1, 3], [4], [], [5]]
    assert [o["cumulative"] for o in out] == [2, 3, 3, 4]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"coverage": 0.0}, "coverage"), ({"min_precision": 1.5}, "min_precision"), ({"max_types": 0}, "max_types"),
     ({"min_occurrences": 0}, "min_occurrences"), ({"vocab_size": 0}, "vocab_size"),
     ({"ngram_orders": (0,)}, "ngram order")],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenDetectorAccumulator(**{"vocab_size": 8, **kwargs})


def test_bad_input_and_empty():
    with pytest.raises(EmptyAccumulatorError):
        TokenDetectorAccumulator(vocab_size=8).finalize()
    with pytest.raises(ValueError, match="vocab_size=4"):
        TokenDetectorAccumulator(vocab_size=4).update(make_batch(V=8))
    with pytest.raises(ValueError, match="overflow int64"):
        TokenDetectorAccumulator(vocab_size=3_000_000).update(make_batch())
    with pytest.raises(ValueError, match="ngram_orders"):
        TokenDetectorAccumulator(vocab_size=8, ngram_orders=(1,)).merge(TokenDetectorAccumulator(vocab_size=8))
