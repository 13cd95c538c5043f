"""mambascope.generate: decoding through the traced forward with a recurrent cache, checked against
Hugging Face's own ``generate`` and against HF forwards of the whole sequence with hand-written hooks."""

import importlib

import pytest
import torch

from mambascope import generate, load_model
from mambascope.arch import adapter
from mambascope.arch.base import UnsupportedFeature
from mambascope.models import BUNDLED as BUNDLED_MODELS
from mambascope.trace.generate import Steer, neuron_direction, parse_positions

BUNDLED = list(BUNDLED_MODELS)  # every bundled model, task models included
PROMPTS = ["The quick brown fox", "Once upon a time there"]
NEW = 10
# the module, not the function ``mambascope.trace`` that shadows the package's attribute
gen = importlib.import_module("mambascope.trace.generate")


@pytest.fixture(scope="module")
def models():
    return {}


def _load(models, name):
    if name not in models:
        models[name] = load_model(name, device="cpu")
    return models[name]


def _prompt(tokenizer, text=PROMPTS[0]):
    return torch.tensor([tokenizer.encode(text)])


def _ids(model, tokenizer):
    """Text for the language models; for the task models (small task vocabularies) ids spread over it."""
    ids = _prompt(tokenizer)
    vocab = model.config.vocab_size
    return ids if len(set(ids[0].tolist())) > 1 else (torch.arange(1, 9) * 7 % vocab)[None]


def _tol(model, logits: torch.Tensor) -> float:
    """Two fp32 evaluations of the same logits in different operation orders (HF's step kernels and fused
    paths, ours): each layer's rounding differs by a few ulps of the activations' scale; allow 64 ulps of the
    logits' scale per layer.  A wrong cache (a lost state, a shifted position) moves logits by O(1)."""
    return 64 * torch.finfo(torch.float32).eps * float(logits.abs().max() + 1) * adapter(model).n_layers


def _hf_greedy(model, ids, new):
    """HF greedy decoding of exactly ``new`` tokens (no stop at an end-of-sequence token)."""
    config = model.generation_config
    config.eos_token_id, config.do_sample, config.max_new_tokens = None, False, new
    return model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)


@pytest.mark.parametrize("name", BUNDLED)
def test_greedy_equals_hf_generate(models, name):
    model, tokenizer = _load(models, name)
    ids = _ids(model, tokenizer)
    ours, logits = generate(model, ids, NEW, return_logits=True)
    assert ours.shape == (1, ids.shape[1] + NEW)
    assert torch.equal(ours, _hf_greedy(model, ids, NEW))
    # each step's logits are the model's own (uncached) forward over the sequence so far
    with torch.no_grad():
        full = model(ours[:, :-1]).logits[:, ids.shape[1] - 1:]
    assert (full - logits).abs().max() < _tol(model, full)


@pytest.mark.parametrize("name", ["tiny-mamba", "tiny-gpt", "tiny-hybrid"])
def test_a_step_runs_the_tracer_on_one_token(models, name, monkeypatch):
    model, tokenizer = _load(models, name)
    ids = _prompt(tokenizer)
    seen = []
    real = gen.trace_stream

    def spy(model, input_ids, *args, **kwargs):
        seen.append((tuple(input_ids.shape), kwargs["cache"].offset))
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(gen, "trace_stream", spy)
    generate(model, ids, 5)
    L = ids.shape[1]
    assert seen == [((1, L), 0)] + [((1, 1), L + i) for i in range(4)]


def _hooked_logits(model, tokens, module, hook, pre: bool):
    handle = module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(tokens).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ["tiny-mamba", "tiny-mamba2", "tiny-gpt", "tiny-hybrid"])
@pytest.mark.parametrize("positions", [None, ((7, None),), ((2, 3), (9, 11))])
def test_neuron_steering_equals_an_hf_pre_hook(models, name, positions):
    """Add s·e_n to the layer's neuron unit (the input of its out_proj / down projection) at the given
    absolute positions; an HF forward of the whole sequence with a pre-hook on that projection doing the
    same gives each step's logits."""
    model, tokenizer = _load(models, name)
    ad = adapter(model)
    layer = ad.n_layers - 1
    unit = ad.neuron_unit(layer)
    width = ad.neuron_write_weights(layer).shape[1]
    n, scale = width // 3, 4.0
    ids = _prompt(tokenizer)
    steer = Steer(neuron_direction(width, n), scale, positions)
    tokens, logits = generate(model, ids, NEW, edits={f"blocks.{layer}.{unit}": steer}, return_logits=True)

    def add(module, args):
        x = args[0].clone()
        for lo, hi in positions or ((0, None),):
            x[:, lo:hi, n] += scale
        return (x, *args[1:])

    full = _hooked_logits(model, tokens[:, :-1], ad.out_projs(layer)[unit], add, pre=True)
    full = full[:, ids.shape[1] - 1:]
    assert (full - logits).abs().max() < _tol(model, full)
    # and the edit mattered: the unsteered run's logits differ by far more than the tolerance
    _, plain = generate(model, ids, NEW, return_logits=True)
    assert (plain - logits).abs().max() > 100 * _tol(model, full)


