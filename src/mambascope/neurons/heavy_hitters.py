"""Bounded-memory (neuron, n-gram) counts: a Misra–Gries heavy-hitter summary per neuron (docs/census.md).

The exact count tables of the token-detector test (``detectors.CountTable``, ~4·E bytes per distinct
n-gram) grow with the corpus.  ``HeavyHitterTable`` keeps at most ``capacity`` counters per
neuron: the mergeable Misra–Gries summary (Misra & Gries 1982; merge rule of Agarwal et al. 2012,
"Mergeable summaries").  Updates (keys neuron·Vⁿ + n-gram id) are buffered and reduced together (``torch.unique``
once the buffer is as large as the summary); a reduction of neuron e subtracts δ_e, the (capacity+1)-th largest
of its counters, from all of them and drops those ≤ 0.

Error bound (per neuron e, N_e its activations with an n-gram, exact; Δ_e = Σ δ_e, tracked exactly): every
kept count ĉ satisfies ĉ ≤ c ≤ ĉ + Δ_e, a dropped n-gram has c ≤ Δ_e, and Δ_e ≤ (N_e − Σ ĉ) / (capacity+1)
≤ N_e / (capacity+1), since each reduction removes at least (capacity+1)·δ_e of mass.

``BoundedTokenDetectorAccumulator`` is the token-detector accumulator with these summaries for the n-gram
orders n ≥ 2, and for the unigrams too when even their exact table does not fit (``Summaries.orders``).  Its
token detectors are then found from the certain counts ĉ (each ≤ the true count), so every detector reported is
one under the exact test; a detector is missed only where Δ_e is large enough to push one of its triggers below
the precision threshold.  Its n-gram coverage is
reported as bounds that contain the exact value: ``needed`` (upper: the fewest kept n-grams whose lower-bound
counts ĉ reach coverage·N_e; None when even all kept ones do not) and ``needed_lower`` (the fewest n-grams
whose upper bounds, ĉ + Δ_e for kept ones and Δ_e for any other, could reach it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from mambascope.neurons._common import check_positive_int, segment_order, within_segment_cumsum_before
from mambascope.neurons.batch import NeuronBatch
from mambascope.neurons.detectors import TokenDetectorAccumulator

METHOD = "Misra-Gries heavy hitters per neuron (mergeable; Agarwal et al. 2012)"


@dataclass(frozen=True)
class Summaries:
    """The n-gram ``orders`` a census counts in Misra–Gries summaries of ``counters`` counters per neuron
    (the others stay exact); 1 in ``orders`` summarizes the unigram table of the token-detector test too."""

    counters: int
    orders: tuple[int, ...] = (2, 3)
    delta_tokens: bool = True  # False: no per-token Δ table either (``DeltaAccumulator(token_channels=None)``)

    @classmethod
    def of(cls, value: int | Summaries | None) -> Summaries | None:
        """``value`` as Summaries: an int is the counters for the orders n >= 2."""
        return cls(value) if isinstance(value, int) else value

    def approximate_fields(self, orders: tuple[int, ...]) -> list[str]:
        """The results.json fields that are bounds when a census of n-gram ``orders`` uses these summaries."""
        fields = [f"layers.*.detectors.ngram_coverage.{n}" for n in sorted(set(orders) & set(self.orders))]
        if 1 in self.orders:
            fields = ["layers.*.token_detectors", "layers.*.tokens_covered", "detector_tokens_by_layer", *fields]
        if not self.delta_tokens:  # not approximate but left out: top_tokens is None
            fields.append("layers.*.delta_sensitive.*.top_tokens")
        return fields


class HeavyHitterTable:
    """At most ``capacity`` (n-gram, count) counters per neuron; keys neuron·``modulus`` + n-gram id.

    The interface of ``detectors.CountTable`` (``count``, ``entries``, ``merge``, ``clone``), plus ``add``
    of (key, count) pairs, sorted ``keys`` and ``counts`` after ``compact``, ``totals`` N_e (exact) and
    ``decrement`` Δ_e [E] (see module doc).
    Memory: at most 16·capacity·E bytes after a reduction, plus the update buffer.
    """

    def __init__(self, capacity: int, modulus: int, n_neurons: int, device: torch.device | str = "cpu") -> None:
        self.capacity = check_positive_int("capacity", capacity)
        self.modulus, self.n_neurons = modulus, n_neurons
        self.keys = torch.zeros(0, dtype=torch.long, device=device)
        self.counts = torch.zeros(0, dtype=torch.long, device=device)
        self.totals = torch.zeros(n_neurons, dtype=torch.long, device=device)
        self.decrement = torch.zeros(n_neurons, dtype=torch.long, device=device)
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._pending_size = 0

    def add(self, keys: Tensor, counts: Tensor) -> None:
        self.totals.index_add_(0, (keys // self.modulus).to(self.totals.device), counts.to(self.totals.device))
        self._push(keys, counts)

    def count(self, ids: Tensor, activity: Tensor, at_most: int = 0) -> None:
        """Add ``activity`` [S, E] of slots whose n-grams are ``ids`` [S] (−1: none), as ``CountTable.count``."""
        grams, inverse = torch.unique(ids, return_inverse=True)
        counts = torch.zeros(grams.numel(), activity.shape[1], dtype=torch.long, device=activity.device)
        counts.index_add_(0, inverse, activity.long())
        skip = int(bool(grams.numel()) and int(grams[0]) < 0)
        row, neuron = counts[skip:].nonzero(as_tuple=True)
        self.add(neuron * self.modulus + grams[skip:][row], counts[skip:][row, neuron])

    def entries(self) -> tuple[Tensor, Tensor, Tensor]:
        """(neuron, n-gram id, kept count ĉ) of every counter, sorted by neuron then id."""
        self.compact()
        return self.keys // self.modulus, self.keys % self.modulus, self.counts

    def _push(self, keys: Tensor, counts: Tensor) -> None:
        self._pending.append((keys, counts))
        self._pending_size += keys.numel()
        if self._pending_size >= max(self.keys.numel(), self.capacity * self.n_neurons, 1 << 20):
            self.compact()

    def compact(self) -> HeavyHitterTable:
        """Sum equal keys, then reduce every neuron to at most ``capacity`` counters; returns self."""
        if not self._pending:
            return self
        keys = torch.cat([self.keys] + [k.to(self.keys.device) for k, _ in self._pending])
        counts = torch.cat([self.counts] + [c.to(self.keys.device) for _, c in self._pending])
        self._pending, self._pending_size = [], 0
        keys, inverse = torch.unique(keys, sorted=True, return_inverse=True)
        counts = torch.zeros_like(keys).index_add_(0, inverse, counts)
        neuron = keys // self.modulus
        order = segment_order(neuron, counts)  # by neuron, count descending
        neuron, sorted_counts = neuron[order], counts[order]
        per_neuron = torch.bincount(neuron, minlength=self.n_neurons)
        rank = torch.arange(neuron.numel(), device=neuron.device) - (per_neuron.cumsum(0) - per_neuron)[neuron]
        delta = torch.zeros_like(self.decrement)
        at = rank == self.capacity  # the (capacity+1)-th largest counter of each neuron that has one
        delta[neuron[at]] = sorted_counts[at]
        self.decrement += delta
        counts = counts - delta[keys // self.modulus]
        keep = counts > 0
        self.keys, self.counts = keys[keep], counts[keep]  # still sorted by key
        return self

    def merge(self, other: HeavyHitterTable) -> HeavyHitterTable:
        other.compact()
        self.totals += other.totals.to(self.totals.device)
        self.decrement += other.decrement.to(self.decrement.device)
        self._push(other.keys, other.counts)
        return self.compact()

    def clone(self) -> HeavyHitterTable:
        self.compact()
        copy = HeavyHitterTable(self.capacity, self.modulus, self.n_neurons, self.keys.device)
        copy.keys, copy.counts = self.keys.clone(), self.counts.clone()
        copy.totals, copy.decrement = self.totals.clone(), self.decrement.clone()
        return copy


def coverage_bounds(table: HeavyHitterTable, coverage: float) -> tuple[Tensor, Tensor]:
    """Per neuron, bounds [lower, upper] on the fewest n-grams covering ``coverage``·N_e (module doc).

    Returns (lower [E], upper [E]) int64; upper is −1 where the kept counters cannot certify any cover,
    and both are 0 for a neuron with no activation."""
    table.compact()
    E = table.n_neurons
    neuron = table.keys // table.modulus
    order = segment_order(neuron, table.counts)
    seg, low = neuron[order], table.counts[order]
    need = coverage * table.totals.double()
    kept = torch.bincount(seg, minlength=E)
    # upper bound: kept n-grams by their certain counts ĉ, while the sum before them is short of the cover
    before = within_segment_cumsum_before(seg, low, E).double()
    upper = torch.zeros(E, dtype=torch.long, device=low.device).index_add_(0, seg, (before < need[seg]).long())
    reached = torch.zeros(E, dtype=torch.long, device=low.device).index_add_(0, seg, low).double() >= need
    upper = torch.where(reached | (table.totals == 0), upper, -1)
    # lower bound: at best each kept n-gram counts ĉ + Δ_e and any other Δ_e
    high = low + table.decrement[seg]
    before_high = within_segment_cumsum_before(seg, high, E).double()
    lower = torch.zeros_like(upper).index_add_(0, seg, (before_high < need[seg]).long())
    kept_high = torch.zeros(E, dtype=torch.long, device=low.device).index_add_(0, seg, high).double()
    short = (kept_high < need) & (table.decrement > 0)
    extra = torch.ceil((need - kept_high) / table.decrement.clamp_min(1).double()).long()
    lower = torch.where(short, kept + extra, lower)
    return lower, upper


class BoundedTokenDetectorAccumulator(TokenDetectorAccumulator):
    """``TokenDetectorAccumulator`` whose n-gram tables of order ≥ 2 are ``HeavyHitterTable``s of ``capacity``
    counters per neuron; detectors (unigrams) stay exact.  ``finalize()`` marks those orders approximate."""

    _config: ClassVar[tuple[str, ...]] = (*TokenDetectorAccumulator._config, "capacity", "unigrams")

    def __init__(self, *args: Any, capacity: int, unigrams: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.capacity = check_positive_int("capacity", capacity)
        self.unigrams = bool(unigrams)  # the unigram table summarized too (the detectors become certain-only)

    @property
    def summarized(self) -> tuple[int, ...]:
        return tuple(n for n in self._orders if n >= 2 or self.unigrams)

    @classmethod
    def like(cls, exact: TokenDetectorAccumulator, summaries: int | Summaries) -> BoundedTokenDetectorAccumulator:
        """A fresh bounded accumulator with the settings of ``exact`` (which must not have seen data)."""
        if exact.n_neurons is not None:
            raise ValueError("replace the detector accumulator before it sees data")
        summaries = Summaries.of(summaries)
        return cls(exact.vocab_size, exact.max_types, exact.coverage, exact.min_precision, exact.min_occurrences,
                   exact.ngram_orders, layer=exact.layer, capacity=summaries.counters, unigrams=1 in summaries.orders)

    def update(self, batch: NeuronBatch) -> None:
        fresh = self.n_neurons is None
        super().update(batch)
        if fresh:  # the first batch created exact tables: from now on the summarized orders are summaries
            for n in self.summarized:
                neuron, gram, count = self.tables[n].entries()
                table = HeavyHitterTable(self.capacity, self.vocab_size**n, self.n_neurons, count.device)
                table.add(neuron * self.vocab_size**n + gram, count)
                self.tables[n] = table.compact()

    def _qualifying(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        neuron, token, count, occ, activations = super()._qualifying()
        if self.unigrams:  # counts are the certain ĉ; the activations N_e are exact
            activations = self.tables[1].totals.clone()
        return neuron, token, count, occ, activations

    def finalize(self) -> dict[str, Any]:
        result = super().finalize()
        for n in self.ngram_orders:
            if n in self.summarized:
                result["ngram_coverage"][str(n)] = self._approximate_coverage(n)
        if self.unigrams:
            table = self.tables[1]
            result["approximate"] = {
                "method": METHOD, "counters_per_neuron": self.capacity,
                "max_count_error": int(table.decrement.max()) if table.decrement.numel() else 0,
                "bound": "token detectors are tested on certain counts (each low by at most max_count_error <= "
                         "activations/(counters+1)): every detector listed passes the exact test, counts and "
                         "precision are lower bounds, and a detector may be missed",
            }
        return result

    def _approximate_coverage(self, n: int) -> dict[str, Any]:
        table = self.tables[n]
        lower, upper = coverage_bounds(table, self.coverage)
        has = table.totals > 0
        # summary statistics of the upper bounds only when every one is known: a subset would be biased
        certain = upper[has].double() if bool((upper[has] >= 0).all()) else upper[:0].double()
        return {
            "needed": [u if h and u >= 0 else None for u, h in zip(upper.tolist(), has.tolist(), strict=True)],
            "needed_lower": [v if h else None for v, h in zip(lower.tolist(), has.tolist(), strict=True)],
            "activations_counted": int(table.totals.sum()),
            "n_neurons_with_activations": int(has.sum()),
            "mean": float(certain.mean()) if certain.numel() else None,
            "median": float(certain.quantile(0.5)) if certain.numel() else None,
            "quantiles": ({str(q): float(certain.quantile(q)) for q in (0.1, 0.25, 0.75, 0.9)}
                          if certain.numel() else None),
            "mean_lower": float(lower[has].double().mean()) if bool(has.any()) else None,
            "approximate": {
                "method": METHOD, "counters_per_neuron": self.capacity,
                "max_count_error": int(table.decrement.max()) if table.decrement.numel() else 0,
                "bound": "each kept count is low by at most max_count_error <= activations/(counters+1); the "
                         "exact needed lies in [needed_lower, needed] (needed None: above every kept n-gram); "
                         "mean/median/quantiles are of needed, None unless every neuron's is known",
            },
        }


def counters_for_budget(budget_bytes: float, n_neurons: int, tables: int) -> int:
    """Counters per neuron that ``tables`` summaries of ``n_neurons`` fit in ``budget_bytes``: 16 bytes per
    counter, ×3 for the update buffer and the reduction's temporaries."""
    return max(0, math.floor(budget_bytes / (tables * n_neurons * 16 * 3)))
