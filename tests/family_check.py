"""Checks every architecture family's trace against the model's own forward (docs/design.md §10).

Independent references: the model's logits, and forward hooks on its own projection modules, which
capture the input of each output projection (out_proj / down_proj / o_proj) as the model computed it.
"""

from __future__ import annotations

import torch
from torch import nn

from mambascope.arch import adapter
from mambascope.trace import trace

VOCAB = 97


def stress(model: nn.Module) -> nn.Module:
    """Trained models have larger Δ·A and D than a fresh init, and O(1) activations where a fresh
    init's 0.02-std weights leave B·C (hence the scan) negligible next to D·x: stress the scans with both."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "D", "dt_bias", "dt_proj.bias")):
                p.add_(torch.randn_like(p))
            elif p.dim() >= 2 and "embed" not in name:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return model.eval()


def padded_batch(vocab: int = VOCAB, L: int = 37, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows: left-padded, right-padded, unpadded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (3, L), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    mask[1, -9:] = 0
    return ids, mask


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def _captured_inputs(model: nn.Module, modules: dict[str, nn.Module], ids: torch.Tensor,
                     mask: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: seen.__setitem__(n, args[0].detach()))
             for n, m in modules.items()]
    try:
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, seen


def projection_inputs(model: nn.Module) -> dict[str, nn.Module]:
    """Hook name -> the module whose input that unit must equal, for every layer."""
    ad = adapter(model)
    found = {}
    for layer in range(ad.n_layers):
        projs = ad.out_projs(layer)
        # MoE experts are 3-D parameters, not modules: their neurons are checked through the logits
        moe = any("moe" in p for p in ad.parts(layer))
        assert ad.neuron_unit(layer) is None or moe or ad.neuron_unit(layer) in projs
        found.update({f"blocks.{layer}.{unit}": module for unit, module in projs.items()})
    return found


def check_against_model(model: nn.Module, ids: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                        logit_tol: float = 1e-4, unit_tol: float = 1e-4) -> dict[str, float]:
    """Assert traced logits (every unit traced, softmax patterns explicit) and logits of the fused
    path (nothing traced) equal the model's own on real tokens, and each projection input equals what
    the model fed its own projection.  Returns the measured max relative errors."""
    if ids is None:
        ids, mask = padded_batch(model.config.vocab_size)
    modules = projection_inputs(model)
    ref, seen = _captured_inputs(model, modules, ids, mask)
    assert set(seen) == set(modules), f"hooks that never fired: {sorted(set(modules) - set(seen))}"
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    full = trace(model, ids, attention_mask=mask)
    fused = trace(model, ids, attention_mask=mask, names=[])
    errors = {"logits": rel(full.logits[valid], ref[valid]), "logits_fused": rel(fused.logits[valid], ref[valid])}
    for name, captured in seen.items():
        traced = full[name]
        errors[name] = rel(traced.reshape(captured.shape)[valid], captured[valid])
    bad = {k: v for k, v in errors.items() if v > (logit_tol if k.startswith("logits") else unit_tol)}
    assert not bad, f"traced != model: {bad}"
    return errors


def check_patterns(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, tol: float = 1e-5) -> float:
    """attn.hook_pattern equals the eager attention weights the model returns, on real query rows."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True, use_cache=False)
    tr = trace(model, ids, attention_mask=mask, names="*attn.hook_pattern")
    theirs = [a for a in out.attentions if a is not None]
    ours = [tr[name] for name in sorted(tr, key=lambda n: int(n.split(".")[1]))]
    assert len(theirs) == len(ours) > 0
    valid = mask.bool()
    worst = 0.0
    for a, p in zip(theirs, ours, strict=True):
        # [b, H, L, L] -> real query rows, and real keys (HF leaves ~0, not exactly 0, on masked keys)
        keep = valid[:, None, :, None] & valid[:, None, None, :]
        worst = max(worst, float((a - p).abs()[keep.expand_as(a)].max()))
    assert worst < tol, worst
    return worst
