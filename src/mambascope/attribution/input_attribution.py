"""Per-token relevance of one prediction: Captum's input attributions, MambaLRP, knockout, the attention-neuron
methods.

One prediction is (ids [L], target position P, target token t).  Every method gives each position j a
relevance for it (docs/methods.md, "Token relevance of one prediction"):

* ``gradient_x_input`` (Shrikumar et al. 2016), ``integrated_gradients`` (Sundararajan et al. 2017) and
  ``occlusion`` (Zeiler & Fergus 2014), by Captum, at the **embedding layer**: the output e [L, D] of
  ``model.get_input_embeddings()``, replaced through a forward hook on that module, so that everything the
  family does after it (GPT-2's position embeddings, Falcon-H1's and Granite's embedding multipliers,
  Zamba2's shared blocks reading the embeddings) stays part of the explained function
  f(e) = logits[P, t] (the target's logit).  Token relevance = the attribution summed over the D
  embedding dimensions.  Baseline b of IG and occlusion: the mean input embedding by default (the zero
  embedding on request; docs/methods.md says why not by default); IG with ``IG_STEPS`` Gauss–Legendre
  steps and Captum's convergence delta Σ_j R_j − (f(e) − f(b)) reported; occlusion with a window of one
  token (f(e) − f(e with row j replaced by b's)).
* ``lrp``: MambaLRP (Jafari et al. 2024; AttnLRP rules on attention layers), :mod:`mambascope.attribution.lrp`:
  relevance at ``blocks.0.hook_resid_pre`` for the target logit, with what the biases absorb reported.
* ``knockout`` (Endy et al. 2025): log p(t) − log p(t | j knocked out of every later token in every SSM
  layer and, where the model has them, every attention layer), :mod:`mambascope.interventions.knockout`.
* The attention-neuron methods of :mod:`mambascope.attribution.methods`, one row per layer: their
  ``relevance`` at query P for target t.

Positions after P cannot affect a causal model's output at P: every method sees ids[:P+1] and gives 0 there.
``TOKEN_METHODS`` is the registry (name -> function returning rows); adding a method is one entry.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mambascope.arch import ADAPTERS, adapter
from mambascope.attribution.extract import METHODS as NEURON_METHODS
from mambascope.attribution.extract import check_layers, check_method, extract
from mambascope.attribution.lrp import SUPPORTED as LRP_FAMILIES
from mambascope.attribution.lrp import lrp
from mambascope.attribution.methods import compute_method
from mambascope.interventions.knockout import knockout_layers, knockout_logprobs
from mambascope.trace import trace

IG_STEPS = 64
IG_METHOD = "gausslegendre"
# the reference input of IG and occlusion (docs/methods.md: why the mean embedding by default)
BASELINES = {"mean": "the mean input embedding over the vocabulary, at every position",
             "zero": "the zero embedding"}
BASELINE = "mean"


@dataclass
class TokenRelevance:
    """One row of relevance for one prediction: ``relevance`` [L] float64 (0 after the target position),
    ``explains`` (the quantity it decomposes or perturbs), ``layer`` (None for whole-model methods) and
    ``details`` (settings and diagnostics, JSON-ready)."""

    method: str
    relevance: Tensor
    explains: str
    layer: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "layer": self.layer, "explains": self.explains,
                "relevance": self.relevance.tolist(), **self.details}


@dataclass(frozen=True)
class Settings:
    """Options of the registry's methods (one place, so that a new method adds its own field)."""

    ig_steps: int = IG_STEPS
    baseline: str = BASELINE


TokenMethod = Callable[[nn.Module, Tensor, int, int, Settings], list[TokenRelevance]]


