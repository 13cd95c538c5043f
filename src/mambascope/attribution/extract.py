"""One traced forward → everything the attention-neuron methods need (docs/methods.md).

:func:`extract` runs the tracer once (with autograd only when a gradient method is requested), takes
the target log-probability at each row's query position, backpropagates it once, and computes the
hidden-attention pieces each requested method uses with :func:`mambascope.ssm.hidden_attention.hidden_attention`
(Mamba) or the traced softmax pattern (GPT-2).  What it returns, :class:`AttentionData`, is a dict
``layer -> {name: tensor}`` for the requested layers plus the shared attributes (query, target, rollout
chain).  All stored tensors are detached, fp32 (fp64 for an fp64 model), on the model's device.

Units per architecture (the "neurons" whose activation/importance the methods score):

* Mamba-1 / Mamba-2: the d_inner channels of ``mixer.hook_post`` (the project's neuron).  Each channel d
  aggregates its own input u[:, d] with its attention α_d (Mamba-1) or its head's α_h (Mamba-2).
* GPT-2: the attention heads.  A head is the transformer's unit that aggregates tokens with an attention
  row; an MLP neuron never mixes positions, so attention-derived scores cannot be assigned to it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from mambascope.arch import adapter, is_transformer
from mambascope.ssm.hidden_attention import AttentionMemoryError, hidden_attention, output_gate
from mambascope.trace import MixerParams, Trace, architecture, head_write_weights, mixer_params, n_layers, trace

METHODS = ("attention_weighted", "gradient_guided", "rollout", "block", "gradient_x_post")
GRADIENT_METHODS = frozenset({"gradient_guided", "gradient_x_post"})
MAMBA_ONLY = frozenset({"block"})
STORE = ("full", "vectors", "rows")

__all__ = ["GRADIENT_METHODS", "MAMBA_ONLY", "METHODS", "STORE", "AttentionData", "check_layers", "check_methods",
           "extract", "resolve_query"]


class AttentionData(dict):
    """``layer -> {name: tensor}`` for the requested layers, plus what every layer shares.

    Per-layer keys (present only when stored/needed; shapes with b = batch, L = positions,
    C = attention units: d_inner channels (Mamba-1), heads (Mamba-2, GPT-2); U = scored units: d_inner
    (Mamba), heads (GPT-2)):

    * ``attention_matrix`` [b, C, L, L] — exact s6 α (Mamba, docs/design.md §4) or softmax probabilities (GPT-2);
      only with ``store="full"``.
    * ``attention_vectors`` [b, L, L] — the mean of ``attention_matrix`` over C; ``store`` "full"/"vectors".
    * ``query_attention`` [b, C, L] — row q_b of each unit's attention for batch row b.
    * Mamba: ``ssm_input`` u [b, L, E]; ``gate_q`` [b, E] the effective gate at the query (post = gate·y);
      ``write_norm`` [E] ‖out_proj[:, d]‖₂; ``grad_y_q`` [b, E] ∂target/∂y at the query (gradient methods);
      ``post_x_grad`` [b, L, E] post·∂target/∂post; ``block_query`` [b, E, L] and ``x`` [b, L, E] (block).
    * GPT-2: ``value_norm`` and ``value_write_norm`` [b, H, L] (‖v_{s,h}‖, ‖W_O,h v_{s,h}‖);
      ``grad_query_attention`` [b, H, L] ∂target/∂A_h[q, :]; ``grad_x_attention`` [b, H, L] Σ_s (∇A ⊙ A)[t, s].

    Attributes: ``arch``, ``layers`` (requested, in order), ``methods`` (extracted), ``input_ids`` [b, L],
    ``attention_mask`` [b, L] (all ones when none was given), ``query`` [b], ``target_token`` [b],
    ``target_kind`` (per row "next" = the actual next token, "argmax" = the model's prediction, "given" =
    the ``target`` passed to :func:`extract`),
    ``target_logprob`` [b], ``rollout_matrices`` (layer -> [b, L, L] row-normalised Ā for layers
    0..max(layers), when rollout was extracted), ``n_units`` (layer -> U), ``unit`` ("channel" | "head"),
    ``errors`` (method -> reason, for method pieces that failed with ``on_error="record"``), ``store``.
    """

    arch: str
    layers: list[int]
    methods: list[str]
    input_ids: Tensor
    attention_mask: Tensor
    query: Tensor
    target_token: Tensor
    target_kind: list[str]
    target_logprob: Tensor
    rollout_matrices: dict[int, Tensor]
    n_units: dict[int, int]
    unit: str
    errors: dict[str, str]
    store: str


# ------------------------------------------------------------------------------------------ checks


def check_methods(methods: str | Iterable[str] | None, arch: str) -> list[str]:
    """Validated method names (default: every method the architecture supports)."""
    if methods is None:
        return [m for m in METHODS if not is_transformer(arch) or m not in MAMBA_ONLY]
    if isinstance(methods, str):
        methods = [methods]
    out: list[str] = []
    for m in methods:
        check_method(m, arch)
        if m not in out:
            out.append(m)
    return out


def check_method(method: str, arch: str) -> None:
    """ValueError for an unknown method or a Mamba-only method on a transformer."""
    if method not in METHODS:
        raise ValueError(f"unknown attention-neuron method {method!r}; valid methods: {', '.join(METHODS)}")
    if method in MAMBA_ONLY and is_transformer(arch):
        raise ValueError(f"method {method!r} is Mamba-only (it needs a selective-scan mixer); this model is "
                         f"a transformer ({arch}, GPT-2 style): use one of "
                         f"{', '.join(m for m in METHODS if m not in MAMBA_ONLY)}")


def check_layers(model: nn.Module, layer_indices: int | Sequence[int] | None) -> list[int]:
    """Validated, de-duplicated layer indices (negative count from the end; None = every layer, on a
    hybrid every SSM layer).  Transformers: attention heads of any layer; any other model: SSM layers only."""
    count = n_layers(model)
    ad = adapter(model)
    if layer_indices is None:
        return list(range(count)) if ad.transformer else ad.ssm_layers()
    if isinstance(layer_indices, int):
        layer_indices = [layer_indices]
    out: list[int] = []
    for layer in layer_indices:
        if isinstance(layer, bool):
            raise TypeError(f"layer indices must be integers, got {layer!r}")
        try:
            layer = operator.index(layer)  # int, numpy or 0-d tensor integers
        except TypeError:
            raise TypeError(f"layer indices must be integers, got {layer!r}") from None
        if not -count <= layer < count:
            raise IndexError(f"layer {layer} out of range: the model has layers 0..{count - 1}")
        layer %= count
        if layer not in out:
            out.append(layer)
    if not out:
        raise ValueError("no layers requested")
    if not ad.transformer:
        for layer in out:
            # the module check also catches a mixer replaced by hand (e.g. nn.Identity)
            if layer not in ad.ssm_layers() or not hasattr(ad.mixer(layer), "A_log"):
                raise ValueError(f"layer {layer} has no Mamba mixer (selective scan); attention neurons need one "
                                 f"(SSM layers of this {ad.model_type} model: {ad.ssm_layers()})")
    return out


def resolve_query(query: int | Sequence[int] | Tensor | None, mask: Tensor) -> Tensor:
    """[b] query positions: default the last valid token of each row; an int applies to every row
    (negative counts from the end); a sequence/tensor gives one position per row.  Raises IndexError
    when out of range, ValueError when a query falls on padding."""
    b, L = mask.shape
    if not bool(mask.bool().any(1).all()):
        raise ValueError("a row of attention_mask has no tokens")
    if query is None:
        # last index with mask 1: L-1 minus the position of the first 1 in the reversed row
        return (L - 1 - mask.flip(1).float().argmax(1)).long()
    q = torch.as_tensor(query, device=mask.device)
    if q.is_floating_point() or q.dtype == torch.bool:
        raise TypeError(f"query positions must be integers, got {q.dtype}")
    q = q.long().reshape(-1)
    if q.numel() == 1:
        q = q.expand(b)
    if q.numel() != b:
        raise ValueError(f"query must be one position or one per row ({b}), got {q.numel()}")
    bad = (q < -L) | (q >= L)
    if bool(bad.any()):
        raise IndexError(f"query position {int(q[bad][0])} out of range for sequences of {L} tokens "
                         f"(valid 0..{L - 1}, or -{L}..-1 from the end)")
    q = q % L
    on_pad = ~mask[torch.arange(b, device=mask.device), q].bool()
    if bool(on_pad.any()):
        row = int(on_pad.nonzero()[0, 0])
        raise ValueError(f"query position {int(q[row])} of row {row} is padding (attention_mask 0)")
    return q.clone()


# --------------------------------------------------------------------------------------- GPT-2 values


# -------------------------------------------------------------------------------------------- extract


def _names(arch: str, methods: list[str], requested: list[int], chain: list[int]) -> list[str]:
    names: set[str] = set()
    if is_transformer(arch):
        for layer in set(requested) | set(chain):
            names.add(f"blocks.{layer}.attn.hook_pattern")
        if "attention_weighted" in methods:
            names.update(f"blocks.{layer}.attn.hook_v" for layer in requested)
        return sorted(names)
    base = ("mixer.hook_dt", "mixer.hook_B", "mixer.hook_C")
    for layer in set(requested) | set(chain):
        names.update(f"blocks.{layer}.{u}" for u in base)
    per_layer = ["mixer.hook_ssm_input", "mixer.hook_gate", "mixer.hook_y"]
    if "gradient_x_post" in methods:
        per_layer.append("mixer.hook_post")
    if "block" in methods:
        per_layer += ["mixer.hook_x", "mixer.hook_conv", "mixer.hook_gate_pre"]
    for layer in requested:
        names.update(f"blocks.{layer}.{u}" for u in per_layer)
    return sorted(names)


def _row_normalise(m: Tensor) -> Tensor:
    """Rows divided by their sum; an all-zero row (nothing attended) stays zero."""
    s = m.sum(-1, keepdim=True)
    return m / torch.where(s > 0, s, torch.ones_like(s))


def extract(
    model: nn.Module,
    input_ids: Tensor,
    layer_indices: int | Sequence[int] | None = None,
    attention_mask: Tensor | None = None,
    *,
    methods: str | Iterable[str] | None = None,
    query: int | Sequence[int] | Tensor | None = None,
    store: str = "full",
    max_bytes: int | None = None,
    on_error: str = "raise",
    target: Tensor | None = None,
) -> AttentionData:
    """Trace ``model`` once on ``input_ids`` [b, L] and extract what ``methods`` need for ``layer_indices``.

    ``store``: ``"full"`` keeps ``attention_matrix`` [b, C, L, L] and ``attention_vectors``; ``"vectors"``
    only ``attention_vectors`` [b, L, L] (a chunked channel mean, never the full tensor); ``"rows"`` only
    the query rows the methods use.  A full matrix that does not fit raises the kernel's
    ``AttentionMemoryError`` (its message lists the smaller requests; ``store="rows"`` here).
    ``on_error``: ``"raise"`` or ``"record"`` — a failing method-specific piece is then stored in
    ``data.errors[method]`` and the other methods go on.  ``target`` [b]: the token whose log-prob at each
    row's query is explained (a task's answer); default the actual next token, else the argmax prediction.
    Rollout needs every layer 0..max(layer_indices) (its product starts at layer 0), so those layers are
    traced and their channel-mean |α| stored in ``data.rollout_matrices``.

    One traced forward and (for the gradient methods) one backward serve every method and layer.
    """
    arch = architecture(model)
    if store not in STORE:
        raise ValueError(f"unknown store {store!r}; valid: {', '.join(STORE)}")
    if on_error not in ("raise", "record"):
        raise ValueError(f"on_error must be 'raise' or 'record', got {on_error!r}")
    requested = check_layers(model, layer_indices)
    errors: dict[str, str] = {}
    methods = _valid_methods(methods, arch, on_error, errors)
    device = model.get_input_embeddings().weight.device
    input_ids = input_ids.to(device)
    mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)).long()
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(input_ids.shape)}")
    q = resolve_query(query, mask)
    methods, chain = _rollout_chain(model, arch, requested, methods, on_error, errors)
    trace_mask = None if attention_mask is None else mask
    tr, methods = _traced(model, input_ids, _names(arch, methods, requested, chain), trace_mask, methods,
                          on_error, errors)
    data = _new_data(tr, arch, requested, methods, store, input_ids, mask, q, target, errors)
    grad = any(m in GRADIENT_METHODS for m in methods)
    grads = _gradients(tr, arch, requested, methods, data.target_logprob) if grad else {}
    data.target_logprob = data.target_logprob.detach()
    with torch.no_grad():
        for layer in sorted(set(requested) | set(chain)):
            units = {k: v.detach() for k, v in tr.layer(layer).items()}
            if is_transformer(arch):
                entry = _transformer_layer(model, data, layer, units, grads, on_error)
            else:
                entry = _mamba_layer(model, data, layer, units, grads, trace_mask, max_bytes, on_error)
            if layer in requested:
                data[layer] = entry
    # keep the requested order for iteration
    ordered = {layer: data[layer] for layer in requested}
    data.clear()
    data.update(ordered)
    return data


def _valid_methods(methods: str | Iterable[str] | None, arch: str, on_error: str, errors: dict[str, str]) -> list[str]:
    """The methods to extract: raise mode checks them all; record mode (integrate_mamba_attention_neurons)
    makes a bad method name that method's failure only, in ``errors``."""
    if on_error == "raise":
        return check_methods(methods, arch)
    wanted = check_methods(None, arch) if methods is None else [methods] if isinstance(methods, str) else methods
    valid: list[str] = []
    for m in wanted:
        try:
            check_method(m, arch)
        except ValueError as exc:
            errors[m] = str(exc)
            continue
        if m not in valid:
            valid.append(m)
    return valid


