"""Activation patching and causal tracing (docs/patching.md; docs/design.md §11).

Two runs of the same length: a *clean* prompt whose answer we care about and a *corrupted* one that
changes it (another prompt, or the clean prompt with Gaussian noise on the subject's embeddings, Meng et
al. 2022, "Locating and Editing Factual Associations in GPT", §2.1; for Mamba, Sharma et al. 2024).
Patching writes one unit's activation from one run into the other at one position and measures a
metric m of the final logits:

    effect = (m_patched − m_corrupt) / (m_clean − m_corrupt)

the fraction of the clean metric restored.  **Denoising** writes the clean activation into the
corrupted run (effect 1: the unit at that position carries everything the corruption removed);
**noising** writes the corrupted activation into the clean run (effect 1: the unit does not matter;
0: corrupting it alone does the whole damage).  The same formula serves both, so that 1 always means
"as clean".

Patches are batched: B copies of the base run's ids go through one traced forward, and the edit of each
unit writes the source activation into row i at its (position[, channels or head]), so a grid of
layers × positions costs about (cells / batch_size) forwards.  Units are the tracer's hook names
(``mambascope.trace``); nothing here reads a module's internals.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mambascope.arch import adapter
from mambascope.arch.units import STATE_UNIT
from mambascope.features.dictionary import codes
from mambascope.ssm.knockout import Knockout
from mambascope.trace import trace
from mambascope.trace.forward import KNOCKOUT_UNIT, Edit

# unit type -> what one row of its grid patches (docs/patching.md)
UNIT_TYPES: dict[str, str] = {
    "resid_pre": "hook_resid_pre: the residual stream entering the layer (layer 0: the embeddings)",
    "resid_post": "hook_resid_post: the residual stream leaving the layer",
    "mixer_out": "hook_mixer_out: what the SSM mixer writes into the residual stream",
    "attn_out": "hook_attn_out: what the attention writes into the residual stream",
    "mlp_out": "hook_mlp_out: what the MLP writes into the residual stream",
    "post": "the layer's neurons, all at once (mixer.hook_post, or mlp.hook_post where the layer has no mixer)",
    "heads": "one head: attn.hook_z[:, :, h] of an attention layer, or head h's channels of mixer.hook_y (Mamba-2)",
    "channels": "a chosen set of the neuron unit's channels, post[..., channels]",
    "state": "mixer.hook_ssm_state: the SSM state after the position; the scan continues from the patched state "
             "(the conv window is not part of it)",
    "knockout": "mixer.hook_y without the position's token: its term removed from every later token's scan output "
                "(Endy et al. 2025); an edit of the clean run, so direction 'noise' only",
    "features": "one feature of a sparse dictionary (--dictionary): its activation z_i from the source run written "
                "at the position, decoded through W_dec with the dictionary's error term kept",
}
ALIASES = {"resid": "resid_pre"}
# unit type -> the hook it patches, where that is one hook per layer
_RESIDUAL_UNITS = {"resid_pre": "hook_resid_pre", "resid_post": "hook_resid_post", "mixer_out": "hook_mixer_out",
                   "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out"}
# what ``mambascope patch`` patches unless --units says otherwise (where the model has it)
DEFAULT_UNITS = ("resid_pre", "resid_post", "mixer_out", "attn_out", "mlp_out", "post", "state")
METRICS = ("logit_diff", "logprob")
DIRECTIONS = ("denoise", "noise")
NOISE_UNIT = "blocks.0.hook_resid_pre"  # the embeddings as every layer stack sees them
FEATURES = "features"  # the source key of a dictionary's feature activations z [1, L, d_sae] (not a hook)


@dataclass(frozen=True)
class Dictionary:
    """A sparse dictionary whose features the unit type ``features`` patches: ``coder`` / ``spec`` from
    ``features.load_dictionary``; ``features``: the feature indices patched, one grid row each (None: all)."""

    coder: nn.Module
    spec: Any
    features: tuple[int, ...] | None = None

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """z [b, L, d_sae] of the dictionary's input x [b, L, ...] (TopK codes, features.dictionary.codes)."""
        b, L = x.shape[:2]
        z = codes(self.coder, x.reshape(b * L, self.spec.d_in).float().to(self.coder.W_dec.device))
        return z.reshape(b, L, self.spec.d_sae)


