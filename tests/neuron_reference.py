"""Slow, obviously-correct reference implementations of the neuron statistics (plain Python loops).

Used only by the tests of ``mambascope.neurons`` on tiny inputs. Definitions: docs/design.md §5 and
Voita et al. 2023, "Neurons in Large Language Models: Dead, N-gram, Positional".
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict


def _lists(*tensors):
    return [t.tolist() if t is not None else None for t in tensors]


def ref_activity(post, active, valid, thresholds, rare_threshold):
    post, active, valid = _lists(post, active, valid)
    E = len(post[0][0])
    N = 0
    count = [0] * E
    s, sa, sact = [0.0] * E, [0.0] * E, [0.0] * E
    above = [[0] * E for _ in thresholds]
    for b, row in enumerate(post):
        for k, vec in enumerate(row):
            if not valid[b][k]:
                continue
            N += 1
            for e, x in enumerate(vec):
                s[e] += x
                sa[e] += abs(x)
                if active[b][k][e]:
                    count[e] += 1
                    sact[e] += x
                for i, thr in enumerate(thresholds):
                    if abs(x) > thr:
                        above[i][e] += 1
    freq = [c / N for c in count]
    dead = [e for e in range(E) if count[e] == 0]
    alive = [freq[e] for e in range(E) if count[e] > 0]
    return {
        "tokens": N,
        "active_count": count,
        "activation_frequency": freq,
        "dead_neurons": dead,
        "pct_dead": 100.0 * len(dead) / E,
        "rarely_active": [e for e in range(E) if 0 < freq[e] < rare_threshold],
        "mean_frequency_alive": sum(alive) / len(alive) if alive else None,
        "mean_post": [x / N for x in s],
        "mean_abs_post": [x / N for x in sa],
        "mean_post_active": [sact[e] / count[e] if count[e] else None for e in range(E)],
        "sensitivity_pct_dead": [100.0 * sum(1 for c in row if c == 0) / E for row in above],
    }


def _bisect(predicate, lo, hi, steps=200):
    """The boundary of a monotone predicate on [lo, hi]: predicate(lo) is False, predicate(hi) True."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if predicate(mid) else (mid, hi)
    return hi


def ref_dead_bound(tokens, confidence=0.95):
    """The frequency at which P(no activation in N independent tokens) = (1 − f)^N falls to 1 − confidence,
    found by bisection on that probability (not from its closed form)."""
    return _bisect(lambda f: (1 - f) ** tokens <= 1 - confidence, 0.0, 1.0)


