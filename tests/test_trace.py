"""The tracer against the model's own forward (docs/design.md §3): logits, and post at out_proj's input."""

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
)

from mambascope.ssm import selective_scan, ssd_scan
from mambascope.trace import UNITS, mixer_params, trace, trace_stream

MAMBA1_CONFIGS = [
    dict(hidden_size=32, state_size=8, expand=2, conv_kernel=4, time_step_rank=5),
    dict(hidden_size=24, state_size=4, expand=3, conv_kernel=2, time_step_rank=2, use_conv_bias=False),
    dict(hidden_size=16, state_size=16, expand=1, conv_kernel=3, time_step_rank=16, use_bias=True),
]
MAMBA2_CONFIGS = [
    dict(hidden_size=32, state_size=8, expand=2, head_dim=8, num_heads=8, n_groups=2, chunk_size=16, conv_kernel=3),
    dict(hidden_size=24, state_size=16, expand=2, head_dim=4, num_heads=12, n_groups=1, chunk_size=8, conv_kernel=4),
    dict(hidden_size=16, state_size=4, expand=4, head_dim=16, num_heads=4, n_groups=4, chunk_size=32, conv_kernel=2),
]


def _random_model(kind: str, cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "mamba":
        model = MambaForCausalLM(MambaConfig(vocab_size=97, num_hidden_layers=2, **cfg))
    elif kind == "mamba2":
        model = Mamba2ForCausalLM(Mamba2Config(vocab_size=97, num_hidden_layers=2, **cfg))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_layer=2, n_positions=64, bos_token_id=0,
                                           eos_token_id=0, **cfg))
    # Trained models have larger Δ·A and D than a fresh init: stress the scan with them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "D", "dt_bias", "dt_proj.bias")):
                p.add_(torch.randn_like(p))
    return model.eval()


def _padded_batch(vocab: int, L: int = 41, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, L), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding
    mask[1, -9:] = 0  # right padding
    return ids, mask


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _hf_logits_and_posts(model, ids, mask):
    posts = {}
    hooks = []
    if hasattr(model, "backbone"):
        for i, block in enumerate(model.backbone.layers):
            hooks.append(block.mixer.out_proj.register_forward_hook(
                lambda mod, args, out, i=i: posts.__setitem__(i, args[0].detach())))
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    for h in hooks:
        h.remove()
    return logits, posts


def _assert_traced_equals_model(model, ids, mask):
    """Logits within 1e-4 and post equal to out_proj's input within 1e-5 (relative), on the real tokens."""
    ref, posts = _hf_logits_and_posts(model, ids, mask)
    tr = trace(model, ids, attention_mask=mask)
    valid = mask.bool()
    assert _rel(tr.logits[valid], ref[valid]) < 1e-4
    for layer, post in posts.items():
        assert _rel(tr[f"blocks.{layer}.mixer.hook_post"][valid], post[valid]) < 1e-5
    return tr


@pytest.mark.parametrize("kind,cfg", [("mamba", c) for c in MAMBA1_CONFIGS] + [("mamba2", c) for c in MAMBA2_CONFIGS]
                         + [("gpt2", dict(n_embd=32, n_head=4)), ("gpt2", dict(n_embd=24, n_head=2, n_inner=40))])
def test_traced_forward_equals_model(kind, cfg):
    model = _random_model(kind, cfg)
    ids, mask = _padded_batch(97)
    tr = _assert_traced_equals_model(model, ids, mask)
    # every unit of every layer, with the documented rank
    for layer in range(2):
        for unit, shape in UNITS[kind].items():
            assert tr[f"blocks.{layer}.{unit}"].dim() == len(shape.split(","))


def test_unpadded_batch_matches_too():
    model = _random_model("mamba", MAMBA1_CONFIGS[0])
    ids = torch.randint(0, 97, (2, 70))
    with torch.no_grad():
        ref = model(ids).logits
    assert _rel(trace(model, ids, names=[]).logits, ref) < 1e-4