def unit_type_name(name: str) -> str:
    """The canonical unit type of ``name`` (``resid`` means ``resid_pre``); ValueError naming the known ones."""
    canonical = ALIASES.get(name, name)
    if canonical not in UNIT_TYPES:
        raise ValueError(f"unknown unit type {name!r}: choose from {', '.join([*UNIT_TYPES, *ALIASES])}")
    return canonical


# ---------------------------------------------------------------------------------------------- units

@dataclass(frozen=True)
class UnitRow:
    """One row of a patching grid: a unit of one layer, patched at each position in turn.

    ``name``: full hook name; ``index``: indices along the unit's third axis (after batch and position)
    that the patch writes, None for the whole [pos] slice; ``head``: the head it is, for ``heads``.
    """

    layer: int
    name: str
    index: tuple[int, ...] | None = None
    head: int | None = None


def unit_rows(model: nn.Module, unit_type: str, *, layers: Iterable[int] | None = None,
              channels: Sequence[int] | None = None, dictionary: Dictionary | None = None) -> list[UnitRow]:
    """The rows of ``unit_type``'s grid on ``model``: every layer (of ``layers``) that has the unit.

    ``channels`` (required for ``channels``): neuron indices patched together; ``dictionary`` (required for
    ``features``): one row per feature, at the dictionary's layer.  Raises ValueError when no chosen layer has
    the unit, naming the layer kinds.
    """
    unit_type = unit_type_name(unit_type)
    if unit_type == FEATURES:
        return _feature_rows(dictionary, layers)
    ad = adapter(model)
    chosen = list(range(ad.n_layers)) if layers is None else list(layers)
    for layer in chosen:
        ad.check_layer(layer)
    if unit_type == "channels":
        if not channels:
            raise ValueError("unit type 'channels' needs a channel set (channels=[...], --channels)")
        if any(c < 0 for c in channels):
            raise ValueError(f"channel indices start at 0, got {min(channels)}")
    rows = [row for layer in chosen for row in _layer_rows(ad, layer, unit_type, channels)]
    if not rows:
        kinds = sorted({ad.layer_kind(layer) for layer in chosen})
        raise ValueError(f"this {ad.model_type} model has no {unit_type!r} unit in layers {chosen} "
                         f"(layer kinds: {', '.join(kinds)})")
    return rows


def _feature_rows(dictionary: Dictionary | None, layers: Iterable[int] | None) -> list[UnitRow]:
    if dictionary is None:
        raise ValueError("unit type 'features' needs a dictionary (--dictionary DIR, a mambascope sae output)")
    spec = dictionary.spec
    if layers is not None and spec.layer not in set(layers):
        raise ValueError(f"the dictionary's features are at layer {spec.layer}, not in layers {list(layers)}")
    chosen = range(spec.d_sae) if dictionary.features is None else dictionary.features
    bad = [i for i in chosen if not 0 <= i < spec.d_sae]
    if bad:
        raise ValueError(f"feature {bad[0]} is out of range: the dictionary has features 0..{spec.d_sae - 1}")
    return [UnitRow(spec.layer, FEATURES, (int(i),)) for i in chosen]


def _layer_rows(ad: Any, layer: int, unit_type: str, channels: Sequence[int] | None) -> list[UnitRow]:
    units = ad.units(layer)
    prefix = f"blocks.{layer}."
    if unit_type == "state":
        return [UnitRow(layer, prefix + STATE_UNIT)] if STATE_UNIT in ad.state_units(layer) else []
    if unit_type == "knockout":
        return [UnitRow(layer, prefix + KNOCKOUT_UNIT)] if KNOCKOUT_UNIT in units else []
    if unit_type in _RESIDUAL_UNITS:
        unit = _RESIDUAL_UNITS[unit_type]
        return [UnitRow(layer, prefix + unit)] if unit in units else []
    neuron = ad.neuron_unit(layer)
    if unit_type == "post":
        return [] if neuron is None else [UnitRow(layer, prefix + neuron)]
    if unit_type == "channels":
        if neuron is None or ad.moe_kind(layer) is not None:  # experts' post has no flat channel axis
            return []
        width = ad.neuron_write_weights(layer).shape[1]
        if max(channels) >= width:
            raise ValueError(f"channel {max(channels)} is out of range: layer {layer} has {width} neurons")
        return [UnitRow(layer, prefix + neuron, tuple(int(c) for c in channels))]
    rows = []  # heads
    if "attn.hook_z" in units:
        rows += [UnitRow(layer, prefix + "attn.hook_z", (h,), h) for h in range(ad.n_heads(layer))]
    if ad.layer_kind(layer) == "mamba2":
        params = ad.mixer_params(layer)
        P = params.head_dim
        rows += [UnitRow(layer, prefix + "mixer.hook_y", tuple(range(h * P, (h + 1) * P)), h)
                 for h in range(params.n_heads)]
    return rows