def ref_wilson_lower(fired, occurrences, confidence=0.95):
    """The smallest p ≤ p̂ that the one-sided score test does not reject: (p̂ − p)² ≤ z²·p(1 − p)/n
    (the definition of the Wilson bound), found by bisection."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(confidence)
    p_hat, n = fired / occurrences, occurrences
    if p_hat == 0:
        return 0.0
    return _bisect(lambda p: (p_hat - p) ** 2 <= z * z * p * (1 - p) / n, 0.0, p_hat)


def ref_positional(post, active, positions, valid, mi_threshold, alpha=0.001):
    post, active, positions, valid = _lists(post, active, positions, valid)
    E = len(post[0][0])
    tokens = defaultdict(int)
    act = defaultdict(lambda: [0] * E)
    xs = [[] for _ in range(E)]
    ps = []
    for b, row in enumerate(post):
        for k, vec in enumerate(row):
            if not valid[b][k]:
                continue
            p = positions[b][k]
            tokens[p] += 1
            ps.append(p)
            for e in range(E):
                act[p][e] += int(active[b][k][e])
                xs[e].append(vec[e])
    seen = sorted(tokens)
    N = sum(tokens.values())

    def plogq(a, q):  # a·ln(a/q) with 0·ln 0 = 0
        return 0.0 if a == 0 else a * math.log(a / q)

    mi, corrected, corr = [], [], []
    for e in range(E):
        total_active = sum(act[p][e] for p in seen)
        fr = total_active / N
        total = 0.0
        bias = 0.0
        for p in seen:
            f = act[p][e] / tokens[p]
            total += plogq(f, fr) + plogq(1 - f, 1 - fr)
            # Panzeri & Treves 1996: (R_p − 1)/(2 n_p) − (R − 1)/(2N), R = responses observed (1 or 2)
            r_p = 2 if 0 < act[p][e] < tokens[p] else 1
            r = 2 if 0 < total_active < N else 1
            bias += (r_p - 1) / (2 * tokens[p]) - (r - 1) / (2 * N)
        mi.append(total / len(seen))
        corrected.append((total - bias) / len(seen))
        mx, mp = sum(xs[e]) / N, sum(ps) / N
        cov = sum((x - mx) * (p - mp) for x, p in zip(xs[e], ps, strict=True))
        vx = sum((x - mx) ** 2 for x in xs[e])
        vp = sum((p - mp) ** 2 for p in ps)
        corr.append(cov / math.sqrt(vx * vp) if vx > 0 and vp > 0 else None)
    null = ref_shift_null(active, positions, valid)
    curves = {e: [act[p][e] / tokens[p] for p in seen] for e in range(E)}
    flagged = [e for e in range(E) if corrected[e] > mi_threshold and null["p_value"][e] < alpha]
    return {"positional_mi_plugin": mi, "positional_mi": corrected, "positional_neurons": flagged,
            "position_correlation": corr, "positions": seen, "null": null,
            "tokens_by_position": [tokens.get(p, 0) for p in range(max(seen) + 1)], "curves": curves}


def _window_covariance(sequence, valid_positions, length):
    """Covariance matrix [length][length] of the active indicators of one window whose activity ``sequence``
    (over its sorted valid positions) is rotated by a uniformly random circular shift: the average over
    the n shifts of the outer product, minus the outer product of the mean (k/n everywhere)."""
    n, k = len(valid_positions), sum(sequence)
    cov = [[0.0] * length for _ in range(length)]
    for shift in range(n):
        rotated = sequence[shift:] + sequence[:shift]
        for i, p in enumerate(valid_positions):
            for j, q in enumerate(valid_positions):
                cov[p][q] += rotated[i] * rotated[j] / n
    for p in valid_positions:
        for q in valid_positions:
            cov[p][q] -= k * k / (n * n)
    return cov


def ref_shift_null(active, positions, valid):
    """Mean and variance of S = Σ_p (c_p − E c_p)² under independent circular shifts of each window's activity
    over its valid positions, by explicit covariance matrices: Var S = Σ_{w≠w'} 2·tr(Σ_w Σ_w') (the
    within-window part of S is fixed); and the p-value of a χ² scaled to that mean and variance, from the
    series of the regularized incomplete gamma function."""
    E = len(active[0][0])
    length = max(positions[b][k] for b in range(len(valid)) for k in range(len(valid[b])) if valid[b][k]) + 1
    windows = []
    for b in range(len(valid)):
        cols = sorted((positions[b][k], k) for k in range(len(valid[b])) if valid[b][k])
        if cols:
            windows.append((b, [p for p, _ in cols], [k for _, k in cols]))
    stats = {"statistic": [], "mean": [], "variance": [], "p_value": []}
    for e in range(E):
        count = [0] * length
        expected = [0.0] * length
        covs, mean = [], 0.0
        for b, pos, cols in windows:
            sequence = [int(active[b][j][e]) for j in cols]
            k, n = sum(sequence), len(pos)
            for p, a in zip(pos, sequence, strict=True):
                expected[p] += k / n
                count[p] += a
            mean += k * (n - k) / n
            covs.append(_window_covariance(sequence, pos, length))
        variance = 0.0
        for i in range(len(covs)):
            for j in range(len(covs)):
                if i != j:
                    variance += 2 * sum(covs[i][p][q] * covs[j][q][p] for p in range(length) for q in range(length))
        s = sum((count[p] - expected[p]) ** 2 for p in range(length))
        stats["statistic"].append(s)
        stats["mean"].append(mean)
        stats["variance"].append(variance)
        if variance <= 1e-12 * mean * mean or mean <= 0:
            stats["p_value"].append(1.0)
        else:
            dof = 2 * mean * mean / variance
            stats["p_value"].append(_upper_gamma_regularized(dof / 2, s * mean / variance))
    return stats


def _upper_gamma_regularized(a, x):
    """Q(a, x) = Γ(a, x)/Γ(a): the series of P(a, x) for x < a + 1, else the continued fraction of Q
    (Numerical Recipes, 3rd ed., §6.2), in plain floats."""
    if x <= 0:
        return 1.0
    log_front = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        ap = a
        for _ in range(10000):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-16:
                break
        return 1.0 - total * math.exp(log_front)
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 10000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-16:
            break
    return math.exp(log_front) * h


def enumerate_shift_moments(valid_sets, sequences, length):
    """Exact mean and variance of S over every combination of circular shifts of each window's activity
    ``sequences[w]`` over its valid positions ``valid_sets[w]`` (all combinations, enumerated): the ground
    truth for the analytic null."""
    rotations = [[seq[s:] + seq[:s] for s in range(len(seq))] for seq in sequences]
    expected = [0.0] * length
    for pos, seq in zip(valid_sets, sequences, strict=True):
        for p in pos:
            expected[p] += sum(seq) / len(pos)
    values = []
    for choice in itertools.product(*rotations):
        count = [0] * length
        for pos, rotated in zip(valid_sets, choice, strict=True):
            for p, a in zip(pos, rotated, strict=True):
                count[p] += a
        values.append(sum((count[p] - expected[p]) ** 2 for p in range(length)))
    mean = sum(values) / len(values)
    return mean, sum((v - mean) ** 2 for v in values) / len(values)


def _ngram_at(token_ids, valid, b, k, n):
    """Tokens k-n+1..k of row b, or None when the n-gram crosses the window start or an invalid token."""
    if k - n + 1 < 0:
        return None
    span = range(k - n + 1, k + 1)
    if not all(valid[b][j] for j in span):
        return None
    return tuple(token_ids[b][j] for j in span)


def ref_detectors(token_ids, active, valid, max_types=5, coverage=0.95, min_precision=0.95,
                  min_occurrences=5, orders=(1, 2, 3)):
    token_ids, active, valid = _lists(token_ids, active, valid)
    E = len(active[0][0])
    occ = Counter()
    counts = {n: [Counter() for _ in range(E)] for n in {1, *orders}}
    for b, row in enumerate(token_ids):
        for k, t in enumerate(row):
            if not valid[b][k]:
                continue
            occ[t] += 1
            for n in counts:
                gram = _ngram_at(token_ids, valid, b, k, n)
                if gram is None:
                    continue
                for e in range(E):
                    if active[b][k][e]:
                        counts[n][e][gram] += 1
    detectors = {}
    for e in range(E):
        c = {g[0]: v for g, v in counts[1][e].items()}
        total = sum(c.values())
        if total == 0:
            continue
        qualifying = sorted(t for t, v in c.items() if occ[t] >= min_occurrences and v >= min_precision * occ[t])
        found = None
        for m in range(1, max_types + 1):  # brute force: the smallest set of qualifying types that covers
            best = None
            for subset in itertools.combinations(qualifying, m):
                cov = sum(c[t] for t in subset)
                if cov >= coverage * total and (best is None or cov > best[0]):
                    best = (cov, subset)  # combinations are lexicographic: first max wins ties
            if best is not None:
                found = best[1]
                break
        if found is not None:
            detectors[e] = sorted(found)
    needed = {}
    for n in orders:
        needed[n] = []
        for e in range(E):
            vals = sorted(counts[n][e].values(), reverse=True)
            total = sum(vals)
            if total == 0:
                needed[n].append(None)
                continue
            acc, m = 0, 0
            while acc < coverage * total:
                acc += vals[m]
                m += 1
            needed[n].append(m)
    return {"occurrences": occ, "detectors": detectors, "needed": needed,
            "activations": [sum(counts[1][e].values()) for e in range(E)]}


def ref_delta(dt, token_ids, valid, top_k, top_tokens, min_occurrences):
    dt, token_ids, valid = _lists(dt, token_ids, valid)
    C = len(dt[0][0])
    vals = [[] for _ in range(C)]
    per_token = defaultdict(lambda: [[] for _ in range(C)])
    for b, row in enumerate(dt):
        for k, vec in enumerate(row):
            if not valid[b][k]:
                continue
            for c in range(C):
                vals[c].append(vec[c])
                per_token[token_ids[b][k]][c].append(vec[c])

    def pstd(xs):
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))

    mean = [sum(v) / len(v) for v in vals]
    std = [pstd(v) for v in vals]
    sel = [pstd([math.log(x) for x in v]) for v in vals]
    top = sorted(range(C), key=lambda c: (-sel[c], c))[:top_k]
    drivers = {}
    for c in top:
        means = [(sum(v[c]) / len(v[c]), t) for t, v in per_token.items() if len(v[c]) >= min_occurrences]
        means.sort(key=lambda mt: (-mt[0], mt[1]))
        drivers[c] = [(t, m, len(per_token[t][c])) for m, t in means[:top_tokens]]
    return {"mean": mean, "std": std, "selectivity": sel, "top": top, "drivers": drivers}


def ref_overlap(groups):
    names = list(groups)
    sets = {k: set(v) for k, v in groups.items()}
    inter = [[len(sets[a] & sets[b]) for b in names] for a in names]
    jac = [[(len(sets[a] & sets[b]) / len(sets[a] | sets[b])) if sets[a] | sets[b] else None for b in names]
           for a in names]
    return inter, jac


def ref_effects(out_proj, norm, unembed, center=False, sign=None):
    out_proj, norm, unembed = _lists(out_proj, norm, unembed)
    D, E = len(out_proj), len(out_proj[0])
    V = len(unembed)
    eff = []
    for e in range(E):
        w = [out_proj[d][e] for d in range(D)]
        if center:
            m = sum(w) / D
            w = [x - m for x in w]
        s = 1.0 if sign is None else math.copysign(1.0, sign[e]) if sign[e] != 0 else 0.0
        eff.append([s * sum(unembed[v][d] * (norm[d] if norm is not None else 1.0) * w[d] for d in range(D))
                    for v in range(V)])
    return eff


def ref_suppression_rank(row, t):
    return 1 + sum(1 for x in row if x < row[t])


# --- test support ------------------------------------------------------------------------------


def assert_tree_close(a, b, rel=1e-9, abs_tol=1e-12, path="result"):
    """Recursive equality of finalize() outputs: ints, bools, str and None exactly, floats to tolerance."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_tree_close(a[key], b[key], rel, abs_tol, f"{path}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_tree_close(x, y, rel, abs_tol, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool) and isinstance(b, int | float):
        assert math.isclose(a, b, rel_tol=rel, abs_tol=abs_tol), f"{path}: {a} != {b}"
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} != {b!r}"


