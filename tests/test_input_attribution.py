"""Captum's input attributions at the embedding layer (issue 20, item 4; attribution/input_attribution.py).

References: the exact contributions of a model with no nonlinearity (a test construction), the model's own
forward with ``inputs_embeds`` (completeness of IG, occlusion by a hand-written loop), and on every
supported family the model's own logits for the explained function.
"""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from family_check import rel
from mambascope.attribution.input_attribution import (
    TOKEN_METHODS,
    Settings,
    batch_relevance,
    gradient_x_input,
    integrated_gradients,
    occlusion,
    target_logit,
    token_relevance,
)
from mambascope.models import load_model
from test_arch_transformers import _llama, _neox
from test_ssm_state import FAMILIES
from test_trace import _random_model


class LinearLM(nn.Module):
    """logits[t] = W · Σ_{s≤t} M[t, s]·e_s: token s contributes exactly M[P, s]·⟨W[v], e_s⟩ to logits[P, v]."""

    def __init__(self, vocab: int = 13, d: int = 5, length: int = 9):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(vocab, d).double()
        self.M = torch.randn(length, length, generator=g, dtype=torch.float64).tril()
        self.W = torch.randn(vocab, d, generator=g, dtype=torch.float64)
        self.config = SimpleNamespace(model_type="linear-test")

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids, use_cache=False):
        e = self.embed(input_ids)
        L = e.shape[1]
        return SimpleNamespace(logits=torch.einsum("ts,bsd,vd->btv", self.M[:L, :L], e, self.W))

    def exact(self, ids, position, token):
        e = self.embed(torch.tensor(ids)).detach()
        out = torch.zeros(len(ids), dtype=torch.float64)
        out[:position + 1] = self.M[position, :position + 1] * (e[:position + 1] @ self.W[token])
        return out


IDS = [3, 7, 1, 12, 5, 5, 0, 9, 2]


@pytest.mark.parametrize("method", [gradient_x_input, integrated_gradients, occlusion])
@pytest.mark.parametrize("position", [8, 5])
def test_linear_model_gives_the_exact_contributions(method, position):
    """With the zero baseline, f linear and f(0) = 0: each method's R_j is token j's exact term."""
    model = LinearLM()
    got = method(model, IDS, position, 4) if method is gradient_x_input else method(model, IDS, position, 4,
                                                                                      baseline="zero")
    # Captum rounds IG's quadrature weights (``torch.tensor(step_sizes).float()``) and occlusion's result
    # (``single_attrib.float()``) to fp32: their error is fp32's, gradient × input's fp64's
    assert rel(got.relevance, model.exact(IDS, position, 4)) < (1e-12 if method is gradient_x_input else 1e-6)
    assert torch.all(got.relevance[position + 1:] == 0)


def test_batched_gradient_x_input_is_each_rows_exact_contribution():
    """A batch of predictions at different positions and targets: row r's relevance is row r's exact terms."""
    model = LinearLM()
    ids = torch.tensor([IDS, IDS[::-1], IDS[2:] + IDS[:2]])
    positions, targets = torch.tensor([8, 5, 3]), torch.tensor([4, 0, 11])
    got = batch_relevance(model, ids, positions, targets, "gradient_x_input")
    for r in range(3):
        assert rel(got[r], model.exact(ids[r].tolist(), int(positions[r]), int(targets[r]))) < 1e-12


@pytest.mark.parametrize("method", ["lrp", "gradient_x_input", "occlusion"])
def test_batch_relevance_equals_one_prediction_at_a_time(tiny_mamba, method):
    model, ids = tiny_mamba
    batch = torch.tensor([ids, ids[::-1]])
    positions, targets = torch.tensor([len(ids) - 1, 6]), torch.tensor([17, 300])
    got = batch_relevance(model, batch, positions, targets, method)
    for r in range(2):
        one = TOKEN_METHODS[method](model, batch[r], int(positions[r]), int(targets[r]), Settings())[0].relevance
        assert rel(got[r], one) < 1e-10
        assert torch.all(got[r, int(positions[r]) + 1:] == 0)
    with pytest.raises(ValueError, match="not a whole-model method"):
        batch_relevance(model, batch, positions, targets, "block")


@pytest.fixture(scope="module")
def tiny_mamba():
    model, tokenizer = load_model("tiny-mamba", dtype="float64")
    ids = tokenizer("def read(self, path):\n    return open(path).").input_ids
    return model, ids