def _rollout_chain(model: nn.Module, arch: str, requested: list[int], methods: list[str], on_error: str,
                   errors: dict[str, str]) -> tuple[list[str], list[int]]:
    """(methods, the layers 0..max(requested) rollout multiplies, [] without rollout); on a hybrid whose
    chain crosses a non-SSM layer, rollout is refused (raised, or recorded and dropped)."""
    chain = list(range(max(requested) + 1)) if "rollout" in methods else []
    gaps = [layer for layer in chain if not is_transformer(arch) and layer not in adapter(model).ssm_layers()]
    if not gaps:
        return methods, chain
    why = (f"rollout multiplies every layer's attention from layer 0, and layers {gaps} of this {arch} model "
           "are not SSM layers (rollout through attention and MLP layers of a hybrid is not implemented)")
    if on_error == "raise":
        raise ValueError(why)
    errors["rollout"] = why
    return [m for m in methods if m != "rollout"], []


def _traced(model: nn.Module, input_ids: Tensor, names: list[str], mask: Tensor | None, methods: list[str],
            on_error: str, errors: dict[str, str]) -> tuple[Trace, list[str]]:
    """(the trace, methods): with autograd when a gradient method is asked for.  In record mode a failed
    autograd forward is the gradient methods' failure only: the others run from a plain forward."""
    grad = any(m in GRADIENT_METHODS for m in methods)
    try:
        return trace(model, input_ids, names, attention_mask=mask, grad=grad), methods
    except RuntimeError as exc:
        if not grad or on_error == "raise":
            raise
        for m in methods:
            if m in GRADIENT_METHODS:
                errors[m] = f"autograd forward failed: {type(exc).__name__}: {exc}"
        return trace(model, input_ids, names, attention_mask=mask), [m for m in methods if m not in GRADIENT_METHODS]