def split_batches(batch, sizes):
    """Cut a NeuronBatch into consecutive row blocks of the given sizes (a list summing to b)."""
    from mambascope.neurons import NeuronBatch

    out, start = [], 0
    for size in sizes:
        sl = slice(start, start + size)
        out.append(NeuronBatch(batch.post[sl], batch.active[sl], batch.token_ids[sl], batch.positions[sl],
                               batch.valid[sl], None if batch.dt is None else batch.dt[sl], batch.layer))
        start += size
    assert start == batch.post.shape[0]
    return out


def check_invariance(factory, batch, splits=((1,) * 6, (2, 4), (5, 1)), rel=1e-9):
    """The finalize of one update on the whole batch equals: row blocks fed one by one, and two
    accumulators fed disjoint halves and merged (also into a fresh, empty one)."""
    whole = factory()
    whole.update(batch)
    expected = whole.finalize()
    b = batch.post.shape[0]
    for sizes in splits:
        sizes = list(sizes)
        if sum(sizes) != b:
            continue
        parts = split_batches(batch, sizes)
        one = factory()
        for part in parts:
            one.update(part)
        assert_tree_close(one.finalize(), expected, rel=rel)
        half = len(parts) // 2
        left, right = factory(), factory()
        for part in parts[:half]:
            left.update(part)
        for part in parts[half:]:
            right.update(part)
        merged = factory().merge(left).merge(right)
        assert_tree_close(merged.finalize(), expected, rel=rel)
        reversed_order = factory().merge(right).merge(left)
        assert_tree_close(reversed_order.finalize(), expected, rel=rel)
    return expected