def check_prediction(model: nn.Module, ids: Tensor | Sequence[int], target_position: int,
                     target_token: int) -> tuple[Tensor, int]:
    """(ids as [1, L] long, P in 0..L-1) after checking ids, position and token; ValueError otherwise."""
    t = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
    L = t.shape[1]
    if L == 0:
        raise ValueError("no tokens to attribute: the input is empty")
    if not -L <= target_position < L:
        raise ValueError(f"target position {target_position} is outside the {L}-token input")
    vocab = model.get_input_embeddings().num_embeddings
    if not 0 <= target_token < vocab:
        raise ValueError(f"target token {target_token} is outside the vocabulary (0..{vocab - 1})")
    return t.to(model.get_input_embeddings().weight.device), target_position % L


def target_logit(model: nn.Module, ids: Tensor, position: int | Tensor,
                 token: int | Tensor) -> Callable[[Tensor], Tensor]:
    """f(e) = logits[r, position_r, token_r] of ``model`` on ``ids`` [1, L] or [n, L] with the embedding layer's
    output replaced by e [n, L, D] (a batch of embeddings, as Captum passes them) -> [n].

    ``position`` and ``token``: one for every row, or [n] tensors, one per row of a batch of predictions (the
    rows do not interact, so ∂f_r/∂e is row r's own).  A supported family runs through the tracer (its
    forward equals the model's own, tests/test_trace.py, and is faster than Hugging Face's reference scans on
    CPU); any other causal LM (``get_input_embeddings``, ``forward(input_ids=...).logits``) runs its own forward."""
    embedding = model.get_input_embeddings()
    traced = getattr(getattr(model, "config", None), "model_type", None) in ADAPTERS

    def f(emb: Tensor) -> Tensor:
        batch = ids.expand(emb.shape[0], -1)
        handle = embedding.register_forward_hook(lambda module, args, out: emb.to(out.dtype))
        try:
            if traced:
                logits = trace(model, batch, names=[], grad=torch.is_grad_enabled()).logits
            else:
                logits = model(input_ids=batch).logits
        finally:
            handle.remove()
        dev = logits.device
        rows = torch.arange(emb.shape[0], device=dev)
        return logits[rows, torch.as_tensor(position, device=dev), torch.as_tensor(token, device=dev)]

    return f


def baseline_embedding(model: nn.Module, emb: Tensor, kind: str) -> Tensor:
    """The reference input of IG and occlusion, shaped like emb [1, L, D]: ``"mean"`` the mean of the input
    embedding matrix over the vocabulary at every position, ``"zero"`` the zero embedding."""
    if kind == "zero":
        return torch.zeros_like(emb)
    if kind == "mean":
        return model.get_input_embeddings().weight.detach().mean(0).to(emb.dtype).expand_as(emb).clone()
    raise ValueError(f"unknown baseline {kind!r}: choose from {', '.join(BASELINES)}")


def _setup(model: nn.Module, ids: Tensor | Sequence[int], position: int, token: int):
    t, P = check_prediction(model, ids, position, token)
    prefix = t[:, :P + 1]
    emb = model.get_input_embeddings()(prefix).detach()
    return t.shape[1], P, emb, target_logit(model, prefix, P, token)


def _padded(per_token: Tensor, length: int) -> Tensor:
    out = torch.zeros(length, dtype=torch.float64)
    out[:per_token.shape[0]] = per_token.detach().double().cpu()
    return out


def gradient_x_input(model: nn.Module, ids: Tensor | Sequence[int], target_position: int,
                     target_token: int) -> TokenRelevance:
    """R_j = Σ_d e[j, d]·∂f/∂e[j, d] (Captum ``InputXGradient``), f the target logit."""
    t, P = check_prediction(model, ids, target_position, target_token)
    relevance = _gradient_x_input_rows(model, t[:, :P + 1], torch.tensor([P]), torch.tensor([target_token]))
    return TokenRelevance("gradient_x_input", _padded(relevance[0], t.shape[1]), "target logit")


def _gradient_x_input_rows(model: nn.Module, ids: Tensor, positions: Tensor, targets: Tensor) -> Tensor:
    """[b, L] float64 gradient × input of each row's target logit (one forward and backward for the batch)."""
    from captum.attr import InputXGradient

    emb = model.get_input_embeddings()(ids).detach()
    attr = InputXGradient(target_logit(model, ids, positions, targets)).attribute(emb.requires_grad_())
    return attr.sum(-1).detach().double().cpu()