def _new_data(tr: Trace, arch: str, requested: list[int], methods: list[str], store: str, input_ids: Tensor,
              mask: Tensor, q: Tensor, target: Tensor | None, errors: dict[str, str]) -> AttentionData:
    """The shared attributes, the target among them: log p(target) at each row's query, where the target
    is the given token, else the actual next token where one exists at q+1, else the argmax prediction.
    ``target_logprob`` is still attached to the graph (for :func:`_gradients`)."""
    b, L = input_ids.shape
    rows = torch.arange(b, device=input_ids.device)
    logp = torch.log_softmax(tr.logits[rows, q].float(), dim=-1)  # [b, V]
    has_next = (q + 1 < L) & mask.gather(1, (q + 1).clamp_max(L - 1)[:, None])[:, 0].bool()
    nxt = input_ids.gather(1, (q + 1).clamp_max(L - 1)[:, None])[:, 0]
    given = target is not None
    if given:
        target = torch.as_tensor(target, device=input_ids.device).long().reshape(-1)
        if target.shape != (b,):
            raise ValueError(f"target must hold one token per row ({b}), got shape {tuple(target.shape)}")
    else:
        target = torch.where(has_next, nxt, logp.argmax(-1))
    data = AttentionData()
    data.arch, data.layers, data.methods, data.store = arch, requested, list(methods), store
    data.input_ids, data.attention_mask, data.query = input_ids, mask, q
    data.target_token, data.target_logprob = target.detach(), logp[rows, target]
    data.target_kind = ["given" if given else "next" if bool(h) else "argmax" for h in has_next]
    data.rollout_matrices, data.n_units, data.errors = {}, {}, errors
    data.unit = "head" if is_transformer(arch) else "channel"
    return data


