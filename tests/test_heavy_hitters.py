"""The bounded (neuron, n-gram) summary against the exact count table: every count, and the n-gram coverage,
within the Misra–Gries bound (docs/census.md), also after merging and on a real census."""

import pytest
import torch

from mambascope.neurons.detectors import TokenDetectorAccumulator, cover_counts
from mambascope.neurons.heavy_hitters import BoundedTokenDetectorAccumulator, HeavyHitterTable, coverage_bounds

E, MODULUS = 6, 1000


def skewed_events(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, counts) of n events: neuron uniform, n-gram Zipf-like over MODULUS ids."""
    g = torch.Generator().manual_seed(seed)
    neuron = torch.randint(0, E, (n,), generator=g)
    gram = (torch.rand(n, generator=g) ** 8 * MODULUS).long()  # half of the mass on about 4 ids
    keys, counts = torch.unique(neuron * MODULUS + gram, return_counts=True)
    return keys, counts


class ExactPairs:
    """The exact (key, count) table a summary approximates: every pair kept, equal keys summed (torch.unique)."""

    def __init__(self) -> None:
        self.keys = torch.zeros(0, dtype=torch.long)
        self.counts = torch.zeros(0, dtype=torch.long)

    def add(self, keys: torch.Tensor, counts: torch.Tensor) -> None:
        self.keys, inverse = torch.unique(torch.cat([self.keys, keys]), return_inverse=True)
        self.counts = torch.zeros_like(self.keys).index_add_(0, inverse, torch.cat([self.counts, counts]))


def check_within_bound(summary: HeavyHitterTable, exact: ExactPairs, capacity: int) -> None:
    summary.compact()
    truth = dict(zip(exact.keys.tolist(), exact.counts.tolist(), strict=True))
    kept = dict(zip(summary.keys.tolist(), summary.counts.tolist(), strict=True))
    totals = torch.zeros(E, dtype=torch.long).index_add_(0, exact.keys // MODULUS, exact.counts)
    assert torch.equal(summary.totals, totals)
    kept_sum = torch.zeros(E, dtype=torch.long).index_add_(0, summary.keys // MODULUS, summary.counts)
    assert (summary.decrement * (capacity + 1) <= totals - kept_sum).all()
    assert (torch.bincount(summary.keys // MODULUS, minlength=E) <= capacity).all()
    for key, c in truth.items():
        delta = int(summary.decrement[key // MODULUS])
        estimate = kept.get(key, 0)
        assert estimate <= c <= estimate + delta, (key, c, estimate, delta)
    assert set(kept) <= set(truth)
    assert int(summary.decrement.sum()) > 0  # the summary was really reduced: the test tests the bound


@pytest.mark.parametrize("capacity", [4, 16, 64])
def test_counts_stay_within_the_misra_gries_bound(capacity):
    exact, summary = ExactPairs(), HeavyHitterTable(capacity, MODULUS, E)
    for seed in range(40):
        keys, counts = skewed_events(seed, 3000)
        exact.add(keys, counts)
        summary.add(keys, counts)
        summary.compact()  # a reduction after every batch: the most reductions, the loosest case
    check_within_bound(summary, exact, capacity)


def test_merged_summaries_stay_within_the_bound():
    capacity = 8
    exact, parts = ExactPairs(), [HeavyHitterTable(capacity, MODULUS, E) for _ in range(3)]
    for seed in range(30):
        keys, counts = skewed_events(seed, 2000)
        exact.add(keys, counts)
        parts[seed % 3].add(keys, counts)
        parts[seed % 3].compact()
    merged = parts[0].merge(parts[1]).merge(parts[2].clone())
    check_within_bound(merged, exact, capacity)


@pytest.mark.parametrize("capacity", [3, 10, 40])
def test_coverage_bounds_contain_the_exact_value(capacity):
    exact, summary = ExactPairs(), HeavyHitterTable(capacity, MODULUS, E)
    for seed in range(20):
        keys, counts = skewed_events(100 + seed, 2500)
        exact.add(keys, counts)
        summary.add(keys, counts)
        summary.compact()
    needed, _ = cover_counts(exact.keys // MODULUS, exact.counts, E, 0.4)
    lower, upper = coverage_bounds(summary, 0.4)
    assert (lower <= needed).all()
    certain = upper >= 0
    assert (needed[certain] <= upper[certain]).all()
    assert certain.any() or capacity < 10  # 3 counters rarely certify 40 % of a neuron's mass


def test_a_bounded_census_keeps_exact_detectors_and_bounds_the_ngram_coverage(small_checkpoints):
    """Real activations of a Mamba layer: detectors equal the exact ones; every coverage lies in its bounds."""
    from mambascope.data import load_corpus, tokenize_windows
    from mambascope.models import load_model
    from mambascope.neurons import NeuronBatch
    from mambascope.runner import scan_corpus

    model, tokenizer = load_model(small_checkpoints["mamba"], device="cpu")
    windows = tokenize_windows(load_corpus("builtin", "validation").texts[:200], tokenizer, 32,
                               max_tokens=32 * 64).ids
    vocab = model.get_input_embeddings().num_embeddings
    exact = TokenDetectorAccumulator(vocab, ngram_orders=(1, 2, 3), min_occurrences=2, layer=0)
    bounded = BoundedTokenDetectorAccumulator.like(exact, 8)

    def consume(layer, units, ids, rows):
        if layer == 0:
            batch = NeuronBatch.from_layer(units, "mamba", ids, bos_token_id=tokenizer.bos_token_id)
            exact.update(batch)
            bounded.update(batch)

    scan_corpus(model, windows, consume, names=["blocks.0.mixer.hook_post", "blocks.0.mixer.hook_gate_pre"],
                batch_size=8, progress=False)
    a, b = exact.finalize(), bounded.finalize()
    assert a["token_detectors"] == b["token_detectors"] and a["ngram_coverage"]["1"] == b["ngram_coverage"]["1"]
    for n in ("2", "3"):
        truth, approx = a["ngram_coverage"][n], b["ngram_coverage"][n]
        assert approx["activations_counted"] == truth["activations_counted"]
        assert approx["approximate"]["max_count_error"] > 0  # the capacity really bound
        for t, lo, hi in zip(truth["needed"], approx["needed_lower"], approx["needed"], strict=True):
            assert (t is None) == (lo is None)
            assert t is None or (lo <= t and (hi is None or t <= hi))


def test_summarized_unigrams_give_certain_detectors_only():
    """With the unigram table summarized too, every detector listed is an exact detector, its trigger counts are
    lower bounds within the Misra–Gries bound, the activations stay exact, and the coverage bounds hold."""
    from mambascope.neurons.heavy_hitters import Summaries
    from neuron_reference import make_batch

    exact = TokenDetectorAccumulator(8, ngram_orders=(1, 2), min_occurrences=3)
    bounded = BoundedTokenDetectorAccumulator.like(exact, Summaries(2, (1, 2)))  # 2 counters: the random neurons
    for seed in range(6):  # of 7 token types are reduced, the planted detector (tokens 2 and 5) is not
        batch = make_batch(seed=seed)
        exact.update(batch)
        bounded.update(batch)
    a, b = exact.finalize(), bounded.finalize()
    assert b["activations"] == a["activations"]
    error = b["approximate"]["max_count_error"]
    assert 0 < error <= max(a["activations"]) / 3  # the summary really bound, within N_e/(k+1)
    neuron, token, count = exact._table(1)
    counts = dict(zip(zip(neuron.tolist(), token.tolist(), strict=True), count.tolist(), strict=True))
    found = {d["neuron"] for d in b["token_detectors"]}
    assert 2 in found and found <= {d["neuron"] for d in a["token_detectors"]}  # certain: exact detectors too
    for d in b["token_detectors"]:
        for t, c in zip(d["tokens"], d["counts"], strict=True):
            assert c <= counts[(d["neuron"], t)] <= c + error
    for n in ("1", "2"):
        lo, hi = b["ngram_coverage"][n]["needed_lower"], b["ngram_coverage"][n]["needed"]
        for t, low, high in zip(a["ngram_coverage"][n]["needed"], lo, hi, strict=True):
            assert t is None or (low <= t and (high is None or t <= high))
