"""Knockout inside a selective scan: remove token j's contribution to token i (Endy et al., ACL 2025).

The scan is linear in its input: with B̄_s u_s = Δ_s·B_s·u_s,

    y_i = C_i · Σ_{s≤i} (Π_{k=s+1..i} Ā_k) B̄_s u_s + D·u_i = Σ_{s≤i} α[i, s]·u_s + D·u_i

(the hidden attention α of docs/design.md §4).  Knocking j out of i's output drops the term s = j:
y_i ← y_i − α[i, j]·u_j, every other term, the skip D·u_i and every other position unchanged.  Knocking
j out of *every later* token (i > j) is the recurrence with B̄_j u_j removed from the state that
position j passes on, i.e. the scan of u with u_j zeroed in B̄u (Δ_j, hence the decay Ā_j, kept) for
the positions after j; position j's own output keeps its α[j, j]·u_j.  Targets i ≥ j instead of i > j
remove that self term too, which is exactly the scan with x_j·Δ_j·B_j zeroed.

Since only the outputs change, the correction α[i, j]·u_j is computed directly (O(b·|targets|·E·N) per
source, decays from segment sums of Δ·A in log space, as the scans do) and subtracted from the scan's y.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

# entries of the [rows, targets, E, N] decay block built at once (bounds the memory of a long target list)
_BLOCK = 1 << 22


@dataclass(frozen=True)
class Knockout:
    """Remove the contribution of position ``source`` to the scan outputs at ``targets``.

    ``targets``: positions i whose output loses α[i, source]·u_source; None = every later position
    (i > source); positions before ``source`` receive nothing from it and are ignored.  ``rows``: the batch
    rows it applies to (None = every row), so that one batched forward can knock out a different token in
    each row.  Used as an edit of ``blocks.{l}.mixer.hook_y`` (``mambascope.trace(..., edits=...)``, docs/hooks.md).
    """

    source: int
    targets: tuple[int, ...] | None = None
    rows: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for field in ("targets", "rows"):
            value = getattr(self, field)
            if value is not None:
                object.__setattr__(self, field, tuple(int(v) for v in value))

    def resolved(self, length: int, batch: int) -> tuple[int, list[int], list[int]]:
        """(source, sorted targets ≥ source, rows) with negative positions counted from the end;
        ValueError for a position or row out of range."""
        def position(p: int) -> int:
            if not -length <= p < length:
                raise ValueError(f"knockout position {p} is outside the sequence of {length} tokens")
            return p % length

        j = position(self.source)
        targets = range(j + 1, length) if self.targets is None else {position(i) for i in self.targets}
        rows = range(batch) if self.rows is None else self.rows
        bad = [r for r in rows if not 0 <= r < batch]
        if bad:
            raise ValueError(f"knockout row {bad[0]} is outside the batch of {batch} rows")
        return j, sorted(i for i in targets if i >= j), sorted(set(rows))


def as_knockouts(edit: object) -> tuple[Knockout, ...] | None:
    """The knockouts an edit value stands for (a :class:`Knockout` or a non-empty sequence of them), else None."""
    if isinstance(edit, Knockout):
        return (edit,)
    if isinstance(edit, (list, tuple)) and edit and all(isinstance(k, Knockout) for k in edit):
        return tuple(edit)
    return None


def _segment_decay_sums(dt: torch.Tensor, j: int, targets: Sequence[int]) -> torch.Tensor:
    """Σ_{k=j+1..i} Δ_k for each target i ≥ j: [rows, len(targets), ...] (0 at i = j), by a cumulative sum
    starting after j (no differences of large cumulative sums)."""
    after = torch.cumsum(dt[:, j + 1:], dim=1)
    sums = torch.cat([torch.zeros_like(dt[:, :1]), after], dim=1)
    return sums[:, [i - j for i in targets]]


def _blocks(targets: list[int], per_target: int) -> Iterable[list[int]]:
    step = max(1, _BLOCK // max(1, per_target))
    for start in range(0, len(targets), step):
        yield targets[start:start + step]


def s6_knockout_terms(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      knockouts: Iterable[Knockout]) -> torch.Tensor:
    """Mamba-1: Σ over the knockouts of α_e[i, j]·u[j, e] at each knocked-out (row, i), zero elsewhere.

    u, dt [b, L, E]; A [E, N]; B, C [b, L, N].  α_e[i, j] = Σ_n C[i, n]·exp(A[e, n]·Σ_{k=j+1..i} Δ[k, e])·
    B[j, n]·Δ[j, e].  Returns [b, L, E] in fp32 (fp64 if u is fp64): subtract it from y.
    """
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, dt, A, B, C = (t.to(dtype) for t in (u, dt, A, B, C))
    b, L, E = u.shape
    out = torch.zeros_like(u)
    for ko in knockouts:
        j, targets, rows = ko.resolved(L, b)
        r = torch.tensor(rows, device=u.device)
        written = dt[r, j] * u[r, j]  # [rows, E]: Δ_j·u_j, times B_j below
        for part in _blocks(targets, len(rows) * E * A.shape[1]):
            seg = _segment_decay_sums(dt[r], j, part)  # [rows, T, E]
            decay = torch.exp(seg[..., None] * A)  # [rows, T, E, N]
            alpha_u = torch.einsum("rten,rtn,rn->rte", decay, C[r][:, part], B[r, j]) * written[:, None]
            out[r[:, None], torch.tensor(part, device=u.device)[None, :]] += alpha_u
    return out


def ssd_knockout_terms(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       knockouts: Iterable[Knockout]) -> torch.Tensor:
    """Mamba-2: Σ over the knockouts of α_h[i, j]·u[j, h, :] at each knocked-out (row, i), zero elsewhere.

    u [b, L, H, P]; dt [b, L, H]; A [H]; B, C [b, L, G, N] (head h reads group h // (H/G)).
    α_h[i, j] = (C_i · B_j)_g(h) · exp(A_h·Σ_{k=j+1..i} Δ[k, h]) · Δ[j, h].  Returns [b, L, H, P].
    """
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, dt, A, B, C = (t.to(dtype) for t in (u, dt, A, B, C))
    b, L, H, _ = u.shape
    per_group = H // B.shape[2]
    out = torch.zeros_like(u)
    for ko in knockouts:
        j, targets, rows = ko.resolved(L, b)
        r = torch.tensor(rows, device=u.device)
        for part in _blocks(targets, len(rows) * H * B.shape[3]):
            cb = torch.einsum("rtgn,rgn->rtg", C[r][:, part], B[r, j]).repeat_interleave(per_group, dim=2)
            decay = torch.exp(_segment_decay_sums(dt[r], j, part) * A)  # [rows, T, H]
            alpha = cb * decay * dt[r, j][:, None]  # [rows, T, H]
            out[r[:, None], torch.tensor(part, device=u.device)[None, :]] += alpha[..., None] * u[r, j][:, None]
    return out


__all__ = ["Knockout", "as_knockouts", "s6_knockout_terms", "ssd_knockout_terms"]