def _gradients(tr: Trace, arch: str, requested: list[int], methods: list[str], target_lp: Tensor) -> dict[str, Tensor]:
    """One backward of Σ_b target_b to every unit a gradient method reads, at every requested layer."""
    if is_transformer(arch):
        wrt = [f"blocks.{layer}.attn.hook_pattern" for layer in requested]
    else:
        wrt = [f"blocks.{layer}.mixer.hook_y" for layer in requested if "gradient_guided" in methods]
        wrt += [f"blocks.{layer}.mixer.hook_post" for layer in requested if "gradient_x_post" in methods]
    # Rows of a batch never interact, so d(Σ_b target_b)/d(unit of row b) = d target_b / d(unit of row b).
    got = torch.autograd.grad(target_lp.sum(), [tr[n] for n in wrt], materialize_grads=True)
    return {n: g.detach() for n, g in zip(wrt, got, strict=True)}


def _attempt(data: AttentionData, method: str, fn: Callable[[], None], on_error: str) -> None:
    """Run one method's piece; in record mode its failure goes to ``data.errors[method]``."""
    if method not in data.methods or method in data.errors:
        return
    try:
        fn()
    except Exception as exc:
        if on_error == "raise":
            raise
        data.errors[method] = f"{type(exc).__name__}: {exc}"