def integrated_gradients(model: nn.Module, ids: Tensor | Sequence[int], target_position: int, target_token: int,
                         *, n_steps: int = IG_STEPS, baseline: str = BASELINE) -> TokenRelevance:
    """R_j = Σ_d (e − b)[j, d]·∫₀¹ ∂f/∂e[j, d](b + α·(e − b)) dα (Captum ``IntegratedGradients``, b the
    ``baseline`` (:func:`baseline_embedding`), ``n_steps`` Gauss–Legendre points).  Completeness:
    Σ_j R_j = f(e) − f(b) up to the reported ``convergence_delta`` (Captum's Σ_j R_j − (f(e) − f(b)))."""
    from captum.attr import IntegratedGradients

    L, _, emb, f = _setup(model, ids, target_position, target_token)
    base = baseline_embedding(model, emb, baseline)
    attr, delta = IntegratedGradients(f).attribute(emb, baselines=base, n_steps=n_steps, method=IG_METHOD,
                                                   internal_batch_size=n_steps, return_convergence_delta=True)
    with torch.no_grad():
        gap = float(f(emb) - f(base))
    return TokenRelevance("integrated_gradients", _padded(attr[0].sum(-1), L), "target logit",
                          details={"baseline": BASELINES[baseline], "n_steps": n_steps, "integration": IG_METHOD,
                                   "convergence_delta": float(delta), "f_input_minus_f_baseline": gap})


def occlusion(model: nn.Module, ids: Tensor | Sequence[int], target_position: int, target_token: int,
              *, baseline: str = BASELINE) -> TokenRelevance:
    """R_j = f(e) − f(e with row j replaced by the ``baseline``'s row j) (Captum ``Occlusion``, a window of one
    token)."""
    from captum.attr import Occlusion

    L, _, emb, f = _setup(model, ids, target_position, target_token)
    D = emb.shape[-1]
    with torch.no_grad():
        attr = Occlusion(f).attribute(emb, sliding_window_shapes=(1, D), strides=(1, D),
                                      baselines=baseline_embedding(model, emb, baseline))
    # every dimension of a token's window carries the same difference
    return TokenRelevance("occlusion", _padded(attr[0].mean(-1), L), "target logit",
                          details={"baseline": BASELINES[baseline], "window": "1 token"})


def knockout(model: nn.Module, ids: Tensor | Sequence[int], target_position: int,
             target_token: int) -> TokenRelevance:
    """R_j = log p(t) − log p(t | token j knocked out of every later token in every SSM (and attention) layer)."""
    t, P = check_prediction(model, ids, target_position, target_token)
    prefix = t[:, :P + 1]
    layers = knockout_layers(model)
    knocked, clean = knockout_logprobs(model, prefix, target=target_token, position=P, layers=layers)
    return TokenRelevance("knockout", _padded(clean - knocked, t.shape[1]), "drop in target log-prob",
                          details={"layers": layers, "clean_logprob": clean,
                                   "scope": "SSM scan terms and attention weights; not the Mamba conv window"})


def mamba_lrp(model: nn.Module, ids: Tensor | Sequence[int], target_position: int,
              target_token: int) -> TokenRelevance:
    """R_j = MambaLRP relevance of token j for the target logit (:func:`mambascope.attribution.lrp.lrp`, every
    rule on); ``remainder`` = logit − Σ_j R_j, what the model's biases absorb."""
    t, P = check_prediction(model, ids, target_position, target_token)
    result = lrp(model, t[:, :P + 1], P, target_token)
    return TokenRelevance("lrp", _padded(result.relevance[0], t.shape[1]), "target logit",
                          details={"logit": float(result.logit[0]), "remainder": float(result.remainder[0]),
                                   "rules": "MambaLRP (SiLU, SSM, gate, norm); CP-LRP on attention"})


