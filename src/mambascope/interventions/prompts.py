"""From text to a patching run: the prompt pair checked against the tokenizer, and ``results["patching"]``.

What ``mambascope patch`` runs (docs/patching.md): a clean and a corrupted prompt of the same number of
tokens (or the clean prompt with Gaussian noise on a subject's tokens), a single-token target, the
grids of :func:`~mambascope.interventions.patching.activation_patching` and their attribution-patching
estimates with the agreement between the two.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from mambascope.interventions.attribution_patching import agreement, attribution_patching
from mambascope.interventions.patching import activation_patching, embedding_std, gaussian_noise


@dataclass
class PromptPair:
    """Token ids of a patching run. ``corrupt_ids`` None: the corrupted run is the clean ids with Gaussian
    noise at ``subject_positions``."""

    clean: str
    corrupt: str | None
    clean_ids: list[int]
    corrupt_ids: list[int] | None
    target: int
    other: int | None
    subject_positions: list[int] | None = None


def single_token(tokenizer: Any, text: str, flag: str) -> int:
    """The one token id of ``text``; ValueError showing how it tokenizes otherwise."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = ", ".join(repr(tokenizer.decode([i])) for i in ids) or "no token"
        raise ValueError(f"{flag} {text!r} must be a single token of this tokenizer; it is {len(ids)}: {pieces}")
    return ids[0]


def tokens(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each id decoded on its own (the strings the figures and the report show)."""
    return [tokenizer.decode([i]) for i in ids]


def subject_positions(tokenizer: Any, text: str, subject: str) -> list[int]:
    """Positions of the tokens of ``text`` that overlap the first occurrence of ``subject`` (by characters)."""
    start = text.find(subject)
    if not subject or start < 0:
        raise ValueError(f"--noise-subject {subject!r} does not occur in --clean {text!r}")
    end = start + len(subject)
    offsets = tokenizer(text, return_offsets_mapping=True).offset_mapping
    return [i for i, (a, b) in enumerate(offsets) if a < end and b > start]


def prompt_pair(tokenizer: Any, clean: str, corrupt: str | None, target: str, corrupt_target: str | None = None,
                noise_subject: str | None = None) -> PromptPair:
    """Tokenize and check a patching run's prompts: equal lengths, single-token answers, the subject found.

    Raises ValueError with one line naming the flag at fault.
    """
    clean_ids = tokenizer(clean).input_ids
    if not clean_ids:
        raise ValueError("--clean is empty: give the prompt whose answer patching should restore")
    target_id = single_token(tokenizer, target, "--target")
    other = None if corrupt_target is None else single_token(tokenizer, corrupt_target, "--corrupt-target")
    if other == target_id:
        raise ValueError(f"--corrupt-target {corrupt_target!r} is the same token as --target")
    if noise_subject is not None:
        return PromptPair(clean, None, clean_ids, None, target_id, other,
                          subject_positions(tokenizer, clean, noise_subject))
    corrupt_ids = tokenizer(corrupt).input_ids
    if len(corrupt_ids) != len(clean_ids):
        raise ValueError(f"--clean and --corrupt must have the same number of tokens: --clean is {len(clean_ids)} "
                         f"tokens, --corrupt {len(corrupt_ids)}; reword one of them")
    return PromptPair(clean, corrupt, clean_ids, corrupt_ids, target_id, other)


def patch_prompts(model: nn.Module, tokenizer: Any, pair: PromptPair, *, unit_types: Sequence[str],
                  metric: str = "logit_diff", direction: str = "denoise", channels: Sequence[int] | None = None,
                  noise_scale: float = 3.0, seed: int = 0, batch_size: int = 64,
                  progress: bool = False, dictionary: Any = None
                  ) -> tuple[dict[str, Any], dict[str, float], dict[str, str]]:
    """Patching grids and their attribution estimates for one prompt pair (``dictionary``: a
    ``patching.Dictionary`` for the unit type ``features``).

    Returns (``results["patching"]`` without ``model``, timings in seconds, errors by name): a failure of
    attribution patching is recorded, not raised, so that the true grids are kept.
    """
    noise = None
    if pair.corrupt_ids is None:
        noise = gaussian_noise(model, pair.subject_positions, scale=noise_scale, seed=seed,
                               length=len(pair.clean_ids))
    common = {"target": pair.target, "metric": metric, "other": pair.other, "unit_types": unit_types,
              "channels": channels, "direction": direction, "corrupt_edits": noise}
    start = time.perf_counter()
    true = activation_patching(model, pair.clean_ids, pair.corrupt_ids, batch_size=batch_size, progress=progress,
                               dictionary=dictionary, **common)
    timings = {"patching": time.perf_counter() - start}
    corrupt_ids = pair.clean_ids if pair.corrupt_ids is None else pair.corrupt_ids
    other = true.metric.other
    out = {"prompts": {"clean": pair.clean, "corrupt": pair.corrupt, "target": tokenizer.decode([pair.target]),
                       "corrupt_target": None if other is None else tokenizer.decode([other]),
                       "clean_tokens": tokens(tokenizer, pair.clean_ids),
                       "corrupt_tokens": tokens(tokenizer, corrupt_ids)},
           **true.to_json()}
    if dictionary is not None and "features" in unit_types:
        spec = dictionary.spec
        out["dictionary"] = {"kind": spec.kind, "hook_in": spec.hook_in, "hook_out": spec.hook_out,
                             "d_sae": spec.d_sae, "k": spec.k,
                             "features": [row.index[0] for row in true.grids["features"].rows]}
    if noise is not None:
        sigma = embedding_std(model)
        out["noise"] = {"subject_positions": pair.subject_positions, "scale": noise_scale, "embedding_std": sigma,
                        "nu": noise_scale * sigma, "seed": seed}
    errors = {}
    start = time.perf_counter()
    # a knockout is not a patch of activations from the other run: it has no attribution-patching estimate;
    # nor (not implemented) the features, whose gradient would have to pass through the TopK encoder
    estimated = [u for u in unit_types if u not in ("knockout", "features")]
    try:
        estimate = attribution_patching(model, pair.clean_ids, pair.corrupt_ids,
                                        **{**common, "other": other, "unit_types": estimated}) if estimated else None
    except Exception as exc:  # the true grids stand without their estimate; the failure is reported by name
        errors["attribution"] = f"{type(exc).__name__}: {exc}"
    else:
        grids = estimate.grids if estimate else {}
        out["attribution"] = {u: {"effect": g.effect.tolist(), "metric": g.metric.tolist(),
                                  **agreement(true.grids[u], g)} for u, g in grids.items()}
    timings["attribution"] = time.perf_counter() - start
    return out, timings, errors


__all__ = ["PromptPair", "patch_prompts", "prompt_pair", "single_token", "subject_positions", "tokens"]
