"""Token and n-gram detector neurons (Voita et al. 2023, "Neurons in Large Language Models: Dead,
N-gram, Positional", §4; docs/design.md §5)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from statistics import NormalDist
from typing import Any, ClassVar

import torch
from torch import Tensor

from mambascope.neurons._common import (
    Accumulator,
    KeyedRows,
    check_positive_int,
    check_unit_right_closed,
    segment_order,
    within_segment_cumsum_before,
)
from mambascope.neurons.batch import LayerLabel, NeuronBatch

INT64_MAX = 2**63 - 1
# One-sided confidence of the lower bound on a trigger's precision.
PRECISION_CONFIDENCE = 0.95


def precision_lower_bound(fired: Tensor, occurrences: Tensor, confidence: float = PRECISION_CONFIDENCE) -> Tensor:
    """One-sided Wilson score lower bound on P(neuron fires | token) from ``fired`` of ``occurrences`` [m].

    Wilson (1927); recommended over the Wald interval for small counts by Brown, Cai & DasGupta (2001,
    "Interval Estimation for a Binomial Proportion"). With p̂ = x/n and z the ``confidence`` quantile of
    N(0, 1): (p̂ + z²/2n − z·sqrt(p̂(1 − p̂)/n + z²/4n²)) / (1 + z²/n). Float64 [m].
    """
    z = NormalDist().inv_cdf(confidence)
    n = occurrences.to(torch.float64)
    p = fired.to(torch.float64) / n
    root = torch.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return ((p + z * z / (2 * n) - z * root) / (1 + z * z / n)).clamp_min(0.0)


def occurrences_to_establish(min_precision: float, confidence: float = PRECISION_CONFIDENCE) -> int:
    """Fewest occurrences whose Wilson lower bound reaches ``min_precision`` when the neuron fires on all
    of them: n/(n + z²) >= π ⇔ n >= z²·π/(1 − π) (52 for π = 0.95 at 95 %)."""
    if min_precision >= 1.0:
        raise ValueError("no finite number of occurrences establishes a precision of 1")
    z = NormalDist().inv_cdf(confidence)
    return math.ceil(z * z * min_precision / (1.0 - min_precision))


EXACT_FLOAT32 = 2**24  # every integer up to this is exact in float32


class CountTable(KeyedRows):
    """Exact activation counts of E neurons per n-gram: a :class:`KeyedRows` of E counts per distinct n-gram
    id (< ``modulus``) seen.  Counts are held in float32 (``index_add_`` of float rows is several times faster
    than of int rows on CPU) while no count can pass 2²⁴, where float32 integers stop being exact, then in
    float64 (exact to 2⁵³).  Memory: about 4·E + 16 bytes per distinct n-gram, so at most ~4·E bytes per
    token seen however many neurons fire.
    """

    def __init__(self, n_neurons: int, modulus: int, device: torch.device | str = "cpu") -> None:
        super().__init__(n_neurons, torch.float32, modulus, device)
        self.modulus = modulus
        self.bound = 0  # no count exceeds this: the slots counted so far

    def _widen(self, at_most: int) -> None:
        self.bound += at_most
        if self.values.dtype == torch.float32 and self.bound > EXACT_FLOAT32:
            self.values = self.values.double()

    def count(self, ids: Tensor, activity: Tensor, at_most: int) -> None:
        """Add ``activity`` [S, E] (0/1) of S token slots whose n-grams are ``ids`` [S] (−1: none); no count
        grows by more than ``at_most``."""
        self._widen(at_most)
        self.add(ids, activity)

    def count_rows(self, grams: Tensor, counts: Tensor, at_most: int) -> None:
        """Add ``counts`` [G, E] of the distinct ascending n-grams ``grams`` [G]."""
        self._widen(at_most)
        self.add_rows(grams, counts)

    def entries(self) -> tuple[Tensor, Tensor, Tensor]:
        """(neuron, n-gram id, count) of every nonzero count, int64, sorted by neuron then id."""
        ids, values = self.by_id()
        by_neuron = values.T  # [E, G], columns in id order
        neuron, column = by_neuron.nonzero(as_tuple=True)  # row-major: neuron, then id
        return neuron, ids[column], by_neuron[neuron, column].long()

    def merge(self, other: CountTable) -> CountTable:
        self.count_rows(*other.by_id(), other.bound)
        return self


def ngram_ids(token_ids: Tensor, valid: Tensor, n: int, vocab_size: int) -> tuple[Tensor, Tensor]:
    """Id of the n-gram ENDING at each position, and whether it exists; both [b,L].

    The trigger of an activation at k is tokens k−n+1 … k (never later tokens). id =
    Σ_{j=0}^{n−1} token[k−j]·V^j. The n-gram exists only if all its n tokens are in the row (it does
    not cross the window start) and valid (no padding, no excluded token such as BOS).
    """
    tok = torch.where(valid, token_ids, 0)
    ids = tok.clone()
    ok = valid.clone()
    for j in range(1, n):  # n <= 3 in practice: shift by j and fold in the earlier token
        shifted_tok = torch.zeros_like(tok)
        shifted_ok = torch.zeros_like(valid)
        shifted_tok[:, j:] = tok[:, :-j]  # both sides are empty when j >= L
        shifted_ok[:, j:] = valid[:, :-j]
        ids += shifted_tok * vocab_size**j
        ok &= shifted_ok
    return ids, ok


def cover_counts(neuron: Tensor, counts: Tensor, n_neurons: int, coverage: float) -> tuple[Tensor, Tensor]:
    """Per neuron: fewest distinct triggers whose counts reach ``coverage`` of its total, and the total.

    ``neuron`` [m], ``counts`` [m] one row per (neuron, trigger) pair. Sorting each neuron's counts
    descending, trigger j is needed iff the counts before it sum to < coverage·total, so
    needed = #{j : cum_before_j < coverage·total}. Returns (needed [E] int64, total [E] int64);
    needed is 0 for a neuron with no activation (undefined; callers mask it).
    """
    total = torch.zeros(n_neurons, dtype=torch.long, device=counts.device).index_add_(0, neuron, counts)
    order = segment_order(neuron, counts)
    seg, cnt = neuron[order], counts[order]
    before = within_segment_cumsum_before(seg, cnt, n_neurons)
    needed_row = before.double() < coverage * total[seg].double()
    needed = torch.zeros_like(total).index_add_(0, seg, needed_row.long())
    return needed, total


def cover_columns(values: Tensor, coverage: float) -> tuple[Tensor, Tensor]:
    """:func:`cover_counts` from dense counts ``values`` [G, E] (integers in a float dtype, exact), no sort.

    With target = coverage·total_e and f(c) the sum of the counts >= c, let c* be the largest c with
    f(c) >= target (a bisection over the count values, one pass over ``values`` a step).  Taking the counts
    in descending order, all those > c* sum to f(c* + 1) < target and r more of value c* are needed, the
    fewest with f(c* + 1) + r·c* >= target; needed = #{counts > c*} + r.  Returns (needed, total) [E] int64.
    """
    # sums in the table's dtype: a CountTable is float32 only while every sum is below 2²⁴, so exact
    v = values if values.dtype in (torch.float32, torch.float64) else values.to(torch.float64)
    total = v.sum(0).double()
    target = coverage * total
    lo = torch.ones_like(total)  # f(1) = total >= target
    hi = v.amax(0).double().clamp_min(1) if v.numel() else lo.clone()
    while bool((lo < hi).any()):
        mid = torch.floor((lo + hi + 1) / 2)
        enough = (v * (v >= mid.to(v.dtype))).sum(0).double() >= target
        lo, hi = torch.where(enough, mid, lo), torch.where(enough, hi, mid - 1)
    above = v > lo.to(v.dtype)
    taken = (v * above).sum(0).double()
    r = torch.ceil((target - taken) / lo)
    r = torch.where(taken + (r - 1) * lo >= target, r - 1, r)  # the division may be one ulp off
    r = torch.where(taken + r * lo < target, r + 1, r)
    needed = above.sum(0) + r.long()
    return torch.where(total > 0, needed, 0), total.long()


class TokenDetectorAccumulator(Accumulator):
    """Token detectors and n-gram coverage from exact (neuron, n-gram) activation counts.

    Streams: occurrences occ[t] of each token type t over valid tokens ([V] int64, via bincount)
    and, for each order n in {1} ∪ ``ngram_orders``, a :class:`CountTable` of activation counts per
    (n-gram ending at the active token, neuron) (see :func:`ngram_ids`). Memory is about 4·E bytes per
    distinct n-gram seen, so it grows with the corpus for n >= 2; ``neurons.heavy_hitters`` bounds it.

    Token detector (Voita et al. 2023 §4, docs/design.md §5): with c[t,e] the activations of neuron e on
    token type t and A_e = Σ_t c[t,e], a type t *qualifies* for e iff occ[t] >= ``min_occurrences``
    and c[t,e] >= ``min_precision``·occ[t] (it fires e on >= 95% of its occurrences). e is a detector
    iff A_e > 0 and its ``max_types`` (5) qualifying types with the most activations cover
    >= ``coverage``·A_e; this is exactly "some set of <= 5 qualifying types covers 95%". Its
    triggers are the fewest of those (by count, ties by token id) that reach ``coverage``.

    n-gram coverage (n = 1, 2, 3): for each neuron, the number of distinct n-grams needed to cover
    ``coverage`` of its activations whose n-gram exists (activations at the first n−1 positions of a
    window, or next to padding/BOS, have no n-gram and are not counted).

    Small samples: each trigger carries its occurrences and the Wilson lower bound of its precision
    (:func:`precision_lower_bound`); a detector is *established* when every trigger's bound reaches
    ``min_precision``; a ``warning`` counts the detectors that are not (their triggers are too rare to
    tell a 95 % detector from a much weaker one: 5 of 5 has a Wilson lower bound of 0.65).
    """

    _config: ClassVar[tuple[str, ...]] = ("vocab_size", "max_types", "coverage", "min_precision",
                                         "min_occurrences", "ngram_orders")
    _state: ClassVar[tuple[str, ...]] = ("occurrences",)

    def __init__(self, vocab_size: int, max_types: int = 5, coverage: float = 0.95,
                 min_precision: float = 0.95, min_occurrences: int = 5,
                 ngram_orders: Sequence[int] = (1, 2, 3), layer: LayerLabel = None) -> None:
        super().__init__(layer)
        self.vocab_size = check_positive_int("vocab_size", vocab_size)
        self.max_types = check_positive_int("max_types", max_types)
        self.coverage = check_unit_right_closed("coverage", coverage)
        self.min_precision = check_unit_right_closed("min_precision", min_precision)
        self.min_occurrences = check_positive_int("min_occurrences", min_occurrences)
        orders = sorted({check_positive_int("ngram order", n) for n in ngram_orders})
        self.ngram_orders = tuple(orders)
        self._orders = tuple(sorted({1, *orders}))  # unigrams always: the detector test needs them
        self.tables: dict[int, CountTable] = {}

    def update(self, batch: NeuronBatch) -> None:
        """Add one batch; activations and occurrences count on ``batch.valid`` tokens only."""
        V = self.vocab_size
        if self._start(batch):
            E, dev = batch.n_neurons, batch.device
            for n in self._orders:
                if E * V**n > INT64_MAX:
                    raise ValueError(f"{self._where()}: (neuron, {n}-gram) keys overflow int64 for "
                                     f"{E} neurons and vocabulary {V}; drop order {n} from ngram_orders")
            self.occurrences = torch.zeros(V, dtype=torch.long, device=dev)
            self.tables = {n: CountTable(E, V**n, dev) for n in self._orders}
        E = self.n_neurons
        tok = batch.token_ids[batch.valid]
        if tok.numel() and (int(tok.min()) < 0 or int(tok.max()) >= V):
            raise ValueError(f"{self._where()}: token ids must lie in [0, vocab_size={V}), got "
                             f"[{int(tok.min())}, {int(tok.max())}]")
        self.n_tokens += tok.numel()
        self.occurrences += torch.bincount(tok, minlength=V)
        active = batch.active_on_valid  # [token slots, E] float 0/1, shared by the orders
        for n in self._orders:
            ids, ok = ngram_ids(batch.token_ids, batch.valid, n, V)
            # The table groups the batch's slots by n-gram (a sort of b·L ids) and adds each slot's activity to
            # its n-gram's row: the (n-gram, neuron) counts without sorting the b·L·E events.
            ok = ok.reshape(-1)
            self.tables[n].count(torch.where(ok, ids.reshape(-1), -1), active, int(ok.sum()))

    def _adopt_extra(self, other: Accumulator) -> None:
        assert isinstance(other, TokenDetectorAccumulator)
        self.tables = {n: t.clone() for n, t in other.tables.items()}

    def _merge_state(self, other: Accumulator) -> None:
        assert isinstance(other, TokenDetectorAccumulator)
        self.occurrences += other.occurrences.to(self.occurrences.device)
        for n, table in self.tables.items():
            table.merge(other.tables[n])

    def _table(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """(neuron, n-gram id, count) rows of order n, sorted by neuron then id."""
        return self.tables[n].entries()

    def _cover(self, n: int) -> tuple[Tensor, Tensor]:
        """(needed, total) [E] of order n (:func:`cover_counts`)."""
        table = self.tables[n]
        if isinstance(table, CountTable):
            return cover_columns(table.by_id()[1], self.coverage)
        neuron, _, count = self._table(n)
        return cover_counts(neuron, count, self.n_neurons, self.coverage)

    def _qualifying(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(neuron, token, count, occurrences) of every (neuron, token type) that passes the precision test,
        ordered by neuron then token, and the activations A_e [E]."""
        table = self.tables[1]
        if isinstance(table, CountTable):  # test the dense rows, then list the (few) passing pairs
            ids, values = table.by_id()
            occ = self.occurrences[ids]
            qualifies = ((occ >= self.min_occurrences)[:, None]
                         & (values.double() >= self.min_precision * occ.double()[:, None]))
            activations = values.sum(0, dtype=torch.float64).long()
            row, neuron = qualifies.T.nonzero(as_tuple=True)[::-1]
            return neuron, ids[row], values[row, neuron].long(), occ[row], activations
        neuron, token, count = self._table(1)
        occ = self.occurrences[token]
        qualifies = (occ >= self.min_occurrences) & (count.double() >= self.min_precision * occ.double())
        activations = torch.zeros(self.n_neurons, dtype=torch.long, device=count.device).index_add_(0, neuron, count)
        return neuron[qualifies], token[qualifies], count[qualifies], occ[qualifies], activations

    def detectors(self) -> dict[str, Tensor]:
        """Detector test as tensors: ``is_detector`` [E] bool, ``activations`` A_e [E], and one row per
        trigger (``neuron``, ``token``, ``count``, ``occurrences``) grouped by neuron, count descending."""
        E = self.n_neurons
        neuron, token, count, occ, activations = self._qualifying()
        order = segment_order(neuron, count)
        neuron, token, count, occ = neuron[order], token[order], count[order], occ[order]
        per_neuron = torch.bincount(neuron, minlength=E)
        rank = torch.arange(neuron.numel(), device=neuron.device) - (per_neuron.cumsum(0) - per_neuron)[neuron]
        top = rank < self.max_types
        best = torch.zeros_like(activations).index_add_(0, neuron[top], count[top])
        need = self.coverage * activations.double()
        is_detector = (activations > 0) & (best.double() >= need)
        before = within_segment_cumsum_before(neuron, count, E)
        trigger = top & is_detector[neuron] & (before.double() < need[neuron])
        return {"is_detector": is_detector, "activations": activations, "neuron": neuron[trigger],
                "token": token[trigger], "count": count[trigger], "occurrences": occ[trigger]}

    def finalize(self) -> dict[str, Any]:
        """JSON-ready dict: ``token_detectors`` [{neuron, tokens, counts, precision, coverage}],
        ``tokens_covered``, ``activations`` per neuron, ``ngram_coverage`` per order (see class doc)."""
        self._require_data()
        found = self.detectors()
        det = found["is_detector"].nonzero().flatten()
        n_triggers = torch.bincount(found["neuron"], minlength=self.n_neurons)[det]
        covered = torch.zeros_like(found["activations"]).index_add_(0, found["neuron"], found["count"])
        coverage = (covered[det].double() / found["activations"][det].double()).tolist()
        splits = n_triggers.tolist()
        tokens = torch.split(found["token"], splits)
        counts = torch.split(found["count"], splits)
        precision = torch.split(found["count"].double() / found["occurrences"].double(), splits)
        lower = precision_lower_bound(found["count"], found["occurrences"])
        below = torch.zeros(self.n_neurons, dtype=torch.long, device=lower.device).index_add_(
            0, found["neuron"], (lower < self.min_precision).long())
        established = below[det] == 0
        occurrences = torch.split(found["occurrences"], splits)
        lowers = torch.split(lower, splits)
        # building the JSON records is a loop over the detectors found, not a computation
        records = [
            {"neuron": e, "tokens": t.tolist(), "counts": c.tolist(), "occurrences": o.tolist(),
             "precision": p.tolist(), "precision_lower_bound": lb.tolist(), "coverage": cov, "established": ok}
            for e, t, c, o, p, lb, cov, ok in zip(det.tolist(), tokens, counts, occurrences, precision, lowers,
                                                  coverage, established.tolist(), strict=True)
        ]
        weak = [r["neuron"] for r in records if not r["established"]]
        warning = None
        if weak:
            warning = (f"token detectors: {len(weak)} of {len(records)} rest on triggers seen too rarely to establish "
                       f"precision >= {self.min_precision} at {PRECISION_CONFIDENCE:.0%} confidence (Wilson bound; "
                       + (f"needs >= {occurrences_to_establish(self.min_precision)} occurrences when every one fires)"
                          if self.min_precision < 1 else "a precision of 1 is never established)"))
        result: dict[str, Any] = {
            "tokens": self.n_tokens,
            "vocab_size": self.vocab_size,
            "criteria": {"max_types": self.max_types, "coverage": self.coverage,
                         "min_precision": self.min_precision, "min_occurrences": self.min_occurrences},
            "activations": found["activations"].tolist(),
            "token_detectors": records,
            "n_token_detectors": len(records),
            "n_established": len(records) - len(weak),
            "warning": warning,
            "tokens_covered": torch.unique(found["token"]).tolist(),
            "ngram_coverage": {},
        }
        for n in self.ngram_orders:
            needed, total = self._cover(n)
            has = total > 0
            values = needed[has].double()
            result["ngram_coverage"][str(n)] = {
                # None: a neuron without any activation that has an n-gram needs no cover (undefined)
                "needed": [v if h else None for v, h in zip(needed.tolist(), has.tolist(), strict=True)],
                "activations_counted": int(total.sum()),
                "n_neurons_with_activations": int(has.sum()),
                "mean": float(values.mean()) if values.numel() else None,
                "median": float(values.quantile(0.5)) if values.numel() else None,
                "quantiles": ({str(q): float(values.quantile(q)) for q in (0.1, 0.25, 0.75, 0.9)}
                              if values.numel() else None),
            }
        return result


def detector_tokens_by_layer(tokens_per_layer: Sequence[Iterable[int]]) -> list[dict[str, Any]]:
    """Tokens covered by the detectors of each layer, in layer order, against the earlier layers.

    ``tokens_per_layer[l]``: trigger token ids of layer l's detectors (``tokens_covered`` of its
    finalize). Per layer: ``covered`` (count), ``cumulative`` (|∪_{l' <= l}|), ``new`` (sorted ids not
    covered by any earlier layer) and ``n_new``. A loop over layers (a handful), not over neurons.
    """
    seen: set[int] = set()
    out = []
    for tokens in tokens_per_layer:
        here = {int(t) for t in tokens}
        new = sorted(here - seen)
        seen |= here
        out.append({"covered": len(here), "new": new, "n_new": len(new), "cumulative": len(seen)})
    return out
