"""Positional neurons (Voita et al. 2023, "Neurons in Large Language Models: Dead, N-gram,
Positional", §5; docs/design.md §5), with a bias-corrected estimate and a circular-shift null that hold at
any sample size and keep the runs of activity that text has (docs/census.md, "Small samples")."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from mambascope.neurons._common import Accumulator, check_open_unit, check_positive_int, none_if_nan
from mambascope.neurons.batch import LayerLabel, NeuronBatch

LN2 = math.log(2.0)
# The plug-in MI is trusted without correction when its bias 1/(2n) is at most this share of the threshold.
TRUSTED_BIAS_SHARE = 0.1


def positional_information(active_by_position: Tensor, tokens_by_position: Tensor) -> Tensor:
    """Plug-in mutual information between a neuron's activity and position, per neuron [E] (nats).

    ``active_by_position`` [T,E] counts of active tokens at each position, ``tokens_by_position`` [T]
    valid tokens at each position. With fr(pos) = active/tokens at pos and fr the overall frequency
    (Voita et al. 2023, §5):

        I = (1/T) Σ_pos [fr(pos)·ln(fr(pos)/fr) + (1−fr(pos))·ln((1−fr(pos))/(1−fr))],   0·ln 0 = 0.

    Positions with no valid token (e.g. position 0 when BOS is excluded) have no fr(pos) and are
    left out; T is the number of positions that have at least one valid token.
    This plug-in estimate is biased upwards by about 1/(2·n(pos)) nats per position (n(pos) windows
    seen at pos); :func:`positional_bias` is the first-order correction.
    """
    seen = tokens_by_position > 0
    counts = active_by_position[seen].to(torch.float64)
    tokens = tokens_by_position[seen].to(torch.float64)
    fr_pos = counts / tokens[:, None]  # [T', E]
    fr = counts.sum(0) / tokens.sum()  # [E]
    xlogy = torch.special.xlogy  # xlogy(0, y) = 0, which is the 0·ln0 = 0 convention
    # each summand is KL(Bernoulli(fr(pos)) ‖ Bernoulli(fr)) >= 0; when fr is 0 or 1 so is every fr(pos)
    terms = (xlogy(fr_pos, fr_pos) - xlogy(fr_pos, fr) + xlogy(1 - fr_pos, 1 - fr_pos)
             - xlogy(1 - fr_pos, 1 - fr))
    return terms.mean(0)


def positional_bias(active_by_position: Tensor, tokens_by_position: Tensor) -> Tensor:
    """First-order bias of :func:`positional_information` under no positional dependence, per neuron [E].

    Miller (1955, "Note on the bias of information estimates") / Panzeri & Treves (1996, "Analytical
    estimates of limited sampling biases in different information measures"): the plug-in information
    between a response (active or not) and a stimulus (position) is biased by [Σ_p (R_p − 1) − (R − 1)]
    / (2N), with R_p the number of responses observed at p (1 or 2) and R overall. With Voita's equal
    weight 1/T per position instead of n(p)/N, each position contributes (R_p − 1)/(2·n(p)) − (R − 1)/(2N),
    averaged over the T observed positions; the two agree when every position has the same number of tokens.
    """
    seen = tokens_by_position > 0
    counts = active_by_position[seen]
    tokens = tokens_by_position[seen]
    both_pos = ((counts > 0) & (counts < tokens[:, None])).to(torch.float64)  # R_p − 1  [T', E]
    total, N = counts.sum(0), tokens.sum()
    both = ((total > 0) & (total < N)).to(torch.float64)  # R − 1  [E]
    per_position = both_pos / (2.0 * tokens[:, None].to(torch.float64)) - both / (2.0 * float(N))
    return per_position.mean(0)


def lag_multiplicity(n: int, device: torch.device | str = "cpu") -> Tensor:
    """[⌊n/2⌋+1] float64: how many of the lags 0..n−1 fold onto each lag d ≤ n/2 (R(d) = R(n−d))."""
    mult = torch.full((n // 2 + 1,), 2.0, dtype=torch.float64, device=device)
    mult[0] = 1.0
    if n % 2 == 0:
        mult[-1] = 1.0
    return mult


def circular_autocorrelation(seq: Tensor) -> Tensor:
    """R(d) = Σ_t a(t)·a((t + d) mod n) of 0/1 sequences ``seq`` [w, E, n], for d = 0..⌊n/2⌋ ([w, E, ⌊n/2⌋+1];
    R(n − d) = R(d)), through the FFT (Wiener–Khinchin: R = IDFT |DFT a|²).

    R is an integer ≤ n, returned rounded in the FFT's dtype (exact): the FFT's rounding error, about
    ε·log₂n·k (k ≤ n active), is far below ½ in float32 up to n = 4096 (6e-8·12·4096 = 3e-3), so rounding
    recovers R exactly; longer windows use float64.
    """
    n = seq.shape[-1]
    spectrum = torch.fft.rfft(seq.to(torch.float32 if n <= 4096 else torch.float64), dim=-1)
    power = spectrum.real.square() + spectrum.imag.square()
    return torch.fft.irfft(power, n=n, dim=-1)[..., : n // 2 + 1].round()


def pair_lags(shape_g: tuple[int, ...], shape_h: tuple[int, ...], device: torch.device | str = "cpu"
              ) -> tuple[Tensor, Tensor, Tensor]:
    """The position pairs (p, q) two window shapes share, as distinct (folded lag in g, folded lag in h) with
    their counts: tr(C_g C_h) = Σ_{p,q shared} c_g(lag_g) c_h(lag_h) = Σ count·c_g[dg]·c_h[dh].

    A shape is its sorted valid positions; the lag of (p, q) in it is the difference of their indices modulo
    n, folded to ≤ n/2.  Two intervals (fixed-length windows, with or without BOS) share an interval of m
    positions whose pairs at distance d number m − |d|: closed form.  Others enumerate the m² pairs.
    """
    g, h = torch.tensor(shape_g, device=device), torch.tensor(shape_h, device=device)
    n_g, n_h = g.numel(), h.numel()
    if int(g[-1] - g[0]) == n_g - 1 and int(h[-1] - h[0]) == n_h - 1:  # both intervals
        m = min(int(g[-1]), int(h[-1])) - max(int(g[0]), int(h[0])) + 1
        d = torch.arange(max(m, 0), device=device)
        count = torch.where(d == 0, m, 2 * (m - d)).double()
        return torch.minimum(d, n_g - d), torch.minimum(d, n_h - d), count
    shared = g[torch.isin(g, h)]
    ig, ih = torch.searchsorted(g, shared), torch.searchsorted(h, shared)
    dg = (ig[None, :] - ig[:, None]).remainder(n_g).flatten()
    dh = (ih[None, :] - ih[:, None]).remainder(n_h).flatten()
    dg, dh = torch.minimum(dg, n_g - dg), torch.minimum(dh, n_h - dh)
    pairs, count = torch.unique(dg * (n_h // 2 + 1) + dh, return_counts=True)
    return pairs // (n_h // 2 + 1), pairs % (n_h // 2 + 1), count.double()


def pair_trace(c_g: Tensor, c_h: Tensor, dg: Tensor, dh: Tensor, count: Tensor, chunk: int = 4096) -> Tensor:
    """Σ_u count_u·c_g[dg_u]·c_h[dh_u] per neuron [E] (c_g [⌊n_g/2⌋+1, E], c_h likewise), in chunks of pairs."""
    total = torch.zeros(c_g.shape[1], dtype=torch.float64, device=c_g.device)
    for start in range(0, count.numel(), chunk):
        sl = slice(start, start + chunk)
        total += count[sl] @ (c_g[dg[sl]] * c_h[dh[sl]])
    return total


class PositionalAccumulator(Accumulator):
    """Activity by position within fixed-length windows, and the correlation of post with position.

    Streams: valid tokens per position n(pos) [T] and active counts per (position, neuron) [T,E]
    (int64); for the Pearson correlation of post x with position p, Σx, Σx², Σxp [E] and Σp, Σp²
    (float64); for the circular-shift null (:meth:`shift_null`), per *window shape* (the set of valid
    positions of a window; fixed-length windows have one or two: with and without BOS) the number of
    windows, the summed circular autocorrelations Σ_w R_w(d) of the windows' activity for lags
    d = 0..⌊n/2⌋ ([⌊n/2⌋+1, E] int64, so merge is exact) and Σ_w tr(C_w²) [E] (float64). T grows to max
    position + 1 seen; at most ``max_window_shapes`` shapes are kept (a corpus with ragged windows, or a
    MoE expert whose windows each hold their own routed positions, would otherwise grow the state with its
    length); beyond, the null is unavailable: no neuron is flagged and the result says ``untested``.

    ``finalize()``: ``positional_mi`` = the bias-corrected I (plug-in :func:`positional_information`
    minus :func:`positional_bias`; ``positional_mi_plugin`` keeps the plug-in value);
    ``positional_p_value`` from the circular-shift null (:meth:`shift_null`); positional ⇔ corrected
    I > ``mi_threshold`` (default 0.05, Voita et al.) and p < ``alpha`` (default 0.001; a layer of E
    neurons without positional information has about alpha·E false positives in expectation, somewhat more
    with long runs: docs/census.md); without a null nothing is positional (``positional_tested`` false: the
    MI is reported, not tested). Pearson r = cov(x,p)/(σ_x σ_p) from the streamed sums (None where σ_x or
    σ_p is 0), the layer's mean |r| and mean r (the seed's measure); fr(pos) curves of the ``top_k``
    neurons with the largest corrected I; windows and tokens per position, ``plugin_bias`` =
    mean_pos 1/(2·n(pos)) − 1/(2N) (the bias of a neuron seen both active and inactive at every position),
    and a ``warning`` when that bias is over a tenth of the threshold (fewer than ~100 windows per position).
    """

    _config: ClassVar[tuple[str, ...]] = ("mi_threshold", "alpha", "top_k", "max_window_shapes")
    _state: ClassVar[tuple[str, ...]] = ("tokens_by_position", "active_by_position", "sum_x", "sum_xx",
                                         "sum_xp", "sum_p", "sum_pp")

    def __init__(self, mi_threshold: float = 0.05, top_k: int = 10, layer: LayerLabel = None,
                 alpha: float = 0.001, max_window_shapes: int = 8) -> None:
        super().__init__(layer)
        mi_threshold = float(mi_threshold)
        if not (0.0 < mi_threshold < LN2):
            raise ValueError(f"mi_threshold must be in (0, ln 2 = {LN2:.4f}) nats (I never exceeds ln 2), "
                             f"got {mi_threshold}")
        self.mi_threshold = mi_threshold
        self.alpha = check_open_unit("alpha", alpha)
        self.top_k = check_positive_int("top_k", top_k)
        self.max_window_shapes = check_positive_int("max_window_shapes", max_window_shapes)
        # window shape (sorted valid positions) -> [windows, Σ_w R_w(d) [⌊n/2⌋+1, E], Σ_w tr(C_w²) [E]];
        # None once over the cap
        self.shapes: dict[tuple[int, ...], list[Any]] | None = {}

    def _grow(self, length: int) -> None:
        """Extend the per-position tables to ``length`` positions (windows longer than seen so far)."""
        extra = length - self.tokens_by_position.numel()
        if extra > 0:
            self.tokens_by_position = torch.cat([self.tokens_by_position,
                                                 self.tokens_by_position.new_zeros(extra)])
            self.active_by_position = torch.cat(
                [self.active_by_position, self.active_by_position.new_zeros(extra, self.n_neurons)])

    def update(self, batch: NeuronBatch) -> None:
        """Add one batch; only ``batch.valid`` tokens count, at ``batch.positions``. NaN/Inf in post raises.

        Each row is one window: its valid positions must be distinct (the null shifts them).
        """
        self._check_finite(batch)
        if self._start(batch):
            E, dev = batch.n_neurons, batch.device
            self.tokens_by_position = torch.zeros(0, dtype=torch.long, device=dev)
            self.active_by_position = torch.zeros(0, E, dtype=torch.long, device=dev)
            self.sum_x = torch.zeros(E, dtype=torch.float64, device=dev)
            self.sum_xx = torch.zeros(E, dtype=torch.float64, device=dev)
            self.sum_xp = torch.zeros(E, dtype=torch.float64, device=dev)
            self.sum_p = torch.zeros((), dtype=torch.float64, device=dev)
            self.sum_pp = torch.zeros((), dtype=torch.float64, device=dev)
        pos = batch.positions[batch.valid]  # [n]
        if pos.numel() == 0:
            return
        if int(pos.min()) < 0:
            raise ValueError(f"{self._where()}: positions must be >= 0 on valid tokens")
        self._grow(int(pos.max()) + 1)
        by_column = self._add_windows(batch, self.tokens_by_position.numel())
        self.n_tokens += pos.numel()
        self.tokens_by_position += torch.bincount(pos, minlength=self.tokens_by_position.numel())
        if by_column is not None:  # every row holds position l at column l: sum the rows, no scatter
            m = min(by_column.shape[0], self.tokens_by_position.numel())  # later columns hold no valid token
            self.active_by_position[:m] += by_column[:m]
        else:
            self.active_by_position.index_add_(0, pos, batch.valid_active.long())
        x = batch.valid_post  # [n, E] float64 (shared)
        p = pos.to(torch.float64)
        self.sum_x += batch.valid_post_sum
        self.sum_xx += x.square().sum(0)
        self.sum_xp += p @ x
        self.sum_p += p.sum()
        self.sum_pp += (p * p).sum()

    def _add_windows(self, batch: NeuronBatch, length: int) -> Tensor | None:
        """Per-window active counts k [E] into the sums of the window's shape (its set of valid positions).

        Returns the active counts by column [L, E] when every row's positions are its columns 0..L−1 (no
        left padding), which are then the counts by position; None otherwise."""
        rows = batch.valid.any(1)
        valid, positions = batch.valid[rows], batch.positions[rows]
        L = batch.positions.shape[1]
        columns = torch.arange(L, device=positions.device)
        aligned = bool((torch.where(batch.valid, batch.positions, columns) == columns).all())
        if aligned:  # positions are the columns, so distinct; the shape is the valid mask itself
            occupied = torch.zeros(valid.shape[0], length, dtype=torch.bool, device=valid.device)
            occupied[:, :min(L, length)] = valid[:, :length]
        else:
            occupied = torch.zeros(valid.shape[0], length, dtype=torch.long, device=valid.device)
            occupied.scatter_add_(1, torch.where(valid, positions, 0), valid.long())
            if int(occupied.max()) > 1:
                raise ValueError(f"{self._where()}: a window repeats a position among its valid tokens; "
                                 "each row must be one window with distinct positions")
            occupied = occupied.bool()
        active = batch.active_on_valid.view(*batch.valid.shape, -1)  # [b, L, E] float32 0/1
        by_column = active.sum(0).long() if aligned else None  # exact: < 2²⁴ rows
        if self.shapes is None:
            return by_column
        by_position = active[rows]  # [w, ·, E]: indexed by position when aligned
        if not aligned:
            by_position = active.new_zeros(valid.shape[0], length, active.shape[-1])
            r, c = valid.nonzero(as_tuple=True)
            by_position[r, positions[r, c]] = active[rows][r, c]
        if bool((occupied == occupied[:1]).all()):  # one shape (fixed-length windows): no grouping needed
            shape_of, inverse = occupied[:1], torch.zeros(occupied.shape[0], dtype=torch.long, device=valid.device)
        else:
            shape_of, inverse = torch.unique(occupied, dim=0, return_inverse=True)
        for g, mask in enumerate(shape_of):  # a loop over the few window shapes of a batch
            members = inverse == g
            key = tuple(mask.nonzero().flatten().tolist())
            sequences = by_position[members][:, list(key)].transpose(1, 2).contiguous()  # [w_g, E, n]
            R = circular_autocorrelation(sequences).double()  # [w_g, E, ⌊n/2⌋+1], integers
            n = len(key)
            k = R[..., 0]  # R(0) = k, the window's active tokens
            square_sum = R.square() @ lag_multiplicity(n, R.device)  # Σ_{d<n} R(d)²  [w_g, E]
            traces = (n * square_sum - k.square().square()) / (n * n)  # tr(C_w²) per window
            self._add_shape(key, [int(members.sum()), R.sum(0).T.long(), traces.sum(0)])
        return by_column

    def _add_shape(self, key: tuple[int, ...], sums: list[Any]) -> None:
        if self.shapes is None:
            return
        if key in self.shapes:
            self.shapes[key] = [a + b for a, b in zip(self.shapes[key], sums, strict=True)]
        elif len(self.shapes) < self.max_window_shapes:
            self.shapes[key] = [s if isinstance(s, int) else s.clone() for s in sums]
        else:
            self.shapes = None  # over the cap: the null is unavailable (finalize says so)

    def _adopt_extra(self, other: Accumulator) -> None:
        assert isinstance(other, PositionalAccumulator)
        self.shapes = None
        if other.shapes is not None:
            self.shapes = {key: [s if isinstance(s, int) else s.clone() for s in sums]
                           for key, sums in other.shapes.items()}

    def _merge_state(self, other: Accumulator) -> None:
        assert isinstance(other, PositionalAccumulator)
        self._grow(other.tokens_by_position.numel())
        other_len = other.tokens_by_position.numel()
        dev = self.sum_x.device
        self.tokens_by_position[:other_len] += other.tokens_by_position.to(dev)
        self.active_by_position[:other_len] += other.active_by_position.to(dev)
        for name in ("sum_x", "sum_xx", "sum_xp", "sum_p", "sum_pp"):
            setattr(self, name, getattr(self, name) + getattr(other, name).to(dev))
        if other.shapes is None:
            self.shapes = None
        for key, sums in (other.shapes or {}).items():
            self._add_shape(key, [s if isinstance(s, int) else s.to(dev) for s in sums])

    def correlation(self) -> Tensor:
        """Pearson r of post with position per neuron [E] (float64, NaN where undefined).

        r = (Σxp/N − x̄p̄) / sqrt((Σx²/N − x̄²)(Σp²/N − p̄²)). A variance below 1e-12 of the second
        moment is rounding noise of a constant series, so r is undefined there.
        """
        N = self.n_tokens
        mx, mp = self.sum_x / N, self.sum_p / N
        ex2, ep2 = self.sum_xx / N, self.sum_pp / N
        vx, vp = ex2 - mx * mx, ep2 - mp * mp
        cov = self.sum_xp / N - mx * mp
        defined = (vx > 1e-12 * ex2) & (vp > 1e-12 * ep2)
        r = cov / torch.sqrt(torch.where(defined, vx * vp, 1.0))
        return torch.where(defined, r.clamp(-1.0, 1.0), float("nan"))

    def shift_null(self) -> dict[str, Tensor] | None:
        """The statistic S = Σ_pos (c(pos) − E c(pos))² and its exact mean and variance when the activity
        sequence of every window is rotated by an independent uniformly random circular shift over its
        valid positions (docs/census.md, "Small samples"): each window keeps its rate (topic) and its runs;
        only where they sit is random.

        Window w (n valid positions, k active, circular autocorrelation R_w(d) = Σ_t a(t)a(t+d mod n)) has
        a circulant covariance C_w(i, j) = c_w(j − i mod n), c_w(d) = R_w(d)/n − k²/n², on its positions;
        windows are independent and ‖X_w − E X_w‖² is the same under every shift, so E S = Σ_w k(n−k)/n and
        Var S = 4 Σ_{w<w'} tr(C_w C_w') = 2[tr((Σ_w C_w)²) − Σ_w tr(C_w²)], with tr(C_w²) = (n Σ_d R_w(d)²
        − k⁴)/n².  Σ_w C_w is circulant per window shape (the summed R of its windows), and
        tr(C_g C_h) between two shapes is a sum over the position pairs they share (:func:`pair_lags`).  The
        p-value matches S to a scaled χ² with the exact mean and variance (Satterthwaite 1946, "An
        approximate distribution of estimates of variance components").
        Returns {statistic, mean, variance, p_value} [E] (float64), or None when the null is unavailable.
        """
        if self.shapes is None or not self.shapes:
            return None
        length, dev = self.tokens_by_position.numel(), self.sum_x.device
        expected = torch.zeros(length, self.n_neurons, dtype=torch.float64, device=dev)
        mean = torch.zeros(self.n_neurons, dtype=torch.float64, device=dev)
        own_traces = torch.zeros_like(mean)
        lags: dict[tuple[int, ...], Tensor] = {}  # c_g(d) of each shape's summed covariance [⌊n/2⌋+1, E]
        for key, (_, R, traces) in self.shapes.items():
            n, R = len(key), R.to(dev, torch.float64)
            sum_k, sum_k2 = R[0], (R * lag_multiplicity(n, dev)[:, None]).sum(0)  # Σk, Σk² (Σ_d R_w(d) = k²)
            expected[list(key)] += sum_k / n
            mean += sum_k - sum_k2 / n
            own_traces += traces.to(dev)
            lags[key] = R / n - sum_k2 / (n * n)
        statistic = ((self.active_by_position.to(torch.float64) - expected) ** 2).sum(0)
        keys = list(lags)
        cross = sum(pair_trace(lags[g], lags[h], *pair_lags(g, h, dev)) * (1 if i == j else 2)
                    for i, g in enumerate(keys) for j, h in enumerate(keys) if j >= i)
        variance = (2.0 * (cross - own_traces)).clamp_min(0.0)
        # a (near-)zero variance means S is fixed under the null (e.g. every window all-on or all-off)
        degenerate = variance <= 1e-12 * mean.clamp_min(1e-300) ** 2
        safe_var = torch.where(degenerate, 1.0, variance)
        dof = 2.0 * mean * mean / safe_var
        p = torch.special.gammaincc((dof / 2).clamp_min(1e-12), statistic * mean / safe_var)
        p = torch.where(degenerate | (mean <= 0), 1.0, p)
        return {"statistic": statistic, "mean": mean, "variance": variance, "p_value": p}

    def _warning(self, bias: float, fewest: int) -> str | None:
        if bias <= TRUSTED_BIAS_SHARE * self.mi_threshold:
            return None
        needed = math.ceil(1.0 / (2.0 * TRUSTED_BIAS_SHARE * self.mi_threshold))
        return (f"positional: the plug-in MI's bias is {bias:.3g} nats (fewest tokens at a position: {fewest}), "
                f"over a tenth of the {self.mi_threshold} threshold, so the count rests on the bias correction "
                f"and the circular-shift test (neurons near the threshold may be missed); use >= {needed} windows "
                "per position")

    def finalize(self) -> dict[str, Any]:
        """JSON-ready dict; see the class docstring."""
        self._require_data()
        plugin = positional_information(self.active_by_position, self.tokens_by_position)
        mi = plugin - positional_bias(self.active_by_position, self.tokens_by_position)
        null = self.shift_null()
        # no null, no test: the MI alone under-corrects at few tokens per position (flag nothing)
        positional = (mi > self.mi_threshold) & (null["p_value"] < self.alpha) if null is not None else mi < mi
        r = self.correlation()
        defined = ~torch.isnan(r)
        seen = (self.tokens_by_position > 0).nonzero().flatten()
        per_position = self.tokens_by_position[seen]
        freq = self.active_by_position[seen].double() / per_position[:, None].double()  # [T', E]
        k = min(self.top_k, self.n_neurons)
        top = torch.argsort(mi, descending=True, stable=True)[:k]
        curves = freq[:, top].T  # [k, T']
        fewest = int(per_position.min())
        # the bias of a neuron seen both active and inactive everywhere: the largest positional_bias can be
        bias = float((0.5 / per_position.double()).mean() - 0.5 / self.n_tokens)
        warning = self._warning(bias, fewest)
        if null is None:
            warning = ((warning + "; ") if warning else "positional: ") + (
                f"untested: no circular-shift null (more than {self.max_window_shapes} distinct window shapes), "
                "so no neuron is flagged; the MI is reported")
        return {
            "tokens": self.n_tokens,
            "window_length": self.tokens_by_position.numel(),
            "tokens_by_position": self.tokens_by_position.tolist(),
            "windows": None if self.shapes is None else sum(s[0] for s in self.shapes.values()),
            "min_tokens_per_position": fewest,
            "median_tokens_per_position": int(per_position.median()),
            "plugin_bias": bias,
            "positional_mi": mi.tolist(),
            "positional_mi_plugin": plugin.tolist(),
            "positional_p_value": None if null is None else null["p_value"].tolist(),
            "positional_threshold": self.mi_threshold,
            "positional_alpha": self.alpha,
            "positional_null": ("independent circular shift of each window's activity over its valid positions "
                                "(exact mean and variance, scaled χ²)" if null is not None else None),
            "positional_tested": null is not None,
            "positional_neurons": positional.nonzero().flatten().tolist(),
            "n_positional": int(positional.sum()),
            "n_positional_plugin": int((plugin > self.mi_threshold).sum()),
            "warning": warning,
            "position_correlation": none_if_nan(r),
            "mean_abs_position_correlation": float(r[defined].abs().mean()) if bool(defined.any()) else None,
            "mean_position_correlation": float(r[defined].mean()) if bool(defined.any()) else None,
            "positional_top": {
                "positions": seen.tolist(),
                "neurons": top.tolist(),
                "mi": mi[top].tolist(),
                "frequency_by_position": curves.tolist(),
            },
        }