def neuron_method(method: str) -> TokenMethod:
    """The registry entry of attention-neuron method ``method``: one row per layer (``check_layers``' default
    layers), its ``relevance`` at query P for target t."""
    def rows(model: nn.Module, ids: Tensor | Sequence[int], target_position: int, target_token: int,
             settings: Settings) -> list[TokenRelevance]:
        t, P = check_prediction(model, ids, target_position, target_token)
        layers = check_layers(model, None)
        data = extract(model, t, layers, methods=[method], query=P, store="rows",
                       target=torch.tensor([target_token], device=t.device))
        records = compute_method(data, method)
        return [TokenRelevance(method, records[layer]["relevance"][0].detach().double().cpu(),
                               f"{method} relevance at the query (docs/methods.md)", layer) for layer in layers]

    return rows


def _whole(fn: Callable[[nn.Module, Tensor, int, int], TokenRelevance]) -> TokenMethod:
    return lambda model, ids, position, token, settings: [fn(model, ids, position, token)]


# name -> rows of relevance for one prediction, fn(model, ids, target_position, target_token, settings);
# whole-model methods (one row, layer None) first, then the per-layer attention-neuron methods
TOKEN_METHODS: dict[str, TokenMethod] = {
    "gradient_x_input": _whole(gradient_x_input),
    "integrated_gradients": lambda model, ids, position, token, settings: [
        integrated_gradients(model, ids, position, token, n_steps=settings.ig_steps, baseline=settings.baseline)],
    "occlusion": lambda model, ids, position, token, settings: [
        occlusion(model, ids, position, token, baseline=settings.baseline)],
    "lrp": _whole(mamba_lrp),
    "knockout": _whole(knockout),
    **{m: neuron_method(m) for m in NEURON_METHODS},
}
CAPTUM_METHODS = ("gradient_x_input", "integrated_gradients", "occlusion")
# one row per prediction (layer None): what the ground-truth scorer runs as whole-model rows
WHOLE_MODEL_METHODS = (*CAPTUM_METHODS, "lrp", "knockout")


def check_token_methods(methods: Sequence[str] | None) -> list[str]:
    """Known method names, de-duplicated in order (default: all); ValueError naming the unknown one."""
    if methods is None:
        return list(TOKEN_METHODS)
    unknown = [m for m in methods if m not in TOKEN_METHODS]
    if unknown:
        raise ValueError(f"unknown attribution method {unknown[0]!r}; choose from {', '.join(TOKEN_METHODS)}")
    return list(dict.fromkeys(methods))


def unavailable(model: nn.Module, method: str) -> str | None:
    """Why ``method`` cannot run on ``model`` (None when it can)."""
    if method == "lrp" and model.config.model_type not in LRP_FAMILIES:
        return f"LRP is implemented for {', '.join(LRP_FAMILIES)} models, not {model.config.model_type}"
    try:
        if method == "knockout":
            knockout_layers(model)
        elif method in NEURON_METHODS:
            check_method(method, model.config.model_type)
    except ValueError as exc:
        return str(exc)
    ad = adapter(model)
    ssm = ad.ssm_layers()
    if method == "rollout" and not ad.transformer and any(layer not in ssm for layer in range(max(ssm, default=0))):
        return f"rollout through the attention and MLP layers of a hybrid ({ad.model_type}) is not implemented"
    return None


def token_relevance(model: nn.Module, ids: Tensor | Sequence[int], target_position: int, target_token: int,
                    methods: Sequence[str] | None = None, errors: dict[str, str] | None = None,
                    settings: Settings = Settings(), timings: dict[str, float] | None = None) -> list[TokenRelevance]:
    """Rows of every method (default all that the model supports) for one prediction.  A method that fails
    is recorded in ``errors`` by name with its reason (and raised when ``errors`` is None); ``timings``
    receives each method's seconds."""
    chosen = check_token_methods(methods)
    if methods is None:
        chosen = [m for m in chosen if unavailable(model, m) is None]
    rows: list[TokenRelevance] = []
    for method in chosen:
        start = time.perf_counter()
        try:
            with torch.enable_grad():
                rows += TOKEN_METHODS[method](model, ids, target_position, target_token, settings)
        except Exception as exc:  # one failing method must not stop the others
            if errors is None:
                raise
            errors[method] = f"{type(exc).__name__}: {exc}"
        if timings is not None:
            timings[method] = time.perf_counter() - start
    return rows