@pytest.mark.parametrize("kind,cfg", [("mamba", MAMBA1_CONFIGS[0]), ("mamba2", MAMBA2_CONFIGS[0]),
                                      ("gpt2", dict(n_embd=32, n_head=4))])
def test_bfloat16_within_stated_tolerance(kind, cfg):
    """bf16 tolerance: 3e-2 of the largest |logit| (bf16 keeps 8 bits of mantissa; our scan runs in fp32)."""
    model = _random_model(kind, cfg).to(torch.bfloat16)
    ids, mask = _padded_batch(97)
    ref, _ = _hf_logits_and_posts(model, ids, mask)
    tr = trace(model, ids, attention_mask=mask, names=[])
    valid = mask.bool()
    assert _rel(tr.logits[valid], ref[valid]) < 3e-2


def test_mamba_dt_and_gate_are_the_models_own():
    """Δ recomputed by the tracer equals softplus(dt_proj(x_proj(u))) from the model's modules."""
    model = _random_model("mamba", MAMBA1_CONFIGS[0])
    ids = torch.randint(0, 97, (2, 20))
    tr = trace(model, ids)
    mixer = model.backbone.layers[1].mixer
    u = tr["blocks.1.mixer.hook_ssm_input"]
    dt_low = mixer.x_proj(u)[..., : mixer.time_step_rank]
    dt = torch.nn.functional.softplus(mixer.dt_proj(dt_low))
    assert torch.allclose(tr["blocks.1.mixer.hook_dt"], dt, atol=1e-6)
    assert torch.allclose(tr["blocks.1.mixer.hook_gate"], torch.nn.functional.silu(tr["blocks.1.mixer.hook_gate_pre"]))
    assert mixer_params(model, 1).A.shape == (mixer.intermediate_size, mixer.ssm_state_size)


def test_streaming_hands_over_one_layer_at_a_time():
    model = _random_model("mamba2", MAMBA2_CONFIGS[0])
    ids = torch.randint(0, 97, (2, 20))
    seen = []
    logits = trace_stream(model, ids, lambda layer, units: seen.append((layer, sorted(units))),
                          names="*hook_post")
    assert seen == [(0, ["mixer.hook_post"]), (1, ["mixer.hook_post"])]
    assert torch.allclose(logits, trace(model, ids, names=[]).logits)


def test_name_patterns_and_nearest_suggestion():
    model = _random_model("mamba", MAMBA1_CONFIGS[0])
    ids = torch.randint(0, 97, (1, 8))
    tr = trace(model, ids, names=["blocks.1.mixer.hook_dt", "mixer.hook_post"])
    assert sorted(tr) == ["blocks.0.mixer.hook_post", "blocks.1.mixer.hook_dt", "blocks.1.mixer.hook_post"]
    with pytest.raises(KeyError, match=r"did you mean 'mixer\.hook_post'"):
        trace(model, ids, names="mixer.hook_psot")
    with pytest.raises(KeyError, match="no hook named"):
        trace(model, ids, names="blocks.7.mixer.hook_post")


def test_edits_change_the_forward_downstream():
    model = _random_model("mamba", MAMBA1_CONFIGS[0])
    ids = torch.randint(0, 97, (2, 16))
    base = trace(model, ids, names="blocks.1.*")
    same = trace(model, ids, names=[], edits={"blocks.1.mixer.hook_post": lambda t: t})
    assert torch.equal(same.logits, base.logits)
    ablated = trace(model, ids, names="blocks.1.*", edits={"blocks.1.mixer.hook_post": torch.zeros_like})
    assert ablated["blocks.1.mixer.hook_post"].abs().max() == 0
    assert ablated["blocks.1.hook_mixer_out"].abs().max() == 0  # out_proj has no bias in this config
    assert not torch.allclose(ablated.logits, base.logits)