# --------------------------------------------------------------------------------------------- metric

@dataclass(frozen=True)
class Metric:
    """A scalar of the logits at ``position`` (default the last: the next-token prediction), in float64.

    ``logit_diff``: logits[target] − logits[other]  (the clean answer against the corrupted one);
    ``logprob``: log_softmax(logits)[target].
    """

    kind: str
    target: int
    other: int | None = None
    position: int = -1

    def __post_init__(self) -> None:
        if self.kind not in METRICS:
            raise ValueError(f"unknown metric {self.kind!r}: choose from {', '.join(METRICS)}")
        if self.kind == "logit_diff" and (self.other is None or self.other == self.target):
            raise ValueError("the logit difference needs another token than the target (other)")

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [b, L, V] -> [b]."""
        row = logits[:, self.position].double()
        if self.kind == "logprob":
            return torch.log_softmax(row, dim=-1)[:, self.target]
        return row[:, self.target] - row[:, self.other]

    def formula(self) -> str:
        if self.kind == "logprob":
            return f"log_softmax(logits[{self.position}])[{self.target}]"
        return f"logits[{self.position}][{self.target}] - logits[{self.position}][{self.other}]"


def top_other(logits: torch.Tensor, target: int, position: int = -1) -> int:
    """The highest-scoring token at ``position`` of logits [1, L, V] other than ``target``."""
    top2 = logits[0, position].topk(2).indices.tolist()
    return top2[1] if top2[0] == target else top2[0]


# ------------------------------------------------------------------------------------------ corruption

def embedding_std(model: nn.Module) -> float:
    """Standard deviation of the entries of the input embedding matrix (σ of the noise rule ν = 3σ)."""
    return float(model.get_input_embeddings().weight.detach().float().std())


def gaussian_noise(model: nn.Module, positions: Sequence[int], *, scale: float = 3.0, seed: int = 0,
                   length: int | None = None) -> dict[str, Edit]:
    """Causal tracing's corruption (Meng et al. 2022, §2.1): add ε ~ N(0, ν²), ν = ``scale`` × σ of the
    embeddings (:func:`embedding_std`), to the residual stream entering layer 0 at ``positions``.

    One seeded draw [len(positions), d_model], the same in every row of a batch.  Returns the edit
    {``blocks.0.hook_resid_pre``: fn}, to pass as ``corrupt_edits``.  (Meng et al. take σ over the
    subjects of their data set; here it is σ over the whole embedding matrix.)
    """
    if not positions:
        raise ValueError("Gaussian-noise corruption needs at least one subject position")
    if length is not None and not all(-length <= p < length for p in positions):
        raise ValueError(f"subject positions {list(positions)} are outside the {length}-token prompt")
    weight = model.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(positions), weight.shape[1], generator=generator, dtype=torch.float64)
    noise = noise * scale * embedding_std(model)
    index = torch.tensor(list(positions), dtype=torch.long)

    def edit(h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        h[:, index.to(h.device)] += noise.to(device=h.device, dtype=h.dtype)
        return h

    return {NOISE_UNIT: edit}


# ----------------------------------------------------------------------------------------------- runs

@dataclass(frozen=True)
class Patch:
    """Write the source activation of hook ``name`` at ``position`` (``index``: along its third axis); with
    ``knockout``, instead knock the token at ``position`` out of the scan whose output ``name`` is."""

    name: str
    position: int
    index: tuple[int, ...] | None = None
    knockout: bool = False


def compose(first: Edit | None, then: Edit) -> Edit:
    """``then`` after ``first`` (None: ``then`` alone)."""
    return then if first is None else (lambda t: then(first(t)))


def is_state(name: str) -> bool:
    return name.endswith(STATE_UNIT)


def state_positions(rows: Sequence[Sequence[Patch]]) -> list[int] | None:
    """The sorted positions whose SSM state a batch patches (the tracer's ``state_positions``), None if none."""
    positions = sorted({p.position for patches in rows for p in patches if is_state(p.name)})
    return positions or None


def patch_edits(rows: Sequence[Sequence[Patch]], source: Mapping[str, torch.Tensor],
                base_edits: Mapping[str, Edit] | None = None, dictionary: Dictionary | None = None
                ) -> dict[str, Edit]:
    """Edits for a batch whose row i gets the patches ``rows[i]``, after the base run's own edits.

    source: hook name -> the source run's activation [1, L, ...] (the SSM state: [1, L, ...] traced after
    every position; ``FEATURES``: the dictionary's z [1, L, d_sae]).  Each edit writes, in one indexed
    assignment per (unit, index) group, source[pos(, index)] into row i at pos(, index); on the state, the slot
    of pos among :func:`state_positions` (the tracer's [b, K, ...] layout); features through
    :func:`_feature_edits`.
    """
    groups: dict[str, dict[tuple[int, ...] | None, tuple[list[int], list[int]]]] = {}
    knockouts: dict[str, list[Knockout]] = {}
    for i, patches in enumerate(rows):
        for p in patches:
            if p.knockout:
                knockouts.setdefault(p.name, []).append(Knockout(p.position, rows=(i,)))
                continue
            rs, ps = groups.setdefault(p.name, {}).setdefault(p.index, ([], []))
            rs.append(i)
            ps.append(p.position)
    slots = {p: k for k, p in enumerate(state_positions(rows) or [])}
    edits = dict(base_edits or {})
    for name, by_index in groups.items():
        if name == FEATURES:
            _feature_edits(dictionary, _writer(source[name][0], by_index, None), edits)
            continue
        edits[name] = compose(edits.get(name), _writer(source[name][0], by_index, slots if is_state(name) else None))
    for name, kos in knockouts.items():
        if name in edits:
            raise ValueError(f"{name}: a knockout cannot be combined with another edit of the scan output in one batch")
        edits[name] = kos
    return edits


def _writer(src: torch.Tensor, by_index: Mapping[tuple[int, ...] | None, tuple[list[int], list[int]]],
            slots: Mapping[int, int] | None) -> Edit:
    """Row r, position p (its state slot where ``slots`` is given) <- src[p] (at ``index`` on axis 2).

    A unit's tensor is copied before the write (the forward may still read the original, e.g. the residual
    stream); the state's is written in place: the tracer stacks a new [b, K, ...] tensor for every call of
    a state edit and keeps only the slot it asked for, and it is called K times per layer, so a copy there
    would cost O(b·K²·E·N) per layer.
    """
    def write(t: torch.Tensor) -> torch.Tensor:
        if slots is None:
            t = t.clone()
        values = src.to(device=t.device, dtype=t.dtype)
        for index, (rows, positions) in by_index.items():
            r = torch.tensor(rows, device=t.device)
            p = torch.tensor(positions, device=t.device)
            q = p if slots is None else torch.tensor([slots[x] for x in positions], device=t.device)
            if index is None:
                t[r, q] = values[p]
            else:
                i = torch.tensor(index, device=t.device)
                t[r[:, None], q[:, None], i[None, :]] = values[p[:, None], i[None, :]]
        return t

    return write


def _feature_edits(dictionary: Dictionary | None, write: Edit, edits: dict[str, Edit]) -> None:
    """Add to ``edits`` the patch of a dictionary's features: at ``hook_out``,  t ← t + (z' − z) W_dec, with z the
    codes of this forward's ``hook_in`` and z' = ``write``(z) (the source's z_i written in).  This is the
    decoded patched codes plus the error term t − (z W_dec + b_dec), kept: where z' = z, t is left exactly as
    it was.  A transcoder's ``hook_in`` is read on the way (an identity edit before its ``hook_out``)."""
    if dictionary is None:
        raise ValueError("a patch of 'features' needs the dictionary")
    spec, seen = dictionary.spec, {}

    def read(t: torch.Tensor) -> torch.Tensor:
        seen["x"] = t
        return t

    def patch(t: torch.Tensor) -> torch.Tensor:
        z = dictionary.codes(seen.pop("x"))
        delta = (write(z) - z) @ dictionary.coder.W_dec.detach()  # [b, L, d_out]: zero but at the patched cells
        return t + delta.to(device=t.device, dtype=t.dtype).reshape(t.shape)

    if spec.hook_in == spec.hook_out:
        edits[spec.hook_out] = compose(edits.get(spec.hook_out), lambda t: patch(read(t)))
    else:
        edits[spec.hook_in] = compose(edits.get(spec.hook_in), read)
        edits[spec.hook_out] = compose(edits.get(spec.hook_out), patch)


def run_patched(model: nn.Module, input_ids: torch.Tensor, rows: Sequence[Sequence[Patch]],
                source: Mapping[str, torch.Tensor], base_edits: Mapping[str, Edit] | None = None,
                dictionary: Dictionary | None = None) -> torch.Tensor:
    """Logits [len(rows), L, V] of ``len(rows)`` copies of input_ids [1, L] under ``base_edits``, row i
    with the patches ``rows[i]`` (an empty row is the base run itself)."""
    ids = input_ids.expand(len(rows), -1)
    return trace(model, ids, names=[], edits=patch_edits(rows, source, base_edits, dictionary),
                 state_positions=state_positions(rows)).logits


def all_states(names: Iterable[str], length: int) -> list[int] | None:
    """``state_positions`` that trace the SSM state after every position, when ``names`` include it."""
    return list(range(length)) if any(is_state(n) for n in names) else None


def as_ids(ids: torch.Tensor | Sequence[int], what: str) -> torch.Tensor:
    """Token ids as a [1, L] long tensor."""
    t = torch.as_tensor(ids, dtype=torch.long)
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{what} token ids must be one non-empty sequence, got shape {tuple(t.shape)}")
    return t[None]


@dataclass
class Runs:
    """The clean and corrupted runs a patching grid compares, and which one is patched.

    ``base_ids``/``base_edits``: the run that receives patches; ``source``: hook name -> the other run's
    activations [1, L, ...] (clean for ``denoise``, corrupted for ``noise``); ``base``: the base run's
    activations; ``clean_metric``/``corrupt_metric``: m of the unpatched runs.
    """

    metric: Metric
    direction: str
    base_ids: torch.Tensor
    base_edits: dict[str, Edit]
    source: dict[str, torch.Tensor]
    base: dict[str, torch.Tensor]
    clean_metric: float
    corrupt_metric: float

    def effect(self, patched: torch.Tensor) -> torch.Tensor:
        """(m_patched − m_corrupt) / (m_clean − m_corrupt)."""
        return (patched - self.corrupt_metric) / (self.clean_metric - self.corrupt_metric)

    def changed(self, rows: Sequence[UnitRow], positions: Sequence[int]) -> torch.Tensor:
        """[rows, positions] bool: whether the patch changes anything (source ≠ base there).  Elsewhere the
        patch writes the value already present and the cell's effect is 0 by construction (up to the
        float noise of another batch shape)."""
        out = torch.empty(len(rows), len(positions), dtype=torch.bool)
        for i, row in enumerate(rows):
            diff = self.source[row.name][0, positions] != self.base[row.name][0, positions]
            if row.index is not None:
                diff = diff[:, list(row.index)]
            out[i] = diff.reshape(len(positions), -1).any(dim=1).cpu()
        return out


def prepare_runs(model: nn.Module, clean_ids: torch.Tensor | Sequence[int],
                 corrupt_ids: torch.Tensor | Sequence[int] | None, names: Sequence[str], *, target: int,
                 metric: str = "logit_diff", other: int | None = None, position: int = -1,
                 direction: str = "denoise", corrupt_edits: Mapping[str, Edit] | None = None) -> Runs:
    """Trace the clean and corrupted runs once, keeping ``names``; resolve the metric.

    ``corrupt_ids`` None: the corrupted run is the clean ids under ``corrupt_edits`` (Gaussian noise).
    ``other`` None with ``logit_diff``: the corrupted run's top token other than ``target``.
    Raises ValueError for ids of different lengths, an unknown direction, or runs the metric does not
    tell apart (then no fraction of it can be restored).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}: choose from {', '.join(DIRECTIONS)}")
    clean = as_ids(clean_ids, "clean")
    corrupt = clean if corrupt_ids is None else as_ids(corrupt_ids, "corrupted")
    if corrupt.shape != clean.shape:
        raise ValueError(f"clean and corrupted prompts must have the same number of tokens (clean "
                         f"{clean.shape[1]}, corrupted {corrupt.shape[1]}): patching pairs position t of one with "
                         "position t of the other")
    if corrupt_ids is None and not corrupt_edits:
        raise ValueError("give corrupted ids or a corruption (corrupt_edits, e.g. gaussian_noise)")
    vocab = model.get_input_embeddings().num_embeddings
    for token, what in ((target, "target"), (other, "other")):
        if token is not None and not 0 <= token < vocab:
            raise ValueError(f"{what} token {token} is outside the vocabulary (0..{vocab - 1})")
    edits = dict(corrupt_edits or {})
    states = all_states(names, clean.shape[1])
    clean_run = trace(model, clean, names=list(names), state_positions=states)
    corrupt_run = trace(model, corrupt, names=list(names), edits=edits, state_positions=states)
    if metric == "logit_diff" and other is None:
        other = top_other(corrupt_run.logits, target, position)
    m = Metric(metric, target, other, position)
    m_clean, m_corrupt = float(m(clean_run.logits)[0]), float(m(corrupt_run.logits)[0])
    if abs(m_clean - m_corrupt) <= 1e-6 * max(1.0, abs(m_clean)):
        raise ValueError(f"the clean and corrupted runs give the same metric ({m.formula()} = {m_clean:.6g}): "
                         "there is nothing for patching to restore; choose prompts whose answers differ")
    denoise = direction == "denoise"
    source, base = (clean_run, corrupt_run) if denoise else (corrupt_run, clean_run)
    return Runs(m, direction, corrupt if denoise else clean, edits if denoise else {},
                {k: v.detach() for k, v in source.items()}, {k: v.detach() for k, v in base.items()},
                m_clean, m_corrupt)


# ----------------------------------------------------------------------------------------------- grids

@dataclass
class PatchGrid:
    """The grid of one unit type: ``rows`` (units) × ``positions``; ``metric`` and ``effect`` [rows, positions];
    ``changed`` [rows, positions]: the cells where the patched value differs from the base run's."""

    unit_type: str
    rows: list[UnitRow]
    positions: list[int]
    metric: torch.Tensor
    effect: torch.Tensor
    changed: torch.Tensor

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layers": [r.layer for r in self.rows], "positions": list(self.positions),
                               "hooks": [r.name for r in self.rows],
                               "effect": self.effect.tolist(), "metric": self.metric.tolist()}
        if any(r.head is not None for r in self.rows):
            out["heads"] = [r.head for r in self.rows]
        if self.unit_type == "channels":
            out["channels"] = list(self.rows[0].index or ())
        return out

    def top(self, k: int = 5) -> list[tuple[UnitRow, int, float]]:
        """The ``k`` cells of largest |effect|: (row, position, effect)."""
        flat = self.effect.flatten()
        order = flat.abs().argsort(descending=True)[:k].tolist()
        P = len(self.positions)
        return [(self.rows[i // P], self.positions[i % P], float(flat[i])) for i in order]


@dataclass
class PatchingResult:
    """Grids per unit type, with the metric and both unpatched values (``to_json``: results["patching"])."""

    metric: Metric
    direction: str
    clean_metric: float
    corrupt_metric: float
    grids: dict[str, PatchGrid] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"metric": {"kind": self.metric.kind, "target": self.metric.target, "other": self.metric.other,
                           "position": self.metric.position, "formula": self.metric.formula()},
                "direction": self.direction, "clean_metric": self.clean_metric,
                "corrupt_metric": self.corrupt_metric,
                "grids": {name: grid.to_json() for name, grid in self.grids.items()}}


def check_positions(positions: Sequence[int] | None, length: int) -> list[int]:
    """Positions 0..L-1 (default all), negative ones counted from the end; IndexError when out of range."""
    if positions is None:
        return list(range(length))
    bad = [p for p in positions if not -length <= p < length]
    if bad:
        raise IndexError(f"position {bad[0]} is outside the {length}-token prompt")
    return sorted({p % length for p in positions})


def grid_rows(model: nn.Module, unit_types: Sequence[str], layers: Iterable[int] | None = None,
              channels: Sequence[int] | None = None, dictionary: Dictionary | None = None
              ) -> dict[str, list[UnitRow]]:
    """unit type -> its rows (see :func:`unit_rows`), for every requested type."""
    chosen = None if layers is None else list(layers)
    return {unit_type_name(u): unit_rows(model, u, layers=chosen, channels=channels, dictionary=dictionary)
            for u in unit_types}


def activation_patching(
    model: nn.Module,
    clean_ids: torch.Tensor | Sequence[int],
    corrupt_ids: torch.Tensor | Sequence[int] | None = None,
    *,
    target: int,
    metric: str = "logit_diff",
    other: int | None = None,
    unit_types: Sequence[str] = ("resid_pre",),
    layers: Iterable[int] | None = None,
    positions: Sequence[int] | None = None,
    channels: Sequence[int] | None = None,
    direction: str = "denoise",
    corrupt_edits: Mapping[str, Edit] | None = None,
    batch_size: int = 64,
    progress: bool = False,
    dictionary: Dictionary | None = None,
) -> PatchingResult:
    """The effect grid of every unit type × layer × position (module docstring for the formula).

    Args:
        clean_ids, corrupt_ids: [L] or [1, L] token ids of the same length; ``corrupt_ids`` None with
            ``corrupt_edits`` = the clean ids corrupted by those edits (:func:`gaussian_noise`).
        target: the clean answer's token.  metric: ``logit_diff`` (target against ``other``, default the
            corrupted run's top token other than the target) or ``logprob`` (of the target), at the last
            position (:class:`Metric`).
        unit_types: keys of :data:`UNIT_TYPES` (``channels`` needs ``channels``); layers, positions:
            default all.  direction: ``denoise`` (clean into corrupted) or ``noise`` (corrupted into clean).
        batch_size: patches (rows of the batch) per traced forward.
        dictionary: the sparse dictionary whose features the unit type ``features`` patches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rows = grid_rows(model, unit_types, layers, channels, dictionary)
    if "knockout" in rows and direction != "noise":
        raise ValueError("unit type 'knockout' removes a token inside the clean run: use direction 'noise'")
    names = sorted({r.name for rs in rows.values() for r in rs} - {FEATURES}
                   | ({dictionary.spec.hook_in} if FEATURES in rows else set()))
    L = as_ids(clean_ids, "clean").shape[1]
    pos = check_positions(positions, L)
    runs = prepare_runs(model, clean_ids, corrupt_ids, names, target=target, metric=metric, other=other,
                        direction=direction, corrupt_edits=corrupt_edits)
    if FEATURES in rows:  # the runs' feature activations, from their traced hook_in
        for acts in (runs.source, runs.base):
            acts[FEATURES] = dictionary.codes(acts[dictionary.spec.hook_in])
    # position-major, so that a batch patches the state at few positions (the tracer's cost grows with them);
    # one unit type per batch, so that a knockout never meets a patch of the same scan output
    cells = {u: [(u, i, j) for j in range(len(pos)) for i in range(len(rs))] for u, rs in rows.items()}
    batches = [c[start:start + batch_size] for c in cells.values() for start in range(0, len(c), batch_size)]
    values = {u: torch.empty(len(rs), len(pos), dtype=torch.float64) for u, rs in rows.items()}
    bar = tqdm(total=sum(map(len, cells.values())), desc="patching", unit="patch", disable=not progress)
    for batch in batches:
        patches = [[Patch(rows[u][i].name, pos[j], rows[u][i].index, u == "knockout")] for u, i, j in batch]
        m = runs.metric(run_patched(model, runs.base_ids, patches, runs.source, runs.base_edits, dictionary)).cpu()
        for (u, i, j), value in zip(batch, m.tolist(), strict=True):
            values[u][i, j] = value
        bar.update(len(batch))
    bar.close()
    # a knockout changes the layer wherever a token follows the source; a patch, where source and base differ
    changed = {u: torch.tensor([[p < L - 1 for p in pos]] * len(rs)) if u == "knockout" else runs.changed(rs, pos)
               for u, rs in rows.items()}
    grids = {u: PatchGrid(u, rows[u], pos, values[u], runs.effect(values[u]), changed[u]) for u in rows}
    return PatchingResult(runs.metric, direction, runs.clean_metric, runs.corrupt_metric, grids)


__all__ = ["ALIASES", "DEFAULT_UNITS", "DIRECTIONS", "FEATURES", "METRICS", "UNIT_TYPES", "Dictionary", "Metric",
           "Patch", "PatchGrid",
           "PatchingResult", "Runs", "UnitRow", "activation_patching", "all_states", "as_ids", "check_positions",
           "compose", "embedding_std", "gaussian_noise", "grid_rows", "is_state", "patch_edits", "prepare_runs",
           "run_patched", "state_positions", "top_other", "unit_rows", "unit_type_name"]
