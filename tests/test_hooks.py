"""TransformerLens-style ``run_with_cache`` / ``run_with_hooks`` (issue 12, item 5) against forward hooks
on the Hugging Face modules, where a module boundary exists: the mixer's output and each block's output."""

import pytest
import torch

from family_check import rel, stress
from mambascope import HookPoint, run_with_cache, run_with_hooks, trace
from mambascope.hooks import hook_names
from test_trace import MAMBA1_CONFIGS, MAMBA2_CONFIGS, _random_model

KINDS = {"mamba": MAMBA1_CONFIGS[0], "mamba2": MAMBA2_CONFIGS[0]}


def _model(kind):
    return stress(_random_model(kind, KINDS[kind]))


def _hf_forward(model, ids, hooks):
    """The model's own logits with ``hooks`` = [(module, forward hook)] registered."""
    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for h in handles:
            h.remove()


def _block_out(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("kind", KINDS)
def test_cache_equals_the_modules_outputs(kind):
    model = _model(kind)
    ids = torch.randint(0, 97, (2, 24))
    seen = {}
    layers = model.backbone.layers
    hooks = [(block.mixer, lambda m, a, out, i=i: seen.__setitem__(f"blocks.{i}.hook_mixer_out", out))
             for i, block in enumerate(layers)]
    hooks += [(block, lambda m, a, out, i=i: seen.__setitem__(f"blocks.{i}.hook_resid_post", _block_out(out)))
              for i, block in enumerate(layers)]
    ref = _hf_forward(model, ids, hooks)
    logits, cache = run_with_cache(model, ids, names_filter=["*hook_mixer_out", "*hook_resid_post"])
    assert sorted(cache) == sorted(seen)
    assert rel(logits, ref) < 1e-4
    for name, tensor in seen.items():
        assert rel(cache[name], tensor) < 1e-5, name
    # the three other kinds of filter
    assert list(run_with_cache(model, ids, "blocks.1.mixer.hook_post")[1]) == ["blocks.1.mixer.hook_post"]
    by_fn = run_with_cache(model, ids, lambda name: name.endswith("hook_dt"))[1]
    assert sorted(by_fn) == ["blocks.0.mixer.hook_dt", "blocks.1.mixer.hook_dt"]
    every = run_with_cache(model, ids)[1]
    assert list(every) == hook_names(model) and every.logits is not None


@pytest.mark.parametrize("kind", KINDS)
def test_a_replacing_hook_equals_a_forward_hook_on_the_module(kind):
    """Scaling layer 0's mixer output and adding to layer 1's resid_post through run_with_hooks gives the
    logits of the model's own forward with the same change made by forward hooks on those modules."""
    model = _model(kind)
    ids = torch.randint(0, 97, (2, 24))
    shift = torch.randn(model.config.hidden_size)
    layers = model.backbone.layers
    ref = _hf_forward(model, ids, [(layers[0].mixer, lambda m, a, out: 0.3 * out),
                                   (layers[1], lambda m, a, out: _block_out(out) + shift)])
    seen = []

    def scale(t, hook):
        seen.append((hook.name, hook.layer()))
        return 0.3 * t

    logits = run_with_hooks(model, ids, fwd_hooks=[("blocks.0.hook_mixer_out", scale),
                                                   (lambda n: n == "blocks.1.hook_resid_post", lambda t, h: t + shift)])
    assert rel(logits, ref) < 1e-4
    assert rel(logits, _hf_forward(model, ids, [])) > 1e-2
    assert seen == [("blocks.0.hook_mixer_out", 0)]


def test_hooks_returning_none_change_nothing_and_hooks_compose_in_order():
    model = _model("mamba")
    ids = torch.randint(0, 97, (2, 16))
    plain = trace(model, ids, names=[]).logits
    names = []
    logits = run_with_hooks(model, ids, fwd_hooks=[("*", lambda t, hook: names.append(hook.name))])
    assert torch.equal(logits, plain)
    assert names == hook_names(model)  # every unit, in forward order
    twice = run_with_hooks(model, ids, fwd_hooks=[("blocks.0.mixer.hook_post", lambda t, h: t + 1.0),
                                                  ("blocks.0.mixer.hook_post", lambda t, h: 2.0 * t)])
    once = run_with_hooks(model, ids, fwd_hooks=[("blocks.0.mixer.hook_post", lambda t, h: 2.0 * t + 2.0)])
    assert torch.equal(twice, once)


def test_state_hooks_see_their_positions():
    model = _model("mamba2")
    ids = torch.randint(0, 97, (2, 20))
    calls = []

    def halve(s, hook):
        calls.append((hook.name, hook.positions, s.shape[1]))
        return 0.5 * s

    logits = run_with_hooks(model, ids, [("blocks.1.mixer.hook_ssm_state", halve)], state_positions=[9, -1, 4])
    edited = trace(model, ids, names=[], state_positions=[4, 9, 19],
                   edits={"blocks.1.mixer.hook_ssm_state": lambda s: 0.5 * s}).logits
    assert torch.equal(logits, edited)
    assert calls == [("blocks.1.mixer.hook_ssm_state", (4, 9, 19), 3)] * 3  # once per position
    _, cache = run_with_cache(model, ids, "*ssm_state", state_positions=[4])
    assert sorted(cache) == ["blocks.0.mixer.hook_ssm_state", "blocks.1.mixer.hook_ssm_state"]
    with pytest.raises(ValueError, match="state_positions"):
        run_with_hooks(model, ids, [("mixer.hook_ssm_state", halve)])
    with pytest.raises(ValueError, match="state_positions"):
        run_with_cache(model, ids, "mixer.hook_ssm_state")
    # a pattern that also matches other units leaves the state out when no positions are given
    assert not [n for n in run_with_cache(model, ids, "blocks.0.*")[1] if n.endswith("ssm_state")]
    with pytest.raises(KeyError, match="no hook named"):
        run_with_hooks(model, ids, [("blocks.0.mixer.hook_pst", halve)])


def test_hook_point_layer():
    assert HookPoint("blocks.12.attn.hook_z").layer() == 12
