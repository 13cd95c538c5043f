"""Planted neurons: edit a copy of a bundled model so that chosen units are, by construction, dead, token
detectors, positional or Δ-sensitive, and record the ground truth the census must recover (issue 13).

Every construction makes the planted property exact, not approximate, and is checked with the model's own
modules (its norm, in_proj, c_fc, dt_proj ... called directly, or hooked in its own forward), never with
mambascope's tracer:

- **Mamba residual coordinates.** RMSNorm has no mean subtraction, so a residual coordinate j keeps its
  sign through the layer norm: normed_j = g_j·x_j / rms(x) with g_j set to 1. A z-row of in_proj that reads
  only coordinate j (weight w > 0) gives z = w·normed_j, whose sign is the sign of x_j. Layer 0's input is
  the embedding, so writing ±c into column j of the embedding decides, token by token, whether the gate of
  such a neuron opens: a **token detector** with an exactly known trigger set (its gate depends on the
  current token only: z comes from in_proj of the normed residual, before the conv). A column set to −c for
  every token, with the out_proj rows of every layer that write coordinate j zeroed, stays −c in the
  residual of every layer: a neuron reading it has z < 0 at every token of every layer: **dead**. A column
  held at +c the same way gives z > 0 at every token of every layer: **always active**, the control of
  the dead check (a census calling every neuron dead must fail it).
- **GPT-2 coordinate pairs.** LayerNorm subtracts the mean, so a neuron reads the difference of two
  coordinates a, a' whose LayerNorm weights (1) and biases (0) are equal: LN_a − LN_a' = (x_a − x_a')/σ.
  When the token embedding, every attention output column and the position embedding put the same value in
  a and a' except for a planted ±c, the difference is ±2c: the sign of the neuron's pre-activation (c_fc
  bias 0) is the planted sign. Planted in the **position** embedding: a positional neuron; in the token
  embedding: a token-only neuron (a detector when its set is small, a control otherwise). **Dead**: c_fc
  column 0 and bias −1, so the pre-activation is −1 everywhere; its control, **always active**: bias +1.
- **Δ (Mamba).** A channel's (Mamba-2: head's) dt weights scaled by a large factor with a bias that keeps
  the pre-softplus input negative make ln Δ ≈ the scaled input: a very selective unit. Weights zeroed: Δ =
  softplus(bias) on every token, selectivity 0: a planted-against control.

The corpus (:func:`permutation_windows`) is windows that are each a random permutation of one fixed set of
token types: every type occurs once per window, and its position is uniform. A unit whose gate depends on
the current token only then has no positional information at all, so Mamba's whole layer 0 and the
token-only GPT-2 units are planted-against controls for positional neurons.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

import mambascope

# GPT-2 position signs: active on the first half of the window / on even positions / on the first 8.
POSITION_PATTERNS = {"first_half": lambda p, T: p < T // 2, "even": lambda p, T: p % 2 == 0,
                     "first_eight": lambda p, T: p < 8}


@dataclass
class Planted:
    """An edited model and what was planted in it (layer -> neuron indices; Δ: layer -> unit indices)."""

    model: nn.Module
    tokenizer: object
    arch: str
    dead: dict[int, list[int]] = field(default_factory=dict)
    alive: dict[int, list[int]] = field(default_factory=dict)  # active on every token: the dead check's controls
    detectors: dict[int, dict[int, list[int]]] = field(default_factory=dict)  # layer -> neuron -> triggers
    non_detectors: dict[int, list[int]] = field(default_factory=dict)  # token-only, more than 5 types
    positional: dict[int, list[int]] = field(default_factory=dict)
    non_positional: dict[int, list[int]] = field(default_factory=dict)
    delta_sensitive: dict[int, list[int]] = field(default_factory=dict)
    delta_flat: dict[int, list[int]] = field(default_factory=dict)


def permutation_windows(token_types: torch.Tensor, n_windows: int, seed: int = 0) -> torch.Tensor:
    """[n_windows, len(token_types)]: each row a uniformly random permutation of ``token_types``."""
    g = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(token_types.numel(), generator=g) for _ in range(n_windows)])
    return token_types[order]


def corpus_types(tokenizer, vocab_size: int, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` distinct non-special token ids, chosen at random (sorted)."""
    special = set(tokenizer.all_special_ids)
    g = torch.Generator().manual_seed(seed)
    candidates = torch.tensor([t for t in torch.randperm(vocab_size, generator=g).tolist() if t not in special])
    return candidates[:count].sort().values