def _transformer_layer(model: nn.Module, data: AttentionData, layer: int, units: dict[str, Tensor],
                       grads: dict[str, Tensor], on_error: str) -> dict[str, Tensor]:
    """A transformer layer's entry from its softmax pattern (and the rollout matrix when rollout runs)."""
    pattern = units["attn.hook_pattern"].float()  # [b, H, L, L]
    rows, q = torch.arange(pattern.shape[0], device=pattern.device), data.query
    if "rollout" in data.methods:
        data.rollout_matrices[layer] = _row_normalise(pattern.mean(1))
    if layer not in data.layers:
        return {}
    entry: dict[str, Tensor] = {}
    data.n_units[layer] = pattern.shape[1]
    if data.store == "full":
        entry["attention_matrix"] = pattern
    if data.store in ("full", "vectors"):
        entry["attention_vectors"] = pattern.mean(1)
    entry["query_attention"] = pattern[rows, :, q]
    name = f"blocks.{layer}.attn.hook_pattern"

    def aw() -> None:
        v = units["attn.hook_v"].transpose(1, 2).float()  # [b, H_kv, L, dh]
        # grouped-query attention: each query head reads its group's values
        v = v.repeat_interleave(pattern.shape[1] // v.shape[1], dim=1)  # [b, H, L, dh]
        W = head_write_weights(model, layer).float()
        entry["value_norm"] = v.norm(dim=-1)
        entry["value_write_norm"] = torch.einsum("bhsp,hpd->bhsd", v, W).norm(dim=-1)

    def gg() -> None:
        entry["grad_query_attention"] = grads[name].float()[rows, :, q]

    def gxp() -> None:
        entry["grad_x_attention"] = (grads[name].float() * pattern).sum(-1)

    _attempt(data, "attention_weighted", aw, on_error)
    _attempt(data, "gradient_guided", gg, on_error)
    _attempt(data, "gradient_x_post", gxp, on_error)
    return entry


def _mamba_layer(model: nn.Module, data: AttentionData, layer: int, units: dict[str, Tensor],
                 grads: dict[str, Tensor], mask: Tensor | None, max_bytes: int | None,
                 on_error: str) -> dict[str, Tensor]:
    """An SSM layer's entry from its hidden attention (and the rollout matrix when rollout runs)."""
    params = mixer_params(model, layer)
    entry: dict[str, Tensor] = {}
    if layer in data.layers:
        entry = _mamba_entry(model, data, layer, units, params, grads, mask, max_bytes, on_error)
    if "rollout" in data.methods:
        full = entry.get("attention_matrix")
        absmean = full.abs().mean(1) if full is not None else hidden_attention(
            units, params, "s6", reduce="absmean", attention_mask=mask, max_bytes=max_bytes)
        data.rollout_matrices[layer] = _row_normalise(absmean)
    return entry


def _query_rows(data: AttentionData, layer: int, units: dict[str, Tensor], params: MixerParams, mask: Tensor | None,
                max_bytes: int | None) -> dict[str, Tensor]:
    """``attention_matrix``, ``attention_vectors`` (as ``data.store`` says) and ``query_attention`` of the s6 α."""
    rows, q = torch.arange(data.query.shape[0], device=data.query.device), data.query
    if data.store == "full":
        try:
            full = hidden_attention(units, params, "s6", attention_mask=mask, max_bytes=max_bytes)
        except AttentionMemoryError as exc:
            raise AttentionMemoryError(
                f"layer {layer}: {exc} Here: extract with store='rows' (only the query rows the "
                "methods use) or store='vectors' (the [b, L, L] channel mean).") from exc
        return {"attention_matrix": full, "attention_vectors": full.mean(1), "query_attention": full[rows, :, q]}
    out: dict[str, Tensor] = {}
    if data.store == "vectors":
        out["attention_vectors"] = hidden_attention(units, params, "s6", reduce="mean", attention_mask=mask,
                                                    max_bytes=max_bytes)
    out["query_attention"] = _at_queries(units, params, "s6", q, mask, max_bytes)
    return out


def _at_queries(units: dict[str, Tensor], params: MixerParams, kind: str, q: Tensor, mask: Tensor | None,
                max_bytes: int | None) -> Tensor:
    """[b, E, L] the ``kind`` hidden attention's row at each row's query q [b]: each distinct query row is
    computed once for the batch, then every row takes its own."""
    uniq, inv = torch.unique(q, return_inverse=True)
    m = hidden_attention(units, params, kind, rows=uniq, attention_mask=mask, max_bytes=max_bytes)
    return m[torch.arange(q.shape[0], device=q.device), :, inv]


def _mamba_entry(model: nn.Module, data: AttentionData, layer: int, units: dict[str, Tensor], params: MixerParams,
                 grads: dict[str, Tensor], mask: Tensor | None, max_bytes: int | None,
                 on_error: str) -> dict[str, Tensor]:
    rows, q = torch.arange(data.query.shape[0], device=data.query.device), data.query
    data.n_units[layer] = params.d_inner
    entry = _query_rows(data, layer, units, params, mask, max_bytes)
    wd = entry["query_attention"].dtype
    u = units["mixer.hook_ssm_input"].to(wd)
    y, gate = units["mixer.hook_y"].to(wd), units["mixer.hook_gate"].to(wd)
    entry["ssm_input"] = u
    entry["gate_q"] = output_gate(y, gate, params)[rows, q]
    entry["write_norm"] = params.out_proj_weight.to(wd).norm(dim=0)
    if "gradient_guided" in data.methods:
        entry["grad_y_q"] = grads[f"blocks.{layer}.mixer.hook_y"].to(wd)[rows, q]
    if "gradient_x_post" in data.methods:
        entry["post_x_grad"] = units["mixer.hook_post"].to(wd) * grads[f"blocks.{layer}.mixer.hook_post"].to(wd)

    def blk() -> None:
        entry["block_query"] = _at_queries(units, params, "block", q, mask, max_bytes)
        entry["x"] = units["mixer.hook_x"].to(entry["block_query"].dtype)

    _attempt(data, "block", blk, on_error)
    return entry


def per_channel(data: AttentionData, layer: int, t: Tensor, dim: int = 1) -> Tensor:
    """Expand a per-attention-unit tensor to per scored unit: Mamba-2 heads → their head_dim channels."""
    U, C = data.n_units[layer], t.shape[dim]
    return t if U == C else t.repeat_interleave(U // C, dim=dim)
