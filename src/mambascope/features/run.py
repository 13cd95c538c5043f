"""``mambascope sae`` end to end: hooks → spec → streamed training → held-out evaluation → SAELens files."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mambascope.arch import adapter
from mambascope.data.stream import WindowStream
from mambascope.features.dictionary import DictionarySpec, resolve_hook, save_dictionary
from mambascope.features.evaluate import evaluate_dictionary
from mambascope.features.train import TrainConfig, TrainState, train_dictionary


def default_hook(model: nn.Module, kind: str) -> str:
    """The middle layer's neuron (``mixer.hook_post``, else ``mlp.hook_post``) for an SAE; its mixer (or MLP)
    output for a transcoder."""
    ad = adapter(model)
    units = ad.units(ad.n_layers // 2)
    if kind == "transcoder":
        return next(u for u in ("hook_mixer_out", "hook_mlp_out", "hook_attn_out") if u in units)
    return next(u for u in ("mixer.hook_post", "mlp.hook_post", "hook_resid_post") if u in units)


def make_spec(model: nn.Module, model_name: str, kind: str, hook: str | None, input_hook: str | None,
              latents: int | None, expansion: float | None, k: int) -> DictionarySpec:
    """Resolve the hooks against the loaded model and size the dictionary; a ValueError / KeyError names
    the flag."""
    hook_out = resolve_hook(model, hook or default_hook(model, kind))
    layer = int(hook_out.split(".")[1])
    if kind == "transcoder":
        order = list(adapter(model).units(layer))
        unit_out = hook_out.split(".", 2)[2]
        # the residual stream the output's part reads: hook_resid_mid for a second part (an MLP after attention)
        before = [u for u in ("hook_resid_mid", "hook_resid_pre") if u in order[:order.index(unit_out)]]
        hook_in = resolve_hook(model, input_hook or f"blocks.{layer}.{before[0] if before else 'hook_resid_pre'}",
                               "--input-hook")
        unit_in = hook_in.split(".", 2)[2]
        if int(hook_in.split(".")[1]) != layer or order.index(unit_in) >= order.index(unit_out):
            raise ValueError(f"--input-hook {hook_in} must come before --hook {hook_out} in the same layer")
    else:
        hook_in = hook_out
    widths = _widths(model, [hook_in, hook_out])
    d_sae = latents if latents is not None else round(expansion * widths[hook_in])
    if d_sae < 1 or not 1 <= k <= d_sae:
        raise ValueError(f"--k {k} must be between 1 and the number of latents ({d_sae})")
    return DictionarySpec(kind, hook_in, hook_out, widths[hook_in], widths[hook_out], d_sae, k, model_name)


def _widths(model: nn.Module, hooks: list[str]) -> dict[str, int]:
    """Per-token width of each hook, from one traced 2-token input."""
    device = model.get_input_embeddings().weight.device
    from mambascope.trace import trace

    tr = trace(model, torch.zeros(1, 2, dtype=torch.long, device=device), names=hooks)
    return {h: int(tr[h][0, 0].numel()) for h in hooks}


def train_and_evaluate(model: nn.Module, spec: DictionarySpec, cfg: TrainConfig, stream: WindowStream, *,
                       heldout_fraction: float, eval_windows: int, out_dir: Path, checkpoint: Path,
                       state: TrainState | None, progress: bool, info: dict[str, Any]) -> dict[str, Any]:
    """Train, evaluate on held-out windows, write cfg.json + sae_weights.safetensors into ``out_dir``;
    returns the results dict (``errors`` names a failed evaluation)."""
    selection, heldout = stream.split(heldout_fraction)
    heldout = heldout[:eval_windows]
    results: dict[str, Any] = {**info, "dictionary": asdict(spec), "training": asdict(cfg), "errors": {},
                               "timings": {}, "incomplete": []}
    results["corpus"]["heldout_windows"] = int(heldout.shape[0])
    start = time.perf_counter()
    state = train_dictionary(model, spec, cfg, lambda: (ids for _, ids in selection), checkpoint=checkpoint,
                             state=state, progress=progress)
    results["timings"]["training"] = round(time.perf_counter() - start, 3)
    seconds = results["timings"]["training"]
    results["training"].update(steps=state.step, epochs_started=state.epoch + 1, last_batch_fvu=state.fvu,
                               tokens_per_second=round(cfg.steps * cfg.batch_tokens / max(1e-9, seconds), 1))
    save_dictionary(state.coder, spec, out_dir)
    start = time.perf_counter()
    try:
        results["evaluation"] = evaluate_dictionary(model, state.coder, spec, heldout, progress=progress)
    except (RuntimeError, ValueError) as exc:
        results["evaluation"] = None
        results["errors"]["evaluation"] = f"{type(exc).__name__}: {exc}"
    results["timings"]["evaluation"] = round(time.perf_counter() - start, 3)
    return results


def summary_lines(results: dict[str, Any]) -> list[str]:
    """What ``mambascope sae`` prints."""
    spec, ev = results["dictionary"], results.get("evaluation")
    lines = [f"{spec['kind']} dictionary {spec['hook_in']} -> {spec['hook_out']}: {spec['d_sae']} latents, "
             f"k = {spec['k']}, {results['training']['steps']} steps in {results['timings']['training']:.0f} s"]
    if ev is None:
        lines.append(f"evaluation FAILED: {results['errors'].get('evaluation')}")
        return lines
    lines += [f"held-out ({ev['windows']} windows, {ev['tokens']} tokens): FVU {ev['fvu']:.4f}, "
              f"mean L0 {ev['mean_l0']:.2f}, dead {ev['dead_latents']}, "
              f"dense (> {ev['dense_threshold']:.0%} of tokens) {ev['dense_latents']}",
              f"next-token loss: clean {ev['clean_loss']:.4f}, spliced {ev['spliced_loss']:.4f} "
              f"(delta {ev['delta_loss']:+.4f}), zero-ablated {ev['zero_ablated_loss']:.4f}; "
              f"loss recovered {ev['loss_recovered']:.3f}"]
    return lines