def make_batch(seed=0, b=6, L=24, E=8, V=8, C=None, pad=True, layer="L0"):
    """Random batch with planted neurons. Token 0 is BOS at position 0 (invalid); tokens 1..V-1 elsewhere.

    Neurons: 0 dead; 1 rare (one activation); 2 fires exactly on tokens {2, 5} (a detector);
    3 fires on token 3 plus one stray token; 4 fires on ~90% of token 4; 5 fires at positions < 4
    and its post grows with position; 6, 7 random (gate ~ 50%). ``C`` adds Δ = exp(N(0,1)) [b,L,C].
    """
    import torch

    from mambascope.neurons import NeuronBatch

    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(1, V, (b, L), generator=g)
    tok[:, 0] = 0
    valid = tok != 0
    if pad:
        valid &= torch.rand(b, L, generator=g) > 0.05  # interior gaps: n-grams must not cross them
        valid[0, L - 5:] = False  # a right-padded row: a shorter window in the first block
    valid[1, 3] = True
    positions = torch.arange(L).expand(b, L).clone()
    post = torch.randn(b, L, E, generator=g)
    active = torch.randn(b, L, E, generator=g) > 0
    active[..., 0] = False
    active[..., 1] = False
    active[1, 3, 1] = True
    active[..., 2] = (tok == 2) | (tok == 5)
    active[..., 3] = tok == 3
    active[2, 5, 3] = True
    active[..., 4] = (tok == 4) & (torch.rand(b, L, generator=g) < 0.9)
    active[..., 5] = positions < 4
    post[..., 5] = 0.1 * positions + 0.05 * torch.randn(b, L, generator=g)
    dt = None if C is None else torch.randn(b, L, C, generator=g).exp()
    return NeuronBatch(post, active, tok, positions, valid, dt, layer)
