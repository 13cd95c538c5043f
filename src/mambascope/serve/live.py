"""Live computations for ``mambascope serve``: a user's text through the model, one neuron's activation per
token and its exact hidden-attention row at a chosen position (the live trace); a prompt continued with and
without a unit steered (the steer panel); per-token relevance of one prediction (the attribution page).

The activation is the layer's neuron unit (``adapter.neuron_unit``: ``blocks.{l}.mixer.hook_post`` on SSM
layers, ``blocks.{l}.mlp.hook_post`` on MLP layers) from :func:`mambascope.trace.trace`.  The attention row
is α[t, ·] of :func:`mambascope.ssm.hidden_attention.hidden_attention` (kind ``"s6"``) for the neuron's
channel (Mamba-1) or head (Mamba-2: channel // head_dim), computed for that one row only, exactly as the
pipeline's ``context_attention_rows`` computes the rows the report shows.  Attention and MLP layers have
no hidden attention, and the answer says so.

Steering runs :func:`mambascope.trace.generate.steered_pair` (what ``mambascope steer`` runs) with a
:class:`~mambascope.trace.generate.Steer` edit; attribution runs
:func:`mambascope.attribution.input_attribution.explain_prediction` (what ``mambascope attribute`` runs).
One computation runs at a time (a lock); a request that waits longer than ``LOCK_WAIT_S`` for it is refused.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from mambascope.arch import adapter
from mambascope.arch.base import UnsupportedFeature
from mambascope.attribution import input_attribution as ia
from mambascope.features.census import open_dictionary
from mambascope.features.dictionary import codes
from mambascope.interventions.prompts import single_token
from mambascope.ssm.hidden_attention import hidden_attention
from mambascope.trace import trace
from mambascope.trace.generate import MODES, Steer, check_generate, neuron_steering, parse_positions, steered_pair

MAX_TOKENS = 1024
"""Longest text (in tokens) a live trace accepts, below the model's own maximum where it has one: the
server answers in well under a second on CPU for a small model at this length."""
MAX_CHARS = 20_000
"""Longest text (in characters) read before tokenizing."""
MAX_NEW_TOKENS = 128
"""Most tokens the steer panel generates (twice: unsteered and steered; one token per step, about 10 ms a
step on CPU for the bundled tiny-mamba)."""
MAX_ATTRIBUTE_TOKENS = 128
"""Longest text (in tokens) the attribution page explains: occlusion and knockout run one forward of the text
per token (L forwards of L tokens), about 5 s each at 128 tokens on one CPU core for tiny-mamba, 20 s at 256."""
MAX_IG_STEPS = 64
"""Most integrated-gradients steps (a forward and a backward of that many copies of the text)."""
LOCK_WAIT_S = 60.0
"""Longest a request waits for the model while another computation runs before it is refused (503)."""


class LiveInputError(ValueError):
    """A live-trace request the model cannot answer (empty, no such layer/neuron/position): HTTP 400."""


class LiveTooLongError(LiveInputError):
    """A text over the live-trace limits: HTTP 413."""


class LiveBusyError(RuntimeError):
    """The model stayed busy with other requests for ``LOCK_WAIT_S``: HTTP 503."""


class LiveModel:
    """A loaded model and tokenizer that trace texts one at a time (a lock serialises requests)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, name: str) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.adapter = adapter(model)
        own = self.adapter.max_length
        self.max_tokens = min(MAX_TOKENS, own) if own else MAX_TOKENS
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"available": True, "model": self.name, "max_tokens": self.max_tokens, "max_chars": MAX_CHARS,
                "layers": {str(layer): self.adapter.layer_kind(layer) for layer in range(self.adapter.n_layers)},
                "steer": {"reason": self.steer_unavailable(), "max_new_tokens": MAX_NEW_TOKENS, "modes": list(MODES)},
                "attribute": {"max_tokens": min(MAX_ATTRIBUTE_TOKENS, self.max_tokens), "max_ig_steps": MAX_IG_STEPS,
                              "ig_steps": min(ia.IG_STEPS, MAX_IG_STEPS), "baselines": ia.BASELINES,
                              "baseline": ia.BASELINE, "default_methods": self.default_methods(),
                              "methods": {m: ia.unavailable(self.model, m) for m in ia.TOKEN_METHODS}}}

    def steer_unavailable(self) -> str | None:
        """Why this model cannot generate (a family the decoding cache does not cover), or None."""
        try:
            check_generate(self.model, 1)
        except UnsupportedFeature as exc:
            return str(exc)
        return None

    def default_methods(self) -> list[str]:
        """The whole-model attribution methods this model supports (the page's and the API's default)."""
        return [m for m in ia.WHOLE_MODEL_METHODS if ia.unavailable(self.model, m) is None]

    def neuron_counts(self) -> dict[int, int]:
        """Neurons per layer that has them (from a one-token trace of the neuron units: shapes only)."""
        ad = self.adapter
        units = {layer: ad.neuron_unit(layer) for layer in range(ad.n_layers)}
        names = [f"blocks.{layer}.{unit}" for layer, unit in units.items() if unit]
        device = next(self.model.parameters()).device
        with self._lock, torch.no_grad():
            tr = trace(self.model, torch.zeros(1, 1, dtype=torch.long, device=device), names)
        return {int(name.split(".")[1]): int(tr[name].shape[-1]) for name in names if tr[name].dim() == 3}

    def mismatch(self, sizes: dict[int, int]) -> str | None:
        """Why this model is not the one of an output with ``sizes`` {layer: neurons}, or None."""
        counts = self.neuron_counts()
        for layer, n in sorted(sizes.items()):
            if counts.get(layer) != n:
                has = f"{counts[layer]} neurons" if layer in counts else "no neurons"
                return (f"model {self.name!r} does not match this output: its layer {layer} has {has}, the output's "
                        f"{n}; give the run's model with --model")
        return None

    def tokenize(self, text: str, max_tokens: int | None = None, what: str = "a live trace",
                 name: str = "text") -> torch.Tensor:
        """[1, L] ids of ``text`` (no special tokens); LiveInputError / LiveTooLongError naming field ``name``
        past ``MAX_CHARS`` or ``max_tokens`` (default: the live trace's ``self.max_tokens``)."""
        limit = self.max_tokens if max_tokens is None else min(max_tokens, self.max_tokens)
        if not isinstance(text, str) or not text:
            raise LiveInputError(f"{name}: give a non-empty string")
        if len(text) > MAX_CHARS:
            raise LiveTooLongError(f"{name}: {len(text)} characters; at most {MAX_CHARS}")
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        if ids.shape[1] == 0:
            raise LiveInputError(f"{name}: it has no tokens")
        if ids.shape[1] > limit:
            raise LiveTooLongError(f"{name}: {ids.shape[1]} tokens; at most {limit} for {what}")
        return ids.to(next(self.model.parameters()).device)

    @contextlib.contextmanager
    def computing(self) -> Iterator[None]:
        """Hold the model for one computation, waiting at most ``LOCK_WAIT_S`` (LiveBusyError after)."""
        if not self._lock.acquire(timeout=LOCK_WAIT_S):
            raise LiveBusyError(f"the model is busy with other requests (waited {LOCK_WAIT_S:g} s); try again")
        try:
            yield
        finally:
            self._lock.release()

    def decode(self, ids: Sequence[int]) -> list[str]:
        """Each token of ``ids`` decoded on its own (the strings a page shows)."""
        return [self.tokenizer.decode([int(i)]) for i in ids]

    def trace(self, text: str, layer: int, neuron: int, position: int | None = None) -> dict[str, Any]:
        """``{"tokens", "activations", "position", "attention": {"unit", "index", "row"} | None, "reason"}``.

        ``position``: the query token t of the attention row (default the last; negative counts from the end).
        """
        ad = self.adapter
        if not 0 <= layer < ad.n_layers:
            raise LiveInputError(f"layer: {layer} is not a layer of {self.name} (0..{ad.n_layers - 1})")
        unit = ad.neuron_unit(layer)
        if unit is None:
            raise LiveInputError(f"layer {layer} of {self.name} is an attention layer: it has no neurons")
        ids = self.tokenize(text)
        L = ids.shape[1]
        position = L - 1 if position is None else position
        if not -L <= position < L:
            raise LiveInputError(f"position: {position} is outside the text's {L} tokens")
        position %= L
        kind = ad.neuron_kind(layer)
        ssm = kind in ("mamba", "mamba2")
        names = [f"blocks.{layer}.{unit}"] + ([f"blocks.{layer}.mixer.hook_{u}" for u in ("dt", "B", "C")]
                                              if ssm else [])
        with self.computing(), torch.no_grad():
            tr = trace(self.model, ids, names)
            post = tr[f"blocks.{layer}.{unit}"][0]
            if post.dim() != 2:  # MoE [L, X, F]: the census takes each expert's neurons separately
                raise LiveInputError(f"layer {layer} is a {ad.layer_kind(layer)} layer: live traces show dense "
                                     "neurons only")
            if not 0 <= neuron < post.shape[1]:
                raise LiveInputError(f"neuron: {neuron} is out of range: layer {layer} has neurons "
                                     f"0..{post.shape[1] - 1}")
            attention, reason = None, None
            if ssm:
                params = ad.mixer_params(layer)
                channel = neuron // params.head_dim  # head_dim is 1 on Mamba-1: one row per channel
                row = hidden_attention(tr.layer(layer), params, "s6", channels=[channel], rows=[position])[0, 0, 0]
                attention = {"unit": "head" if kind == "mamba2" else "channel", "index": channel,
                             "row": [float(x) for x in row[:position + 1].tolist()]}
            else:
                reason = (f"layer {layer} ({ad.layer_kind(layer)}) has no hidden attention: that is a quantity of "
                          "Mamba SSM layers; its neurons are the MLP's post")
        return {"model": self.name, "layer": layer, "neuron": neuron, "position": position,
                "tokens": self.decode(ids[0].tolist()),
                "activations": [float(x) for x in post[:, neuron].tolist()], "attention": attention,
                "reason": reason}


    # ------------------------------------------------------------------------------------------ steering
    def neuron_steering(self, layer: int, neuron: int) -> tuple[str, torch.Tensor]:
        """(hook name, e_neuron) of a neuron (``trace.generate.neuron_steering``); LiveInputError if none."""
        try:
            return neuron_steering(self.model, layer, neuron)
        except (ValueError, IndexError) as exc:
            raise LiveInputError(str(exc)) from None

    def steer(self, prompt: str, hook: str, direction: torch.Tensor, scale: float, mode: str = "add",
              positions: str | None = None, max_new_tokens: int = 20) -> dict[str, Any]:
        """``prompt`` continued greedily by ``max_new_tokens`` tokens without and with ``Steer(direction, scale,
        positions, mode)`` at ``hook``: ``{"prompt_tokens", "unsteered", "steered": {"ids", "tokens", "text"},
        ...}``.  ``positions``: ``mambascope steer``'s syntax (``"3,5:8,10:"``), None = every position."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) \
                or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise LiveInputError(f"max_new_tokens: give an integer in 1..{MAX_NEW_TOKENS}")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise LiveInputError(f"scale: give a finite number, not {str(scale)[:40]}")
        if mode not in MODES:
            raise LiveInputError(f"mode: {str(mode)[:40]!r} is not one of {', '.join(MODES)}")
        if positions is not None and not isinstance(positions, str):
            raise LiveInputError("positions: give a string like \"0:3,7\" (A:B excludes B), or null for every "
                                 "position")
        ids = self.tokenize(prompt, what="a steered prompt", name="prompt")
        try:
            ranges = parse_positions(positions, "positions") if positions and positions.strip() else None
            check_generate(self.model, max_new_tokens, prompt_length=ids.shape[1])
            edit = Steer(direction, float(scale), ranges, mode)
        except ValueError as exc:  # UnsupportedFeature included: a family generate does not cover
            raise LiveInputError(str(exc)) from None
        with self.computing():
            runs = steered_pair(self.model, ids, hook, edit, max_new_tokens)
        continuations = {name: {"ids": new[0].tolist(), "tokens": self.decode(new[0].tolist()),
                                "text": self.tokenizer.decode(new[0].tolist())} for name, new in runs.items()}
        return {"model": self.name, "hook": hook, "scale": float(scale), "mode": mode,
                "positions": None if ranges is None else [list(r) for r in ranges], "max_new_tokens": max_new_tokens,
                "decoding": "greedy", "prompt_tokens": self.decode(ids[0].tolist()), **continuations}

    # --------------------------------------------------------------------------------------- attribution
    def attribute(self, text: str, target: str | None = None, methods: Sequence[str] | None = None,
                  position: int = -1, ig_steps: int = ia.IG_STEPS, baseline: str = ia.BASELINE) -> dict[str, Any]:
        """Per-token relevance of the prediction at ``position`` of ``text`` (of ``target``, one token, or the
        model's top prediction) by each of ``methods`` (default: the supported whole-model methods):
        ``explain_prediction``'s answer with ``tokens`` and the target's ``token`` added."""
        if methods is None:
            methods = self.default_methods()
        if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
            raise LiveInputError(f"methods: give a non-empty list of names of {', '.join(ia.TOKEN_METHODS)}")
        try:
            methods = ia.check_token_methods(methods)
        except ValueError as exc:
            raise LiveInputError(f"methods: {exc}") from None
        for method in methods:
            reason = ia.unavailable(self.model, method)
            if reason:
                raise LiveInputError(f"methods: {method}: {reason}")
        if not isinstance(ig_steps, int) or isinstance(ig_steps, bool) or not 1 <= ig_steps <= MAX_IG_STEPS:
            raise LiveInputError(f"ig_steps: give an integer in 1..{MAX_IG_STEPS}")
        if baseline not in ia.BASELINES:
            raise LiveInputError(f"baseline: {str(baseline)[:40]!r} is not one of {', '.join(ia.BASELINES)}")
        if not isinstance(position, int) or isinstance(position, bool):
            raise LiveInputError("position: give an integer")
        ids = self.tokenize(text, MAX_ATTRIBUTE_TOKENS, "a live attribution")
        L = ids.shape[1]
        if not -L <= position < L:
            raise LiveInputError(f"position: {position} is outside the text's {L} tokens")
        if target is not None and not isinstance(target, str):
            raise LiveInputError("target: give the token's text, or null for the model's top prediction")
        try:
            token = None if target is None else single_token(self.tokenizer, target, "target")
        except ValueError as exc:
            raise LiveInputError(str(exc)) from None
        with self.computing():
            result = ia.explain_prediction(self.model, ids[0], position, token, methods,
                                           ia.Settings(ig_steps=ig_steps, baseline=baseline))
        result["target"]["token"] = self.tokenizer.decode([result["target"]["id"]])
        return {"model": self.name, "text": text, "tokens": self.decode(ids[0].tolist()), **result}


def load_live(name: str, device: str = "cpu") -> tuple[LiveModel | None, str | None]:
    """(LiveModel, None), or (None, why it could not load, one line naming the model)."""
    from mambascope.models.loading import load_model

    try:
        model, tokenizer = load_model(name, device=device)
    except Exception as exc:  # any failure becomes the live panel's reason; serving the rest goes on
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, f"model {name!r} could not be loaded: {first}"
    return LiveModel(model, tokenizer, name), None


class LiveFeatures(LiveModel):
    """Live traces of a sparse dictionary's features (``census --dictionary``) through the model of a
    ``LiveModel``, whose model, tokenizer and lock it shares (one computation at a time, steering and attribution
    as the neurons'): the feature's activation z_i = TopK_k(ReLU(x W_enc + b_enc))_i at every token of a user's
    text, x the traced ``hook_in``, encoded exactly as the census encoded it (``features.dictionary.codes``);
    the same limits on the text as for neurons.  A feature has no hidden-attention row (the answer says so)."""

    def __init__(self, live: LiveModel, coder: torch.nn.Module, spec: Any) -> None:
        self.__dict__.update(live.__dict__)  # the same model, tokenizer, limits and lock
        self.coder, self.spec = coder, spec
        self.layer = int(spec.hook_in.split(".")[1])

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "dictionary": self.spec.hook_in, "features": self.spec.d_sae}

    def mismatch(self, sizes: dict[int, int]) -> str | None:
        """Why this dictionary is not the one of an output whose features are ``sizes`` {layer: count}, or None."""
        if sizes != {self.layer: self.spec.d_sae}:
            return (f"the dictionary ({self.spec.d_sae} features at layer {self.layer}) does not match this output's "
                    f"features {sizes}")
        return None

    def trace(self, text: str, layer: int, feature: int, position: int | None = None) -> dict[str, Any]:
        """``{"tokens", "activations", "position", "attention": None, "reason"}`` of feature ``feature``."""
        if layer != self.layer:
            raise LiveInputError(f"layer: the dictionary's features are at layer {self.layer}, not {layer}")
        if not 0 <= feature < self.spec.d_sae:
            raise LiveInputError(f"feature: {feature} is out of range: the dictionary has features "
                                 f"0..{self.spec.d_sae - 1}")
        ids = self.tokenize(text)
        L = ids.shape[1]
        position = L - 1 if position is None else position
        if not -L <= position < L:
            raise LiveInputError(f"position: {position} is outside the text's {L} tokens")
        with self.computing(), torch.no_grad():
            x = trace(self.model, ids, [self.spec.hook_in])[self.spec.hook_in][0]
            z = codes(self.coder, x.reshape(L, self.spec.d_in).float().cpu())[:, feature]
        return {"model": self.name, "layer": layer, "neuron": feature, "unit": "feature", "position": position % L,
                "tokens": self.decode(ids[0].tolist()), "activations": [float(v) for v in z.tolist()],
                "attention": None,
                "reason": "a dictionary feature has no hidden-attention row: that is a quantity of an SSM channel"}

    def feature_steering(self, layer: int, feature: int) -> tuple[str, torch.Tensor]:
        """(hook name, W_dec[feature]): feature i steered adds scale·W_dec[i] at ``hook_out`` (``mambascope steer
        --feature``'s direction, ``trace.generate.dictionary_direction``)."""
        if layer != self.layer or not 0 <= feature < self.spec.d_sae:
            raise LiveInputError(f"feature: the dictionary has features 0..{self.spec.d_sae - 1} at layer {self.layer}")
        return self.spec.hook_out, self.coder.W_dec.detach()[feature].float().clone()


def load_live_features(live: LiveModel | None, reason: str | None, directory: str
                       ) -> tuple[LiveFeatures | None, str | None]:
    """(LiveFeatures, None) over the live model, or (None, why not: no model, or the dictionary in ``directory``
    cannot be read or does not fit the model)."""
    if live is None:
        return None, reason
    try:
        coder, spec = open_dictionary(directory, live.model)
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, f"the dictionary could not be loaded: {first}"
    return LiveFeatures(live, coder, spec), None