@pytest.mark.parametrize("name", ["tiny-mamba2", "tiny-gpt"])
def test_resid_post_edit_equals_an_hf_block_hook(models, name):
    """A plain (position-blind) edit at hook_resid_post is applied at the prefill and at every step."""
    model, tokenizer = _load(models, name)
    ad = adapter(model)
    d = model.config.hidden_size
    vector = torch.linspace(-1.0, 1.0, d)
    ids = _prompt(tokenizer, PROMPTS[1])
    tokens, logits = generate(model, ids, NEW, edits={"blocks.0.hook_resid_post": lambda t: t + vector},
                              return_logits=True)

    def add(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + vector, *output[1:])
        return output + vector

    full = _hooked_logits(model, tokens[:, :-1], ad.blocks()[0], add, pre=False)[:, ids.shape[1] - 1:]
    assert (full - logits).abs().max() < _tol(model, full)


def test_set_mode_clamps_the_neuron(models):
    model, tokenizer = _load(models, "tiny-mamba")
    ad = adapter(model)
    width = ad.neuron_write_weights(0).shape[1]
    n, value = 5, -2.5
    ids = _prompt(tokenizer)
    tokens, logits = generate(model, ids, 6, edits={"blocks.0.mixer.hook_post": Steer(
        neuron_direction(width, n), value, mode="set")}, return_logits=True)

    def clamp(module, args):
        x = args[0].clone()
        x[..., n] = value
        return (x, *args[1:])

    full = _hooked_logits(model, tokens[:, :-1], ad.out_projs(0)["mixer.hook_post"], clamp, pre=True)
    full = full[:, ids.shape[1] - 1:]
    assert (full - logits).abs().max() < _tol(model, full)


@pytest.mark.parametrize("name", ["tiny-mamba", "tiny-gpt"])
def test_sampling_is_seeded_and_stays_in_top_k(models, name):
    model, tokenizer = _load(models, name)
    ids = _prompt(tokenizer).repeat(3, 1)
    a, logits = generate(model, ids, 12, do_sample=True, top_k=4, temperature=1.5, seed=7, return_logits=True)
    b = generate(model, ids, 12, do_sample=True, top_k=4, temperature=1.5, seed=7)
    assert torch.equal(a, b)
    new = a[:, ids.shape[1]:]
    top = logits.topk(4, dim=-1).indices
    assert bool((top == new[..., None]).any(-1).all())
    # sampling, not greedy: at temperature 1.5 over 4 tokens, 36 draws all equal to the argmax would be
    # a broken sampler (each draw has probability < 1 of the argmax whenever the top 4 logits are not all -inf)
    assert not torch.equal(new, logits.argmax(-1))


def test_left_padding_on_an_ssm_model_matches_the_unpadded_prompt(models):
    model, tokenizer = _load(models, "tiny-mamba")
    short, long = _prompt(tokenizer, "A fox"), _prompt(tokenizer, PROMPTS[1])
    pad = long.shape[1] - short.shape[1]
    ids = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    both = generate(model, ids, 6, attention_mask=mask)
    assert torch.equal(both[0, pad:], generate(model, short, 6)[0])
    assert torch.equal(both[1], generate(model, long, 6)[0])


def test_refusals(models):
    model, tokenizer = _load(models, "tiny-gpt")
    ids = _prompt(tokenizer)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, 0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, ids, 3, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="maximum length"):
        generate(model, ids, model.config.n_positions)
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    with pytest.raises(UnsupportedFeature, match="padded attention_mask"):
        generate(model, ids, 3, attention_mask=mask)
    with pytest.raises(KeyError):
        generate(model, ids, 3, edits={"blocks.0.mixer.hook_post": lambda t: t})


def test_unsupported_family_is_named():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    with pytest.raises(UnsupportedFeature, match="llama"):
        generate(model, torch.tensor([[1, 2, 3]]), 2)


def test_parse_positions():
    assert parse_positions("3, 5:8,10:") == ((3, 4), (5, 8), (10, None))
    for bad in ("", "a", "5:3", "-1", "2:2"):
        with pytest.raises(ValueError, match="--positions"):
            parse_positions(bad)


def test_pattern_at_a_step_is_the_new_querys_row(models):
    """Editing attn.hook_pattern takes the explicit-softmax path; at a step it is [b, H, 1, t + 1] and an
    identity edit leaves every step's logits as the fused attention gives them."""
    model, tokenizer = _load(models, "tiny-gpt")
    ids = _prompt(tokenizer)
    shapes = []

    def record(pattern):
        shapes.append(tuple(pattern.shape))
        return pattern

    _, logits = generate(model, ids, 4, edits={"blocks.1.attn.hook_pattern": record}, return_logits=True)
    _, plain = generate(model, ids, 4, return_logits=True)
    L, H = ids.shape[1], model.config.n_head
    assert shapes == [(1, H, L, L)] + [(1, H, 1, L + i + 1) for i in range(3)]
    assert (plain - logits).abs().max() < _tol(model, plain)