def test_integrated_gradients_completeness(tiny_mamba):
    """Σ_j R_j = f(e) − f(b), with f(e) the model's own logit and f(b) its own forward on the baseline as
    inputs_embeds; the remainder is Captum's convergence delta, which 64 steps make small from the mean
    embedding (and do not from the zero embedding, whose path crosses the RMSNorm's steep region near 0)."""
    model, ids = tiny_mamba
    P, t = len(ids) - 1, 11
    got = integrated_gradients(model, ids, P, t)
    mean = model.get_input_embeddings().weight.detach().mean(0).expand(1, len(ids), -1)
    with torch.no_grad():
        f_x = model(torch.tensor([ids])).logits[0, P, t]
        f_b = model(inputs_embeds=mean).logits[0, P, t]
    gap = float(f_x - f_b)
    # Hugging Face's Mamba forward runs its scan in fp32 (its logits come back fp32 for a fp64 model)
    fp32 = 1e-6 * max(abs(float(f_x)), abs(float(f_b)))
    delta = got.details["convergence_delta"]
    assert abs(got.details["f_input_minus_f_baseline"] - gap) < fp32
    assert abs(float(got.relevance.sum()) - gap) <= abs(delta) + fp32
    assert abs(delta) < 1e-3 * abs(gap)


def test_occlusion_is_the_rerun_without_each_token():
    model, tokenizer = load_model("tiny-mamba2", dtype="float64")
    ids = tokenizer("class Path:\n    def name(self").input_ids
    P, t = len(ids) - 2, 7
    got = occlusion(model, ids, P, t)
    emb = model.get_input_embeddings()(torch.tensor([ids])).detach()
    mean = model.get_input_embeddings().weight.detach().mean(0)
    expected = torch.zeros(len(ids), dtype=torch.float64)
    with torch.no_grad():
        full = model(inputs_embeds=emb).logits[0, P, t]
        for j in range(P + 1):
            occluded = emb.clone()
            occluded[0, j] = mean
            expected[j] = full - model(inputs_embeds=occluded).logits[0, P, t]
    # Captum returns occlusion in fp32, and Hugging Face's Mamba-2 forward computes in fp32
    assert rel(got.relevance, expected) < 1e-5
    assert torch.all(got.relevance[P + 1:] == 0)


FAMILY_MODELS = {**FAMILIES, "gpt2": lambda: _random_model("gpt2", dict(n_embd=32, n_head=4)),
                 "gpt_neox": lambda: _neox(), "llama": lambda: _llama()}


@pytest.mark.parametrize("family", FAMILY_MODELS)
def test_every_family_explains_its_own_logit(family):
    """The embedding-layer replacement reproduces the model's own logit (multipliers, positions, shared
    blocks included), and IG's sum matches f(e) − f(0) up to its reported delta."""
    model = FAMILY_MODELS[family]()  # fp32: Nemotron-H's grouped expert matmul has no fp64 kernel
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(1, vocab, (1, 10), generator=torch.Generator().manual_seed(2))
    P, t = 7, 3
    emb = model.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        own = model(ids, use_cache=False).logits[0, P]
        scale = float(own.abs().max())
        assert abs(float(target_logit(model, ids, P, t)(emb)[0]) - float(own[t])) < 1e-5 * scale
    got = integrated_gradients(model, ids[0], P, t, n_steps=16)
    remainder = float(got.relevance.sum()) - got.details["f_input_minus_f_baseline"]
    assert abs(remainder - got.details["convergence_delta"]) < 1e-5 * scale
    gxi = gradient_x_input(model, ids[0], P, t)
    assert torch.isfinite(gxi.relevance).all() and gxi.relevance[:P + 1].abs().sum() > 0


def test_registry_rows_and_errors(tiny_mamba):
    model, ids = tiny_mamba
    errors = {}
    rows = token_relevance(model, ids, -1, 5, methods=["occlusion", "knockout", "rollout"], errors=errors)
    assert not errors
    assert [r.method for r in rows] == ["occlusion", "knockout", *["rollout"] * model.config.num_hidden_layers]
    assert [r.layer for r in rows][:2] == [None, None]
    with pytest.raises(ValueError, match="unknown attribution method 'nope'"):
        token_relevance(model, ids, -1, 5, methods=["nope"])
    assert set(TOKEN_METHODS) >= {"gradient_x_input", "integrated_gradients", "occlusion", "knockout"}
