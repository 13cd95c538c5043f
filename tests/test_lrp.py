"""MambaLRP (attribution/lrp.py, arch/lrp_mode.py): conservation, the bias remainder, LRP = gradient × input
on a model with no nonlinearity left, and no rule is a no-op.  References: the model's own logit and plain
autograd through the unmodified traced forward, never the LRP code."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from family_check import stress
from mambascope import load_model
from mambascope.arch import adapter
from mambascope.arch.lrp_mode import LRPRules, lrp_mode
from mambascope.attribution.lrp import lrp, lrp_relevance
from mambascope.trace import trace, trace_stream

MODELS = ["tiny-mamba", "tiny-mamba2", "tiny-gpt", "tiny-hybrid"]
# fp64 sums over a few thousand products: rounding stays many orders below this
FP64_REL = 1e-10


@pytest.fixture(scope="module", params=MODELS)
def fp64_model(request):
    model, _ = load_model(request.param)
    return request.param, copy.deepcopy(model).double().eval()


def _ids(model, L=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (1, L), generator=g)


def _without_biases(model):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    return m


def _grad_x_input(model, ids, pos, tok, edits=None):
    """Plain gradient × input at blocks.0.hook_resid_pre through the unmodified traced forward."""
    box = {}

    def leaf(h):
        box["x"] = h.detach().requires_grad_(True)
        return box["x"]

    logits = trace_stream(model, ids, None, edits={"blocks.0.hook_resid_pre": leaf, **(edits or {})}, grad=True)
    (g,) = torch.autograd.grad(logits[0, pos, tok], box["x"])
    return (g * box["x"]).sum(-1)[0].detach(), logits[0, pos, tok].detach()


def test_conservation_without_biases(fp64_model):
    name, model = fp64_model
    model = _without_biases(model)
    ids = _ids(model)
    pos, tok = 17, 5
    res = lrp(model, ids, pos, tok)
    with torch.no_grad():
        own = float(model(ids).logits[0, pos, tok])  # the model's own forward, not the traced one
    logit, relevance = float(res.logit[0]), res.relevance[0]
    # HF computes Mamba-1's residual in fp32 even in an fp64 model: agreement to fp32 rounding there
    assert abs(logit - own) <= 1e-6 * abs(own)
    assert abs(float(relevance.sum()) - logit) <= FP64_REL * abs(logit), name
    assert res.relevance.shape == (1, ids.shape[1])
    assert bool((relevance[pos + 1:] == 0).all())  # causal: later tokens get nothing


def _bias_params(model):
    # additive biases; Δ's bias sits under softplus and is held constant with Δ (ssm rule), so it takes none
    return [(n, p) for n, p in model.named_parameters() if n.endswith("bias") and "dt" not in n]


def test_bias_remainder_is_the_relevance_of_the_biases(fp64_model):
    """With biases, the tokens' relevance falls short of the logit by the remainder, and that remainder is
    exactly the relevance the LRP-mode backward gives the bias terms (bias × its gradient): the modified
    forward is degree-1 homogeneous in the embeddings and the biases together."""
    name, model = fp64_model
    ids = _ids(model, seed=1)
    pos, tok = 15, 9
    res = lrp(model, ids, pos, tok)
    logit, remainder = float(res.logit[0]), float(res.remainder[0])
    biases = _bias_params(model)
    assert biases, name
    box = {}

    def leaf(h):
        box["x"] = h.detach().requires_grad_(True)
        return box["x"]

    with lrp_mode(LRPRules()):
        logits = trace_stream(model, ids, None, edits={"blocks.0.hook_resid_pre": leaf}, grad=True)
    grads = torch.autograd.grad(logits[0, pos, tok], [p for _, p in biases], allow_unused=True)
    pairs = zip(grads, biases, strict=True)
    bias_relevance = sum(float((g * p.detach()).sum()) for g, (_, p) in pairs if g is not None)
    scale = abs(logit) + abs(remainder)
    assert abs(remainder) > 1e-6 * scale, name  # the bundled models' biases do carry relevance
    assert abs(remainder - bias_relevance) <= FP64_REL * scale, name
    print(f"{name}: logit {logit:.6f}, tokens {float(res.relevance.sum()):.6f}, biases {bias_relevance:.6f}")


class FrozenNorm(nn.Module):
    """A normalisation with its normaliser frozen at a reference input: x ↦ (x − mean x)·scale (centred)
    or x·scale, scale [1, L, D] fixed.  Linear in x.  ``weight`` is only read for its dtype by the adapters."""

    def __init__(self, scale, centre):
        super().__init__()
        self.scale, self.centre = scale, centre
        self.weight = nn.Parameter(torch.ones(scale.shape[-1], dtype=scale.dtype), requires_grad=False)

    def forward(self, x):
        return (x - x.mean(-1, keepdim=True) if self.centre else x) * self.scale


def _freeze_norm(norm, x):
    """FrozenNorm equal to ``norm`` at x [1, L, D] (bias-free norms)."""
    if isinstance(norm, nn.LayerNorm):
        std = ((x - x.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
        return FrozenNorm((norm.weight / std).detach(), centre=True)
    with torch.no_grad():
        return FrozenNorm(norm(x) / x, centre=False)


def _linearised(model, ids):
    """The model with no nonlinearity left: every data-dependent factor (norm scales, σ(conv), Δ, B, C,
    the gate, Mamba-2's gated-norm scale, the softmax pattern, the MLP activation ratio or gate) frozen at
    the reference input ``ids``, through module replacement and the tracer's edits, so the logit is a linear
    function of the embeddings (checked in the test).  Where a frozen factor still enters a product inside
    the block code (the gate, the pattern, a gated MLP's gate), the LRP-mode product sees one constant
    factor, which is a weight: relevance must pass to the other factor whole.  Returns (model, edits)."""
    ref = trace(model, ids)
    ad = adapter(model)
    m = copy.deepcopy(model)
    am = adapter(m)
    edits, stash = {}, {}
    norms = {"mamba": ("norm",), "mamba2": ("norm",), "gpt2": ("ln_1", "ln_2"),
             "bamba": ("input_layernorm", "pre_ff_layernorm")}[ad.model_type]
    for layer in range(ad.n_layers):
        p = f"blocks.{layer}."
        units = ref.layer(layer)
        inputs = [units["hook_resid_pre"], units.get("hook_resid_mid")]
        for attr, x in zip(norms, inputs, strict=False):
            setattr(am.blocks()[layer], attr, _freeze_norm(getattr(ad.blocks()[layer], attr), x))

        def keep(key):
            def f(t):
                stash[key] = t
                return t
            return f

        def const(value):
            return lambda t: value

        if "mixer.hook_conv" in units:
            sig = torch.sigmoid(units["mixer.hook_conv"])
            edits[p + "mixer.hook_conv"] = keep(p + "conv")
            edits[p + "mixer.hook_ssm_input"] = lambda t, p=p, sig=sig: stash[p + "conv"] * sig
            for u in ("mixer.hook_dt", "mixer.hook_B", "mixer.hook_C"):
                edits[p + u] = const(units[u])
            # the gate a constant: y·SiLU(z) runs through the product rule with one constant factor
            edits[p + "mixer.hook_gate"] = const(units["mixer.hook_gate"])
            if ad.layer_kind(layer) == "mamba2":  # and the gated RMSNorm's scale, frozen at its output
                scale = units["mixer.hook_post"] / units["mixer.hook_y"]
                edits[p + "mixer.hook_y"] = keep(p + "y")
                edits[p + "mixer.hook_post"] = lambda t, p=p, scale=scale: stash[p + "y"] * scale
        if "attn.hook_pattern" in units:
            edits[p + "attn.hook_pattern"] = const(units["attn.hook_pattern"])
        if "mlp.hook_pre_linear" in units:  # gated MLP: the gate's pre-activation constant, linear in up(x)
            edits[p + "mlp.hook_pre"] = const(units["mlp.hook_pre"])
        elif "mlp.hook_pre" in units:  # plain MLP: act(x) = x · (act(x)/x) with the ratio frozen
            ratio = units["mlp.hook_post"] / units["mlp.hook_pre"]
            edits[p + "mlp.hook_pre"] = keep(p + "pre")
            edits[p + "mlp.hook_post"] = lambda t, p=p, ratio=ratio: stash[p + "pre"] * ratio
    parent, final = {"mamba": ("backbone", "norm_f"), "mamba2": ("backbone", "norm_f"),
                     "gpt2": ("transformer", "ln_f"), "bamba": ("model", "final_layernorm")}[ad.model_type]
    parent = getattr(m, parent)
    last = ref[f"blocks.{ad.n_layers - 1}.hook_resid_post"]
    setattr(parent, final, _freeze_norm(ad.final_norm(), last))
    return m, edits


def test_lrp_is_gradient_x_input_without_nonlinearities(fp64_model):
    name, model = fp64_model
    model = _without_biases(model)
    ids = _ids(model, seed=2)
    pos, tok = 18, 3
    lin, edits = _linearised(model, ids)
    # the construction: equal to the model at ids, and linear in the embeddings (f(c·x) = c·f(x))
    gxi, value = _grad_x_input(lin, ids, pos, tok, edits)
    own = trace(model, ids).logits[0, pos, tok]
    assert abs(float(value - own)) <= FP64_REL * abs(float(own))
    for c in (2.0, -0.5):
        scaled = trace_stream(lin, ids, None, edits={"blocks.0.hook_resid_pre": lambda h, c=c: c * h, **edits})
        assert abs(float(scaled[0, pos, tok] - c * value)) <= FP64_REL * abs(float(value)), name
    box = {}

    def leaf(h):
        box["x"] = h.detach().requires_grad_(True)
        return box["x"]

    scale = float(gxi.abs().max())
    for rules in (LRPRules(), LRPRules(attention="attnlrp")):
        with lrp_mode(rules):
            logits = trace_stream(lin, ids, None, edits={"blocks.0.hook_resid_pre": leaf, **edits}, grad=True)
        (g,) = torch.autograd.grad(logits[0, pos, tok], box["x"])
        relevance = (g * box["x"]).sum(-1)[0].detach()
        assert float((relevance - gxi).abs().max()) <= FP64_REL * scale, (name, rules)
    # and on the real (nonlinear) model the two differ: the rules do something there
    real_gxi, _ = _grad_x_input(model, ids, pos, tok)
    assert float((lrp_relevance(model, ids, pos, tok) - real_gxi.double()).abs().max()) > 1e-3 * scale


RULES = {"tiny-mamba": ("act", "ssm", "gate", "norm"), "tiny-mamba2": ("act", "ssm", "gate", "norm"),
         "tiny-gpt": ("act", "norm", "attention"), "tiny-hybrid": ("act", "ssm", "gate", "norm", "attention")}


@pytest.mark.parametrize("name", MODELS)
def test_each_rule_changes_the_result(name):
    model, _ = load_model(name)
    ids = _ids(model, L=24, seed=3)
    pos, tok = 22, 11
    full = lrp(model, ids, pos, tok).relevance
    for rule in RULES[name]:
        off = dataclasses.replace(LRPRules(), **{rule: "gradient" if rule == "attention" else False})
        other = lrp(model, ids, pos, tok, rules=off).relevance
        # fp32 model: rounding differences are ~1e-6 of the scale; a switched-off rule moves far more
        assert float((other - full).abs().max()) > 1e-3 * float(full.abs().max()), (name, rule)


def test_attnlrp_differs_from_cp_and_absorbs_relevance_in_the_softmax():
    model, _ = load_model("tiny-gpt")
    model = _without_biases(copy.deepcopy(model).double())
    ids = _ids(model, seed=4)
    cp = lrp(model, ids, 15, 2)
    attn = lrp(model, ids, 15, 2, rules=LRPRules(attention="attnlrp"))
    assert abs(float(cp.remainder[0])) <= FP64_REL * abs(float(cp.logit[0]))
    assert abs(float(attn.remainder[0])) > 1e-3 * abs(float(cp.logit[0]))  # the softmax rule absorbs
    assert float((cp.relevance - attn.relevance).abs().max()) > 1e-3 * float(cp.relevance.abs().max())
    assert abs(float(attn.logit[0] - cp.logit[0])) <= FP64_REL * abs(float(cp.logit[0]))  # same forward values


def test_a_batch_is_its_rows():
    model, _ = load_model("tiny-mamba2")
    ids = torch.cat([_ids(model, seed=6), _ids(model, seed=7)])
    both = lrp(model, ids, [12, -1], [4, 9])
    for r, (pos, tok) in enumerate([(12, 4), (19, 9)]):
        one = lrp(model, ids[r], pos, tok)
        assert torch.allclose(both.relevance[r], one.relevance[0], rtol=1e-5, atol=1e-7 * float(one.logit.abs()))
        assert lrp_relevance(model, ids[r], pos, tok).shape == (ids.shape[1],)


@pytest.mark.parametrize("name", ["tiny-mamba", "tiny-mamba2"])
def test_left_padding(name):
    """A left-padded row explains its real tokens as the unpadded sequence does (Mamba has no positions;
    padded positions are masked out of the mixer), and its padding gets nothing."""
    model, _ = load_model(name)
    model = copy.deepcopy(model).double()
    ids = _ids(model, L=16, seed=8)
    padded = torch.cat([torch.zeros(1, 5, dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones_like(ids)], dim=1)
    one = lrp(model, ids, 15, 7).relevance[0]
    both = lrp(model, padded, 20, 7, attention_mask=mask).relevance[0]
    assert bool((both[:5] == 0).all())
    assert float((both[5:] - one).abs().max()) <= FP64_REL * float(one.abs().max())


def test_lrp_mode_leaves_the_forward_unchanged():
    model, _ = load_model("tiny-mamba2")
    ids = _ids(model, seed=5)
    plain = trace(model, ids).logits
    with lrp_mode(LRPRules()):
        moded = trace(model, ids).logits
    assert torch.equal(plain, moded) or float((plain - moded).abs().max()) <= 1e-5 * float(plain.abs().max())


def test_bad_inputs():
    model, _ = load_model("tiny-mamba")
    ids = _ids(model)
    with pytest.raises(ValueError, match="outside the sequence"):
        lrp(model, ids, 20, 1)
    with pytest.raises(ValueError, match="vocabulary"):
        lrp(model, ids, 3, model.config.vocab_size)
    with pytest.raises(ValueError, match="one per sequence"):
        lrp(model, ids.repeat(2, 1), [3, 4, 5], 1)
    with pytest.raises(ValueError, match="integers"):
        lrp(model, ids, 3.0, 1)
    with pytest.raises(ValueError, match="attention rule"):
        LRPRules(attention="softmax")


def _family(kind):
    """Small random models of the other supported families (configs as in tests/test_arch_*.py, no MoE)."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=32, num_attention_heads=4, pad_token_id=0)
    if kind == "falcon_mamba":
        return stress(tf.FalconMambaForCausalLM(tf.FalconMambaConfig(vocab_size=97, num_hidden_layers=2)))
    if kind == "jamba":
        cfg = tf.JambaConfig(**common, num_hidden_layers=4, num_key_value_heads=2, intermediate_size=20,
                             num_experts=1, attn_layer_period=4, attn_layer_offset=3, mamba_d_state=8,
                             mamba_d_conv=3, mamba_expand=2)
        return stress(tf.JambaForCausalLM(cfg))
    if kind in ("falcon_h1", "falcon_h1_norm_before_gate"):
        cfg = tf.FalconH1Config(**common, num_hidden_layers=2, num_key_value_heads=2, intermediate_size=40,
                                mamba_d_ssm=48, mamba_n_heads=6, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=8,
                                mamba_d_conv=3, mamba_chunk_size=16, mamba_rms_norm=True,
                                mamba_norm_before_gate=kind.endswith("gate"))
        return stress(tf.FalconH1ForCausalLM(cfg))
    if kind == "nemotron_h":
        cfg = tf.NemotronHConfig(**common, num_key_value_heads=2, head_dim=8, intermediate_size=40,
                                 mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=8, conv_kernel=3,
                                 chunk_size=16, layers_block_type=["linear_attention", "mlp", "full_attention"])
        return stress(tf.NemotronHForCausalLM(cfg))
    if kind == "llama":
        return stress(tf.LlamaForCausalLM(tf.LlamaConfig(**common, num_hidden_layers=2, intermediate_size=40)))
    return stress(tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**common, num_hidden_layers=2, intermediate_size=48,
                                                         max_position_embeddings=64)))