# ----------------------------------------------------------------------------------------------- Mamba


def _d_inner(model: nn.Module) -> int:
    return model.backbone.layers[0].mixer.intermediate_size


def _mamba_z_rows(model: nn.Module, arch: str) -> int:
    """Index of the first z row of in_proj: Mamba-1 splits in_proj into (x, z), Mamba-2 into (z, xBC, dt)."""
    return _d_inner(model) if arch == "mamba" else 0


def plant_mamba(name: str, types: torch.Tensor, *, c: float = 0.3, w: float = 4.0, seed: int = 0) -> Planted:
    """``tiny-mamba`` or ``tiny-mamba2`` with, in layer 0, detectors for 1, 3 and 5 of ``types``, controls
    reading 6 and half of the types, a dead and an always-active neuron in every layer, and Δ units planted
    in layer 1."""
    model, tokenizer = mambascope.load_model(name)
    model = copy.deepcopy(model).float().eval()
    arch = "mamba" if name == "tiny-mamba" else "mamba2"
    planted = Planted(model, tokenizer, arch)
    emb = model.backbone.embeddings.weight
    layers = model.backbone.layers
    z0 = _mamba_z_rows(model, arch)
    g = torch.Generator().manual_seed(seed)
    shuffled = types[torch.randperm(types.numel(), generator=g)].tolist()
    # token sets, each read through its own residual coordinate 1, 2, ...; coordinate 0 is the dead one
    sets = {"det1": shuffled[:1], "det3": shuffled[1:4], "det5": shuffled[4:9], "ctrl6": shuffled[9:15],
            "ctrl_half": shuffled[: types.numel() // 2]}
    neurons = {"det1": 10, "det3": 20, "det5": 30, "ctrl6": 40, "ctrl_half": 50}
    dead_neuron, alive_neuron, alive_coord = 7, 8, len(sets) + 1
    with torch.no_grad():
        emb[:, 0] = -c
        emb[:, alive_coord] = c
        for layer in layers:
            for coord in (0, alive_coord):
                layer.norm.weight[coord] = 1.0
                layer.mixer.out_proj.weight[coord, :] = 0.0  # nothing writes it: it stays −c (+c)
        for coord, (key, tokens) in enumerate(sets.items(), start=1):
            emb[:, coord] = -c
            emb[tokens, coord] = c
            layers[0].norm.weight[coord] = 1.0
            row = layers[0].mixer.in_proj.weight[z0 + neurons[key]]
            row.zero_()
            row[coord] = w
        for index, layer in enumerate(layers):
            for neuron, coord in ((dead_neuron, 0), (alive_neuron, alive_coord)):
                row = layer.mixer.in_proj.weight[z0 + neuron]
                row.zero_()
                row[coord] = w
            planted.dead[index] = [dead_neuron]
            planted.alive[index] = [alive_neuron]
    planted.detectors[0] = {neurons[k]: sorted(sets[k]) for k in ("det1", "det3", "det5")}
    planted.non_detectors[0] = [neurons["ctrl6"], neurons["ctrl_half"]]
    _plant_delta(planted, layer=1)
    return planted


def _plant_delta(planted: Planted, layer: int, scale: float = 30.0, shift: float = 30.0) -> None:
    """Δ units of ``layer``: two made very selective, two made constant (selectivity 0)."""
    mixer = planted.model.backbone.layers[layer].mixer
    sensitive, flat = [1, 3], [0, 2]
    with torch.no_grad():
        if planted.arch == "mamba":
            weight, bias = mixer.dt_proj.weight, mixer.dt_proj.bias
        else:
            first = mixer.in_proj.weight.shape[0] - mixer.num_heads
            weight, bias = mixer.in_proj.weight[first:], mixer.dt_bias
        weight[sensitive] *= scale
        bias[sensitive] -= shift  # keep softplus in its exponential range, where ln Δ follows the input
        weight[flat] = 0.0
    planted.delta_sensitive[layer] = sensitive
    planted.delta_flat[layer] = flat


def mamba_layer0_truth(planted: Planted, types: torch.Tensor) -> dict[str, object]:
    """Ground truth of every layer-0 neuron on a corpus of ``types``, from the model's own modules.

    z over the whole vocabulary = in_proj(norm(embedding)) z-rows (layer 0's gate depends on the current
    token only); trigger set A_e = {t : z[t, e] > 0}; on the permutation corpus (every type equally often)
    a neuron is dead iff A_e ∩ types = ∅ and a detector iff 1 <= |A_e ∩ types| <= 5.
    """
    model = planted.model
    with torch.no_grad():
        normed = model.backbone.layers[0].norm(model.backbone.embeddings.weight)
        z0 = _mamba_z_rows(model, planted.arch)
        z = model.backbone.layers[0].mixer.in_proj(normed)[:, z0:z0 + _d_inner(model)]
    on = z[types] > 0  # [types, E]
    sizes = on.sum(0)
    triggers = {e: types[on[:, e]].tolist() for e in range(on.shape[1]) if 1 <= int(sizes[e]) <= 5}
    return {"z": z, "dead": (sizes == 0).nonzero().flatten().tolist(), "detectors": triggers}


def mamba_mixer_inputs(planted: Planted, windows: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each layer's normed mixer input [b, L, H], captured by pre-hooks in the model's own forward."""
    captured: dict[int, torch.Tensor] = {}
    _hooked_forward(planted.model, windows, [
        layer.mixer.register_forward_pre_hook(lambda module, args, i=i: captured.__setitem__(i, args[0]))
        for i, layer in enumerate(planted.model.backbone.layers)])
    return captured


def _hooked_forward(model, windows: torch.Tensor, handles: list) -> None:
    """The model's own forward on ``windows`` with the hooks of ``handles``, removed afterwards."""
    try:
        with torch.no_grad():
            model(windows)
    finally:
        for h in handles:
            h.remove()


def mamba_gate_range(planted: Planted, inputs: dict[int, torch.Tensor]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the (min, max) over the corpus of each neuron's z = the z-rows of in_proj applied to the
    mixer's normed input (``inputs`` from :func:`mamba_mixer_inputs`)."""
    z0, E = _mamba_z_rows(planted.model, planted.arch), _d_inner(planted.model)
    with torch.no_grad():
        z = {i: planted.model.backbone.layers[i].mixer.in_proj(h)[..., z0:z0 + E].reshape(-1, E)
             for i, h in inputs.items()}
        return {i: (v.amin(0), v.amax(0)) for i, v in z.items()}


def mamba_delta_selectivity(planted: Planted, inputs: dict[int, torch.Tensor], layer: int) -> torch.Tensor:
    """std of ln Δ per unit over the corpus, Δ recomputed from the mixer's normed input (``inputs`` from
    :func:`mamba_mixer_inputs`) with the mixer's own modules: Mamba-1 in_proj → conv1d → SiLU → x_proj →
    dt_proj → softplus; Mamba-2 in_proj dt rows + dt_bias → softplus → clamp."""
    mixer = planted.model.backbone.layers[layer].mixer
    h = inputs[layer]
    with torch.no_grad():
        if planted.arch == "mamba":
            x = mixer.in_proj(h)[..., : mixer.intermediate_size].transpose(1, 2)
            u = torch.nn.functional.silu(mixer.conv1d(x)[..., : h.shape[1]]).transpose(1, 2)
            dt_low = mixer.x_proj(u)[..., : mixer.time_step_rank]
            dt = torch.nn.functional.softplus(mixer.dt_proj(dt_low))
        else:
            raw = mixer.in_proj(h)[..., -mixer.num_heads:]
            dt = torch.nn.functional.softplus(raw + mixer.dt_bias).clamp(*mixer.time_step_limit)
    return dt.double().log().reshape(-1, dt.shape[-1]).std(0, unbiased=False)


# ----------------------------------------------------------------------------------------------- GPT-2


def plant_gpt(types: torch.Tensor, *, c: float = 0.3, w: float = 4.0, seed: int = 0) -> Planted:
    """``tiny-gpt`` with, in layer 0's MLP, three positional neurons, two detectors (1 and 3 types), two
    token-only controls (6 types and half the types), and a dead and an always-active neuron in every layer."""
    model, tokenizer = mambascope.load_model("tiny-gpt")
    model = copy.deepcopy(model).float().eval()
    planted = Planted(model, tokenizer, "gpt2")
    tr = model.transformer
    T = tr.wpe.weight.shape[0]
    positions = torch.arange(T)
    g = torch.Generator().manual_seed(seed)
    shuffled = types[torch.randperm(types.numel(), generator=g)].tolist()
    token_sets = {"det1": shuffled[:1], "det3": shuffled[1:4], "ctrl6": shuffled[4:10],
                  "ctrl_half": shuffled[: types.numel() // 2]}
    signals = [("pos", key, POSITION_PATTERNS[key](positions, T)) for key in POSITION_PATTERNS]
    for key, tokens in token_sets.items():
        member = torch.zeros(tr.wte.weight.shape[0], dtype=torch.bool)
        member[tokens] = True
        signals.append(("tok", key, member))
    neuron_of = {key: 11 * (i + 1) for i, (_, key, _) in enumerate(signals)}
    dead_neuron, alive_neuron = 5, 6
    with torch.no_grad():
        for i, (kind, key, positive) in enumerate(signals):
            a, b = 2 * i, 2 * i + 1  # the coordinate pair of this signal
            sign = torch.where(positive, c, -c)
            for table in (tr.wte.weight, tr.wpe.weight):
                table[:, a] = 0.0
                table[:, b] = 0.0
            target = tr.wpe.weight if kind == "pos" else tr.wte.weight
            target[:, a] = sign
            target[:, b] = -sign
            for block in tr.h:  # every attention and MLP output writes a and b alike
                for proj in (block.attn.c_proj, block.mlp.c_proj):
                    proj.weight[:, b] = proj.weight[:, a]
                    proj.bias[b] = proj.bias[a]
            ln = tr.h[0].ln_2
            ln.weight[[a, b]] = 1.0
            ln.bias[[a, b]] = 0.0
            fc = tr.h[0].mlp.c_fc
            e = neuron_of[key]
            fc.weight[:, e] = 0.0
            fc.weight[a, e] = w
            fc.weight[b, e] = -w
            fc.bias[e] = 0.0
        for index, block in enumerate(tr.h):
            block.mlp.c_fc.weight[:, [dead_neuron, alive_neuron]] = 0.0
            block.mlp.c_fc.bias[dead_neuron] = -1.0
            block.mlp.c_fc.bias[alive_neuron] = 1.0
            planted.dead[index] = [dead_neuron]
            planted.alive[index] = [alive_neuron]
    planted.positional[0] = [neuron_of[k] for k in POSITION_PATTERNS]
    planted.non_positional[0] = [neuron_of[k] for k in token_sets]
    planted.detectors[0] = {neuron_of[k]: sorted(token_sets[k]) for k in ("det1", "det3")}
    planted.non_detectors[0] = [neuron_of["ctrl6"], neuron_of["ctrl_half"]] + planted.positional[0]
    return planted


def gpt_preactivations(planted: Planted, windows: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per layer, the MLP pre-activation c_fc(ln_2(x)) [b, L, E] from the model's own forward (hooks on c_fc)."""
    out: dict[int, torch.Tensor] = {}
    _hooked_forward(planted.model, windows, [
        block.mlp.c_fc.register_forward_hook(lambda m, args, result, i=i: out.__setitem__(i, result))
        for i, block in enumerate(planted.model.transformer.h)])
    return out