@pytest.mark.parametrize("problem,match", [
    (lambda ids: ids[:, :0], "empty"),
    (lambda ids: ids + 1000, "outside the vocabulary"),
    (lambda ids: ids.float(), "integer tensor"),
])
def test_bad_inputs_raise_clear_errors(problem, match):
    model = _random_model("mamba", MAMBA1_CONFIGS[0])
    with pytest.raises(ValueError, match=match):
        trace(model, problem(torch.randint(0, 97, (1, 8))))


def test_too_long_sequence_and_bad_mask():
    model = _random_model("gpt2", dict(n_embd=32, n_head=4))
    with pytest.raises(ValueError, match="exceeds the maximum length 64"):
        trace(model, torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="has no tokens"):
        trace(model, torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.zeros(1, 5, dtype=torch.long))


@pytest.mark.parametrize("kind,cfg", [("mamba", MAMBA1_CONFIGS[0]), ("mamba2", MAMBA2_CONFIGS[0]),
                                      ("gpt2", dict(n_embd=32, n_head=4))])
def test_logits_at_chosen_positions(kind, cfg):
    """logits_at: the unembedding at one (or k) positions per row only, equal to those rows of the full
    logits (fp32: the same dot products of length d_model, up to the GEMM's summation order)."""
    model = _random_model(kind, cfg)
    ids, mask = _padded_batch(97)
    q = torch.tensor([40, 20, 13])  # real tokens of each row
    with torch.no_grad():
        full = trace_stream(model, ids, None, attention_mask=mask)
        at = trace_stream(model, ids, None, attention_mask=mask, logits_at=q)
        several = trace_stream(model, ids, None, attention_mask=mask, logits_at=torch.stack([q, q - 5], 1))
    assert at.shape == (3, 97) and _rel(at, full[torch.arange(3), q]) < 1e-6
    assert several.shape == (3, 2, 97) and _rel(several[:, 1], full[torch.arange(3), q - 5]) < 1e-6
    for bad in (torch.tensor([0, 1]), torch.tensor([0, 1, 41]), torch.zeros(3, 1, 1, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"positions in 0\.\.40, \[b\] or \[b, k\]"):
            trace_stream(model, ids, None, logits_at=bad)


def _naive_s6(u, dt, A, B, C):
    b, L, E = u.shape
    h = torch.zeros(b, E, A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, 1)


def test_scans_against_naive_recurrence_fp64():
    g = torch.Generator().manual_seed(0)
    b, L, E, N = 2, 50, 6, 5
    u = torch.randn(b, L, E, generator=g, dtype=torch.float64)
    dt = torch.nn.functional.softplus(3 * torch.randn(b, L, E, generator=g, dtype=torch.float64))
    A = -torch.exp(2 * torch.randn(E, N, generator=g, dtype=torch.float64))
    B, C = (torch.randn(b, L, N, generator=g, dtype=torch.float64) for _ in range(2))
    ref = _naive_s6(u, dt, A, B, C)
    assert torch.allclose(selective_scan(u, dt, A, B, C, parallel=False), ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(selective_scan(u, dt, A, B, C, parallel=True), ref, rtol=1e-10, atol=1e-12)
    # Mamba-2 as Mamba-1 with A shared across a head's state and channels.
    H, P, G = 4, 3, 2
    x = torch.randn(b, L, H, P, generator=g, dtype=torch.float64)
    dth = torch.nn.functional.softplus(torch.randn(b, L, H, generator=g, dtype=torch.float64))
    Ah = -torch.exp(torch.randn(H, generator=g, dtype=torch.float64))
    Bg, Cg = (torch.randn(b, L, G, N, generator=g, dtype=torch.float64) for _ in range(2))
    head_group = torch.arange(H) // (H // G)
    for chunk in (7, 16, 64):
        y = ssd_scan(x, dth, Ah, Bg, Cg, chunk_size=chunk)
        for h in range(H):
            g_idx = int(head_group[h])
            ref_h = _naive_s6(x[:, :, h], dth[:, :, h, None].expand(b, L, P), Ah[h].expand(P, N), Bg[:, :, g_idx],
                              Cg[:, :, g_idx])
            assert torch.allclose(y[:, :, h], ref_h, rtol=1e-10, atol=1e-12)


def test_scan_survives_long_sequences_with_large_decay():
    L, E, N = 8192, 2, 4
    u = torch.randn(1, L, E)
    dt = torch.full((1, L, E), 50.0)
    A = -torch.full((E, N), 20.0)
    B, C = torch.randn(1, L, N), torch.randn(1, L, N)
    for parallel in (False, True):
        y = selective_scan(u, dt, A, B, C, parallel=parallel)
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("kind,cfg,out", [("mamba", MAMBA1_CONFIGS[2], "hook_mixer_out"),
                                          ("mamba2", MAMBA2_CONFIGS[0], "hook_mixer_out"),
                                          ("gpt2", dict(n_embd=32, n_head=4), "hook_mlp_out")])
def test_neuron_write_weights_and_unembedding(kind, cfg, out):
    from mambascope.trace import neuron_write_weights, unembedding

    model = _random_model(kind, cfg)
    ids = torch.randint(0, 97, (2, 9))
    tr = trace(model, ids)
    W = neuron_write_weights(model, 1)
    post = tr["blocks.1." + ("mlp.hook_post" if kind == "gpt2" else "mixer.hook_post")]
    written = tr[f"blocks.1.{out}"] - (post @ W.T)
    # What is left is the output projection's bias (or nothing), but only in exact arithmetic: the model's
    # projection and post @ W.T round differently.  An inner product of n terms, summed in any order, is off by
    # at most gamma_n * sum |x_i y_i|, gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability of Numerical
    # Algorithms, 2002, Thm 3.5); the bias is one more term (|b| ~ |written|), the subtraction adds u |written|.
    u = torch.finfo(post.dtype).eps / 2
    n = post.shape[-1] + 1
    gamma = n * u / (1 - n * u)
    bound = 2 * gamma * (post.abs() @ W.abs().T + written.abs()) + u * written.abs()
    assert ((written - written[:1, :1]).abs() <= bound + bound[:1, :1]).all()
    norm_w, W_U = unembedding(model)
    assert W_U.shape == (97, norm_w.shape[0])
    with pytest.raises(IndexError, match="out of range"):
        neuron_write_weights(model, 2)


@pytest.mark.parametrize("name", ["tiny-mamba", "tiny-mamba2", "tiny-gpt"])
def test_bundled_models_trace_exactly(name):
    from mambascope.models import load_model

    model, tokenizer = load_model(name, device="cpu")
    texts = ["def add(a, b):\n    return a + b", "Return the number of items in a container."]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert not bool(mask.all())  # the batch really is padded
    _assert_traced_equals_model(model, ids, mask)


def test_gradients_flow_through_the_traced_scan():
    """Gradient methods backpropagate through the traced forward (the scan switches to its out-of-place form)."""
    model = _random_model("mamba", MAMBA1_CONFIGS[0])
    ids = torch.randint(0, 97, (1, 12))
    kept = {}

    def keep(t):
        t.retain_grad()
        kept["post"] = t
        return t

    tr = trace(model, ids, names=[], edits={"blocks.0.mixer.hook_post": keep}, grad=True)
    tr.logits[0, -1].logsumexp(-1).backward()
    assert kept["post"].grad is not None and kept["post"].grad.abs().sum() > 0
    # the gradient matches finite differences on one coordinate
    e = int(kept["post"].grad[0, 3].abs().argmax())
    g = float(kept["post"].grad[0, 3, e])

    def bumped(h):
        def edit(t):
            t = t.clone()
            t[0, 3, e] += h
            return t
        return float(trace(model, ids, names=[], edits={"blocks.0.mixer.hook_post": edit}).logits[0, -1]
                     .double().logsumexp(-1))

    assert (bumped(1e-2) - bumped(-1e-2)) / 2e-2 == pytest.approx(g, rel=2e-2, abs=1e-5)
