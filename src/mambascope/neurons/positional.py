"""Positional neurons (Voita et al. 2023, "Neurons in Large Language Models: Dead, N-gram,
Positional", §5; docs/design.md §5), with a bias-corrected estimate and a permutation null that hold at
any sample size (docs/census.md, "Small samples")."""

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


class PositionalAccumulator(Accumulator):
    """Activity by position within fixed-length windows, and the correlation of post with position.

    Streams: valid tokens per position n(pos) [T] and active counts per (position, neuron) [T,E]
    (int64); for the Pearson correlation of post x with position p, Σx, Σx², Σxp [E] and Σp, Σp²
    (float64); for the permutation null, per *window shape* (the set of valid positions of a window;
    fixed-length windows have one or two: with and without BOS) the number of windows and, with k the
    active tokens of a window and n its valid tokens, Σk, Σk(n−k) and Σ(k(n−k))² per neuron (int64, so
    merge is exact). T grows to max position + 1 seen; at most ``max_window_shapes`` shapes are kept
    (a corpus with ragged windows would otherwise grow the state with its length); beyond, the null
    is unavailable and said so.

    ``finalize()``: ``positional_mi`` = the bias-corrected I (plug-in :func:`positional_information`
    minus :func:`positional_bias`; ``positional_mi_plugin`` keeps the plug-in value);
    ``positional_p_value`` from the within-window permutation null (:meth:`permutation_null`);
    positional ⇔ corrected I > ``mi_threshold`` (default 0.05, Voita et al.) and p < ``alpha``
    (default 0.001; a layer of E neurons without positional information has at most alpha·E false
    positives in expectation). Pearson r = cov(x,p)/(σ_x σ_p) from the streamed sums (None where σ_x or
    σ_p is 0), the layer's mean |r| and mean r (the seed's measure); fr(pos) curves of the ``top_k``
    neurons with the largest corrected I; windows and tokens per position, ``plugin_bias`` =
    mean_pos 1/(2·n(pos)) − 1/(2N) (the bias of a neuron seen both active and inactive at every position),
    and a ``warning`` when that bias is over a tenth of the threshold (fewer than ~100 windows per position).
    """

    _config: ClassVar[tuple[str, ...]] = ("mi_threshold", "alpha", "top_k", "max_window_shapes")
    _state: ClassVar[tuple[str, ...]] = ("tokens_by_position", "active_by_position", "sum_x", "sum_xx",
                                         "sum_xp", "sum_p", "sum_pp")

    def __init__(self, mi_threshold: float = 0.05, top_k: int = 10, layer: LayerLabel = None,
                 alpha: float = 0.001, max_window_shapes: int = 64) -> None:
        super().__init__(layer)
        mi_threshold = float(mi_threshold)
        if not (0.0 < mi_threshold < LN2):
            raise ValueError(f"mi_threshold must be in (0, ln 2 = {LN2:.4f}) nats (I never exceeds ln 2), "
                             f"got {mi_threshold}")
        self.mi_threshold = mi_threshold
        self.alpha = check_open_unit("alpha", alpha)
        self.top_k = check_positive_int("top_k", top_k)
        self.max_window_shapes = check_positive_int("max_window_shapes", max_window_shapes)
        # window shape (sorted valid positions) -> [windows, Σk, Σk(n−k), Σ(k(n−k))²]; None once over the cap
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

        Each row is one window: its valid positions must be distinct (the null permutes them).
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
        active = batch.active_on_valid.view(*batch.valid.shape, -1)  # [b, L, E]
        by_column = active.sum(0).long() if aligned else None  # exact: < 2²⁴ rows
        if self.shapes is None:
            return by_column
        k = active[rows].sum(1).long()  # [w, E] active tokens per window
        n = valid.sum(1, keepdim=True)  # [w, 1]
        q = k * (n - k)
        if bool((occupied == occupied[:1]).all()):  # one shape (fixed-length windows): no grouping needed
            shape_of, inverse = occupied[:1], torch.zeros(occupied.shape[0], dtype=torch.long, device=k.device)
        else:
            shape_of, inverse = torch.unique(occupied, dim=0, return_inverse=True)
        for g, mask in enumerate(shape_of):  # a loop over the few window shapes of a batch
            members = inverse == g
            key = tuple(mask.nonzero().flatten().tolist())
            sums = [int(members.sum()), k[members].sum(0), q[members].sum(0), (q[members] * q[members]).sum(0)]
            self._add_shape(key, sums)
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

    def permutation_null(self) -> dict[str, Tensor] | None:
        """The statistic S = Σ_pos (c(pos) − E c(pos))² and its exact mean and variance when the active
        tokens of every window are placed uniformly at random among its valid positions (a permutation
        test stratified by window: within-window rates, i.e. topic, are kept; only position is shuffled).

        Per window w with n valid positions of which k are active, X_w(pos) is hypergeometric with
        covariance b_w·(n·I − 11ᵀ) on its positions, b_w = k(n−k)/(n²(n−1)); windows are independent.
        Then E c(pos) = Σ_w k_w/n_w over the windows holding pos, E S = Σ_w k_w(n_w−k_w)/n_w, and
        Var S = 4 Σ_{w<w'} tr(Σ_w Σ_w') with tr(Σ_w Σ_w') = b_w b_w' [m(n n' − n − n') + m²], m the
        positions the two windows share (for one window length: 2n²(n−1)[(Σb)² − Σb²]). S is the
        numerator of Pearson's χ², which agrees with 2N·I (the G statistic) to second order; the p-value
        matches S to a scaled χ² with the exact mean and variance (Satterthwaite 1946, "An approximate
        distribution of estimates of variance components").
        Returns {statistic, mean, variance, p_value} [E] (float64), or None when the null is unavailable.
        """
        if self.shapes is None or not self.shapes:
            return None
        length, dev = self.tokens_by_position.numel(), self.sum_x.device
        keys = list(self.shapes)
        member = torch.zeros(len(keys), length, dtype=torch.float64, device=dev)
        for g, key in enumerate(keys):
            member[g, list(key)] = 1.0
        n = member.sum(1)  # [G]
        sum_k = torch.stack([self.shapes[key][1] for key in keys]).to(dev, torch.float64)  # [G, E]
        sum_q = torch.stack([self.shapes[key][2] for key in keys]).to(dev, torch.float64)
        sum_q2 = torch.stack([self.shapes[key][3] for key in keys]).to(dev, torch.float64)
        expected = member.T @ (sum_k / n[:, None])  # [T, E]
        statistic = ((self.active_by_position.to(torch.float64) - expected) ** 2).sum(0)
        mean = (sum_q / n[:, None]).sum(0)
        scale = (n * n * (n - 1)).clamp_min(1)[:, None]  # k(n−k) = 0 when n = 1, so b = 0 there
        b1, b2 = sum_q / scale, sum_q2 / (scale * scale)  # Σ_w b_w and Σ_w b_w² per shape  [G, E]
        m = member @ member.T  # shared positions [G, G]
        F = m * (n[:, None] * n[None, :] - n[:, None] - n[None, :]) + m * m
        variance = 2.0 * (torch.einsum("ge,gh,he->e", b1, F, b1) - (b2 * F.diagonal()[:, None]).sum(0))
        variance = variance.clamp_min(0.0)
        # a (near-)zero variance means S is fixed under the null (every window all-on or all-off but one)
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
                f"and the permutation test (neurons near the threshold may be missed); use >= {needed} windows "
                "per position")

    def finalize(self) -> dict[str, Any]:
        """JSON-ready dict; see the class docstring."""
        self._require_data()
        plugin = positional_information(self.active_by_position, self.tokens_by_position)
        mi = plugin - positional_bias(self.active_by_position, self.tokens_by_position)
        null = self.permutation_null()
        positional = mi > self.mi_threshold
        if null is not None:
            positional &= null["p_value"] < self.alpha
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
                f"no permutation null (more than {self.max_window_shapes} distinct window shapes)")
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
            "positional_null": ("within-window permutation of positions (exact mean and variance, scaled χ²)"
                                if null is not None else None),
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