@pytest.mark.parametrize("kind", ["falcon_mamba", "jamba", "falcon_h1", "falcon_h1_norm_before_gate", "nemotron_h",
                                  "llama", "gpt_neox"])
def test_conservation_other_families(kind):
    model = _without_biases(_family(kind).double())
    ids = torch.randint(1, 97, (1, 20), generator=torch.Generator().manual_seed(0))
    res = lrp(model, ids, 18, 5)
    with torch.no_grad():
        own = float(model(ids).logits[0, 18, 5])
    assert abs(float(res.logit[0]) - own) <= 1e-5 * abs(own)  # HF's fp32 islands in an fp64 model
    assert abs(float(res.remainder[0])) <= FP64_REL * abs(float(res.logit[0])), kind
    off = lrp(model, ids, 18, 5, rules=LRPRules(norm=False))
    assert float((off.relevance - res.relevance).abs().max()) > 1e-3 * float(res.relevance.abs().max())


def test_unsupported_families_are_refused():
    import transformers as tf

    cfg = tf.Zamba2Config(vocab_size=97, hidden_size=32, num_attention_heads=4, intermediate_size=40,
                          mamba_d_state=8, mamba_d_conv=3, n_mamba_heads=8, mamba_ngroups=2, chunk_size=16,
                          adapter_rank=4, num_hidden_layers=2, layers_block_type=["mamba", "hybrid"])
    model = tf.Zamba2ForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match="zamba2"):
        lrp(model, torch.randint(1, 97, (1, 8)), 5, 1)
    moe = tf.JambaForCausalLM(tf.JambaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=20, num_experts=4, expert_layer_period=2,
                                             expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=0,
                                             mamba_d_state=8, mamba_d_conv=3)).eval()
    with pytest.raises(ValueError, match="mixture-of-experts"):
        lrp(moe, torch.randint(1, 97, (1, 8)), 5, 1)