def batch_relevance(model: nn.Module, ids: Tensor, positions: Tensor, targets: Tensor, method: str,
                    settings: Settings = Settings()) -> Tensor:
    """[b, L] float64 relevance of whole-model ``method`` for row r's prediction of ``targets[r]`` at
    ``positions[r]`` (0 after it), ids [b, L].  ``lrp`` and ``gradient_x_input`` run the batch in one forward
    and backward; the others run row by row."""
    if method not in WHOLE_MODEL_METHODS:
        raise ValueError(f"{method!r} is not a whole-model method ({', '.join(WHOLE_MODEL_METHODS)})")
    positions, targets = positions.long().cpu(), targets.long().cpu()
    with torch.enable_grad():
        if method == "lrp":
            return lrp(model, ids, positions, targets).relevance.cpu()
        if method == "gradient_x_input":
            return _gradient_x_input_rows(model, ids, positions, targets)
        return torch.stack([TOKEN_METHODS[method](model, row, int(p), int(t), settings)[0].relevance
                            for row, p, t in zip(ids, positions, targets, strict=True)])


def explain_prediction(model: nn.Module, ids: Tensor | Sequence[int], target_position: int = -1,
                       target_token: int | None = None, methods: Sequence[str] | None = None,
                       settings: Settings = Settings()) -> dict[str, Any]:
    """Every method's token relevance for one prediction, JSON-ready (``results["attribution"]`` without the
    strings, which need the tokenizer): ``ids``, ``target`` {id, position, chosen, logit, logprob} (default
    token: the model's own top prediction at the position), ``settings``, ``rows``
    (:meth:`TokenRelevance.to_json`), ``methods`` (run), ``errors`` and ``timings`` (seconds) by method."""
    t, P = check_prediction(model, ids, target_position, 0 if target_token is None else target_token)
    with torch.no_grad():
        logits = trace(model, t[:, :P + 1], names=[]).logits[0, P].double()
    chosen = "given" if target_token is not None else "top prediction"
    token = int(logits.argmax()) if target_token is None else target_token
    errors: dict[str, str] = {}
    timings: dict[str, float] = {}
    rows = token_relevance(model, t, P, token, methods, errors, settings, timings)
    return {"ids": t[0].tolist(),
            "target": {"id": token, "position": P, "chosen": chosen, "logit": float(logits[token]),
                       "logprob": float(torch.log_softmax(logits, -1)[token])},
            "settings": {"ig_steps": settings.ig_steps, "ig_integration": IG_METHOD,
                         "baseline": BASELINES[settings.baseline],
                         "explained": "Captum methods: the target's logit at the position, attributed at the "
                                      "embedding layer (summed over its dimensions); lrp: the target's logit at "
                                      "blocks.0.hook_resid_pre; knockout: the drop in the "
                                      "target's log-prob; attention-neuron methods: their relevance at the query"},
            "methods": list(timings), "rows": [r.to_json() for r in rows], "errors": errors,
            "timings": {k: round(v, 3) for k, v in timings.items()}}


__all__ = ["BASELINE", "BASELINES", "CAPTUM_METHODS", "IG_STEPS", "TOKEN_METHODS", "WHOLE_MODEL_METHODS", "Settings",
           "TokenMethod", "TokenRelevance", "baseline_embedding", "batch_relevance", "check_prediction",
           "check_token_methods", "explain_prediction", "gradient_x_input", "integrated_gradients", "knockout",
           "neuron_method", "occlusion", "target_logit", "token_relevance", "unavailable"]
