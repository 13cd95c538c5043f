"""Without ``attn.hook_pattern`` requested, the traced transformer forward takes the model's own fused
attention path: its outputs equal the model's own forward, and no [L, L] tensor is made at all.

The check records the shape of every tensor an ATen operator returns during the traced forward (a
``TorchDispatchMode``), so it sees the pattern wherever it would be made, by our code or inside an
operator's decomposition; the same recorder finds the [b, H, L, L] pattern when it is requested."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from family_check import _captured_inputs, projection_inputs, rel
from mambascope.arch import adapter
from mambascope.trace import trace, trace_stream

B, L, H = 2, 37, 4  # L differs from every other axis of these models (vocab 97, widths 32/40/48, head dim 8)


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=H, n_inner=48,
                                          n_positions=64)).eval()
    if family == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=H, intermediate_size=48,
                                                max_position_embeddings=64)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=H,
                                        num_key_value_heads=2, intermediate_size=40)).eval()


class _Shapes(TorchDispatchMode):
    """The shapes of every tensor each ATen operator returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _every_unit_but_pattern(model: torch.nn.Module) -> list[str]:
    ad = adapter(model)
    return [f"blocks.{layer}.{unit}" for layer in range(ad.n_layers) for unit in ad.units(layer)
            if unit != "attn.hook_pattern"]


def _shapes_of_traced_forward(model: torch.nn.Module, ids: torch.Tensor, names: list[str],
                              mask: torch.Tensor | None = None) -> tuple[dict, torch.Tensor, list]:
    kept: dict[str, torch.Tensor] = {}
    with _Shapes() as rec:
        logits = trace_stream(model, ids, lambda layer, units: kept.update(
            {f"blocks.{layer}.{u}": t for u, t in units.items()}), names=names, attention_mask=mask)
    return kept, logits, rec.shapes


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_no_pattern_requested_takes_the_fused_path(family):
    model = _model(family)
    ids = torch.randint(0, 97, (B, L), generator=torch.Generator().manual_seed(1))
    names = _every_unit_but_pattern(model)
    kept, logits, shapes = _shapes_of_traced_forward(model, ids, names)
    assert not [s for s in shapes if s[-2:] == (L, L)], "an [L, L] tensor was made without hook_pattern requested"
    # the same recorder sees the pattern when it is requested: the check above can fail
    _, _, with_pattern = _shapes_of_traced_forward(model, ids, [*names, "blocks.1.attn.hook_pattern"])
    assert (B, H, L, L) in with_pattern
    # ... and the outputs are the model's own: logits, and o_proj's input (captured by a hook) as attn.hook_z
    modules = {n: m for n, m in projection_inputs(model).items() if n.endswith("attn.hook_z")}
    ref, seen = _captured_inputs(model, modules, ids, None)
    assert len(seen) == 2
    assert rel(logits, ref) < 1e-5
    for name, captured in seen.items():
        assert rel(kept[name].reshape(captured.shape), captured) < 1e-5, name
    # and equal to the explicit-pattern path the tracer takes when the pattern is asked for
    explicit = trace(model, ids, names=[*names, "*attn.hook_pattern"])
    assert rel(logits, explicit.logits) < 1e-5
    assert max(rel(kept[n], explicit[n]) for n in kept if n.endswith("attn.hook_z")) < 1e-5


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_padding_mask_never_makes_a_per_head_pattern(family):
    """With padding the mask is [b, 1, L, L] (bool, and SDPA's additive form of it), never [b, H, L, L]."""
    model = _model(family)
    ids = torch.randint(0, 97, (B, L), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    _, logits, shapes = _shapes_of_traced_forward(model, ids, _every_unit_but_pattern(model), mask)
    assert (B, H, L, L) not in shapes and (B * H, L, L) not in shapes
    ref, _ = _captured_inputs(model, {}, ids, mask)
    assert rel(logits[mask.bool()], ref[mask.bool()]) < 1e-4
