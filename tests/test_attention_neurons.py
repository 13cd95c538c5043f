"""Attention neurons (docs/design.md §6, docs/methods.md): the seed's API, and each method against an
independent computation (the hidden-attention kernel, Hugging Face's own attention probabilities,
an explicit rollout product, autograd through a materialised α)."""

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

import mambascope.attribution.methods as methods_module
from mambascope.attention_neurons import (
    METHODS,
    MambaAttentionNeurons,
    analyze_neurons,
    integrate_mamba_attention_neurons,
    run_attention_analysis,
)
from mambascope.report.attention_plots import plot_attention_neurons_analysis
from mambascope.ssm.hidden_attention import AttentionMemoryError, hidden_attention
from mambascope.trace import mixer_params, trace

V = 61
ARCHS = ["mamba", "mamba2", "gpt2"]


def make_model(kind: str, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "mamba":
        model = MambaForCausalLM(MambaConfig(vocab_size=V, num_hidden_layers=layers, hidden_size=16, state_size=4,
                                             expand=2, conv_kernel=4, time_step_rank=4))
    elif kind == "mamba2":
        model = Mamba2ForCausalLM(Mamba2Config(vocab_size=V, num_hidden_layers=layers, hidden_size=16, state_size=4,
                                               expand=2, head_dim=8, num_heads=4, n_groups=2, chunk_size=8,
                                               conv_kernel=3))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_layer=layers, n_embd=16, n_head=4, n_positions=32,
                                           attn_implementation="eager"))
    with torch.no_grad():  # trained-like Δ·A and D (a fresh init decays too little to test anything)
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "D", "dt_bias", "dt_proj.bias")):
                p.add_(torch.randn_like(p))
    return model.eval()


def padded_batch(L: int = 11):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (3, L), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[1, -4:] = 0  # right padding: default query of row 1 is L-5
    return ids, mask


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


@pytest.fixture(scope="module", params=ARCHS)
def integrated(request):
    model = make_model(request.param)
    ids, mask = padded_batch()
    res = integrate_mamba_attention_neurons(model, ids, layer_indices=[0, 1], methods=None, attention_mask=mask)
    return request.param, model, ids, mask, res


# --------------------------------------------------------------------------------------- API & shapes


def test_seed_api_keys_and_shapes(integrated):
    kind, _, ids, _, res = integrated
    assert set(res) >= {"attention_data", "mamba_neurons", "analysis_results", "errors"}
    assert res["errors"] == {}
    b, L = ids.shape
    data = res["attention_data"]
    C = {"mamba": 32, "mamba2": 4, "gpt2": 4}[kind]
    U = 4 if kind == "gpt2" else 32
    expected = [m for m in METHODS if not (kind == "gpt2" and m == "block")]
    assert list(res["mamba_neurons"]) == expected
    assert data.query.tolist() == [L - 1, L - 5, L - 1]
    for layer in (0, 1):
        assert data[layer]["attention_matrix"].shape == (b, C, L, L)
        assert torch.allclose(data[layer]["attention_vectors"], data[layer]["attention_matrix"].mean(1))
        for method in expected:
            rec = res["mamba_neurons"][method][layer]
            assert rec["activation"].shape == (U,) and rec["importance"].shape == (U,)
            assert rec["relevance"].shape == (b, L)
            assert torch.isfinite(rec["relevance"]).all() and torch.isfinite(rec["activation"]).all()
            assert (rec["importance"] >= 0).all()
            # relevance lives on the keys the query sees: nothing at padding or after the query
            assert (rec["relevance"][0, :3] == 0).all() and (rec["relevance"][1, L - 4:] == 0).all()
            a = res["analysis_results"][method][layer]
            assert {"num_neurons", "mean_activation", "activation_std", "top_neurons", "neuron_diversity"} <= set(a)
            assert a["num_neurons"] == U and len(a["top_neurons"]["indices"]) == min(10, U)
            top = a["top_neurons"]["importance"]
            assert top == sorted(top, reverse=True) and top[0] == pytest.approx(float(rec["importance"].max()))
            assert 0 <= a["neuron_diversity"] <= 1


def test_attention_matrix_is_the_kernels_alpha():
    for kind in ("mamba", "mamba2"):
        model = make_model(kind)
        ids, mask = padded_batch()
        data = MambaAttentionNeurons(model).extract_attention_vectors(ids, [1], attention_mask=mask,
                                                                     methods=["attention_weighted"])
        tr = trace(model, ids, attention_mask=mask)
        want = hidden_attention(tr.layer(1), mixer_params(model, 1), "s6", attention_mask=mask)
        assert torch.equal(data[1]["attention_matrix"], want)


def test_gpt2_attention_matrix_is_hf_softmax():
    model = make_model("gpt2")
    ids, mask = padded_batch()
    data = MambaAttentionNeurons(model).extract_attention_vectors(ids, [0, 1], attention_mask=mask,
                                                                 methods=["attention_weighted"])
    with torch.no_grad():
        hf = model(ids, attention_mask=mask, output_attentions=True).attentions
    valid = mask.bool()
    for layer in (0, 1):
        got = data[layer]["attention_matrix"].permute(0, 2, 1, 3)[valid]  # [tokens, H, L], real query rows
        want = hf[layer].permute(0, 2, 1, 3)[valid]
        assert rel(got, want) < 1e-5


def test_gpt2_value_writes_rebuild_attention_output():
    from mambascope.trace import head_write_weights

    model = make_model("gpt2")
    ids, _ = padded_batch()
    tr = trace(model, ids, ["attn.hook_v", "attn.hook_pattern", "hook_attn_out"])
    for layer in (0, 1):
        v, W = tr[f"blocks.{layer}.attn.hook_v"], head_write_weights(model, layer)
        out = torch.einsum("bhts,bshp,hpd->btd", tr[f"blocks.{layer}.attn.hook_pattern"], v, W)
        out = out + model.transformer.h[layer].attn.c_proj.bias
        assert rel(out, tr[f"blocks.{layer}.hook_attn_out"]) < 1e-5


def test_rows_storage_gives_the_same_neurons_as_full():
    """store='rows' never materialises [b, C, L, L]; its per-row query gathers must match the full matrix."""
    for kind in ("mamba", "mamba2"):
        model = make_model(kind)
        ids, mask = padded_batch()
        meths = ["attention_weighted", "rollout", "block"]
        full = MambaAttentionNeurons(model).extract_attention_vectors(ids, [1], mask, methods=meths)
        rows = MambaAttentionNeurons(model).extract_attention_vectors(ids, [1], mask, methods=meths, store="rows")
        assert "attention_matrix" not in rows[1] and "attention_vectors" not in rows[1]
        an = MambaAttentionNeurons(model)
        for method in meths:
            a, b = an.create_mamba_neurons(full, method)[1], an.create_mamba_neurons(rows, method)[1]
            assert rel(b["importance_per_row"], a["importance_per_row"]) < 1e-5
            assert rel(b["relevance"], a["relevance"]) < 1e-5


# ------------------------------------------------------------------------------------ method formulas


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_attention_weighted_and_block_follow_their_definitions(kind):
    model = make_model(kind)
    ids, mask = padded_batch()
    res = integrate_mamba_attention_neurons(model, ids, [1], ["attention_weighted", "block"], attention_mask=mask)
    data = res["attention_data"]
    tr = trace(model, ids, attention_mask=mask)
    lay, params = tr.layer(1), mixer_params(model, 1)
    alpha = hidden_attention(lay, params, "s6", attention_mask=mask)
    M = hidden_attention(lay, params, "block", attention_mask=mask)
    u, x = lay["mixer.hook_ssm_input"], lay["mixer.hook_x"]
    gate = lay["mixer.hook_post"] / lay["mixer.hook_y"]  # effective gate: post = e ⊙ y
    wn = params.out_proj_weight.norm(dim=0)
    aw, blk = res["mamba_neurons"]["attention_weighted"][1], res["mamba_neurons"]["block"][1]
    for b in range(ids.shape[0]):  # rows have different queries
        q = int(data.query[b])
        a = alpha[b, :, q] if kind == "mamba" else alpha[b, :, q].repeat_interleave(params.head_dim, 0)
        act = (a * u[b].T).abs().sum(-1)
        assert rel(aw["activation_per_row"][b], act) < 1e-5
        assert rel(aw["importance_per_row"][b], act * gate[b, q].abs() * wn) < 1e-4
        assert rel(aw["relevance"][b], alpha[b, :, q].abs().mean(0)) < 1e-5
        bact = (M[b, :, q] * x[b].T).abs().sum(-1)
        assert rel(blk["activation_per_row"][b], bact) < 1e-5
        assert rel(blk["relevance"][b], M[b, :, q].abs().mean(0)) < 1e-5


@pytest.mark.parametrize("kind", ARCHS)
def test_rollout_is_the_explicit_layer_product(kind):
    """Only layer 2 is requested; the product must still start at layer 0 (Abnar & Zuidema 2020)."""
    model = make_model(kind, layers=3)
    ids, mask = padded_batch()
    res = integrate_mamba_attention_neurons(model, ids, [2], ["rollout"], attention_mask=mask)
    assert list(res["attention_data"]) == [2]
    q = res["attention_data"].query
    if kind == "gpt2":
        with torch.no_grad():
            mats = [a.mean(1) for a in model(ids, attention_mask=mask, output_attentions=True).attentions]
    else:
        tr = trace(model, ids, attention_mask=mask)
        mats = []
        for layer in range(3):
            m = hidden_attention(tr.layer(layer), mixer_params(model, layer), "s6", attention_mask=mask).abs().mean(1)
            s = m.sum(-1, keepdim=True)
            mats.append(m / torch.where(s > 0, s, 1.0))  # a padded row attending to nothing stays 0
    L = ids.shape[1]
    R = torch.eye(L).expand(ids.shape[0], L, L)
    for m in mats:  # R_ℓ = (½Ā_ℓ + ½I)·R_{ℓ-1}
        R = torch.bmm(0.5 * m + 0.5 * torch.eye(L), R)
    rows = torch.arange(ids.shape[0])
    rec = res["mamba_neurons"]["rollout"][2]
    valid = mask.bool()
    assert rel(rec["relevance"][valid], R[rows, q][valid]) < 1e-5
    # the unit decomposition is exact: importances sum to 1 per row
    assert torch.allclose(rec["importance_per_row"].sum(-1), torch.ones(ids.shape[0]), atol=1e-5)


def _target(tr_logits, data):
    rows = torch.arange(tr_logits.shape[0])
    return torch.log_softmax(tr_logits[rows, data.query].float(), -1)[rows, data.target_token].sum()


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_gradient_guided_is_autograd_through_materialised_alpha(kind):
    """G = g·u·α (no ∇α materialised) equals ∂target/∂α ⊙ α with α a leaf and y = α·u + D·u rebuilt here."""
    model = make_model(kind)
    ids, mask = padded_batch(L=9)
    an = MambaAttentionNeurons(model)
    data = an.extract_attention_vectors(ids, [0, 1], mask, methods=["gradient_guided"])
    recs = an.create_mamba_neurons(data, "gradient_guided")
    tr0 = trace(model, ids, attention_mask=mask)
    rows = torch.arange(ids.shape[0])
    for layer in (0, 1):
        lay, params = tr0.layer(layer), mixer_params(model, layer)
        alpha = hidden_attention(lay, params, "s6", attention_mask=mask).requires_grad_()
        u = lay["mixer.hook_ssm_input"]
        if kind == "mamba":
            y_new = torch.einsum("bdts,bsd->btd", alpha, u) + params.D * u
        else:
            b, L, E = u.shape
            uh = u.reshape(b, L, params.n_heads, params.head_dim)
            y_new = (torch.einsum("bhts,bshp->bthp", alpha, uh) + params.D[:, None] * uh).reshape(b, L, E)
        assert rel(y_new.detach(), lay["mixer.hook_y"]) < 1e-5
        tr = trace(model, ids, [], attention_mask=mask, grad=True,
                   edits={f"blocks.{layer}.mixer.hook_y": lambda y, y_new=y_new: y_new})
        (g_alpha,) = torch.autograd.grad(_target(tr.logits, data), alpha)
        want = (g_alpha * alpha.detach())[rows, :, data.query]
        got = recs[layer]["grad_attention"]
        assert rel(got, want) < 1e-4
        assert torch.allclose(recs[layer]["relevance"], want.clamp_min(0).mean(1) * (recs[layer]["relevance"] != 0),
                              atol=1e-6)


def test_gpt2_gradient_guided_is_autograd_on_the_softmax():
    model = make_model("gpt2")
    ids, mask = padded_batch()
    an = MambaAttentionNeurons(model)
    data = an.extract_attention_vectors(ids, [0, 1], mask, methods=["gradient_guided", "gradient_x_post"])
    gg, gxp = an.create_mamba_neurons(data, "gradient_guided"), an.create_mamba_neurons(data, "gradient_x_post")
    rows = torch.arange(ids.shape[0])
    for layer in (0, 1):
        with torch.no_grad():
            A = model(ids, attention_mask=mask, output_attentions=True).attentions[layer].clone()
        A.requires_grad_()
        tr = trace(model, ids, [], attention_mask=mask, grad=True,
                   edits={f"blocks.{layer}.attn.hook_pattern": lambda p, A=A: torch.where(A.isnan(), p, A)})
        (gA,) = torch.autograd.grad(_target(tr.logits, data), A)
        GA = gA * A.detach()
        assert rel(gg[layer]["grad_attention"], GA[rows, :, data.query]) < 1e-4
        assert rel(gxp[layer]["activation_per_row"], GA.sum((-1, -2))) < 1e-4


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_gradient_x_post_is_input_times_gradient_at_post(kind):
    model = make_model(kind)
    ids, mask = padded_batch(L=9)
    an = MambaAttentionNeurons(model)
    data = an.extract_attention_vectors(ids, [1], mask, methods=["gradient_x_post"])
    rec = an.create_mamba_neurons(data, "gradient_x_post")[1]
    post = trace(model, ids, ["blocks.1.mixer.hook_post"], attention_mask=mask)["blocks.1.mixer.hook_post"]
    leaf = post.clone().requires_grad_()
    tr = trace(model, ids, [], attention_mask=mask, grad=True, edits={"blocks.1.mixer.hook_post": lambda p: leaf})
    (g,) = torch.autograd.grad(_target(tr.logits, data), leaf)
    P = (g * post)
    assert rel(rec["activation_per_row"], P.sum(1)) < 1e-4
    assert rel(rec["relevance"], P.sum(-1)) < 1e-4


# ------------------------------------------------------------------------------------------- analysis


def test_analyze_neurons_diversity_definition():
    uniform = analyze_neurons({"activation": torch.ones(8), "importance": torch.ones(8)})
    assert uniform["neuron_diversity"] == pytest.approx(1.0) and uniform["effective_neurons"] == pytest.approx(8)
    onehot = analyze_neurons({"activation": torch.arange(8.0), "importance": torch.eye(8)[5]})
    assert onehot["neuron_diversity"] == pytest.approx(0.0) and onehot["top_neurons"]["indices"][0] == 5
    assert onehot["mean_activation"] == pytest.approx(3.5)
    assert onehot["activation_std"] == pytest.approx(float(torch.arange(8.0).std(correction=0)))
    zero = analyze_neurons({"activation": torch.ones(4), "importance": torch.zeros(4)})
    assert zero["neuron_diversity"] is None and "undefined" in zero["neuron_diversity_note"]


# --------------------------------------------------------------------------------------------- errors


def test_errors_are_clear():
    model = make_model("mamba")
    gpt = make_model("gpt2")
    ids, mask = padded_batch()
    an = MambaAttentionNeurons(model)
    data = an.extract_attention_vectors(ids, [0], mask, methods=["attention_weighted"])
    with pytest.raises(ValueError, match="valid methods: attention_weighted, gradient_guided, rollout, block"):
        an.create_mamba_neurons(data, method="attention_mixed")
    with pytest.raises(ValueError, match=r"was not extracted.*grad=True"):
        an.create_mamba_neurons(data, method="gradient_guided")
    with pytest.raises(IndexError, match="layer 5 out of range"):
        an.extract_attention_vectors(ids, [5])
    with pytest.raises(IndexError, match="query position 11 out of range"):
        an.extract_attention_vectors(ids, [0], query=11)
    with pytest.raises(ValueError, match="row 0 is padding"):
        an.extract_attention_vectors(ids, [0], mask, query=1)
    with pytest.raises(ValueError, match="Mamba-only"):
        MambaAttentionNeurons(gpt).extract_attention_vectors(ids, [0], methods=["block"])
    hybrid = make_model("mamba")
    hybrid.backbone.layers[1].mixer = torch.nn.Identity()
    with pytest.raises(ValueError, match="layer 1 has no Mamba mixer"):
        MambaAttentionNeurons(hybrid).extract_attention_vectors(ids, [0, 1])
    with pytest.raises(AttentionMemoryError, match=r"rows=.*reduce=.*store='rows'"):
        MambaAttentionNeurons(model, max_bytes=1000).extract_attention_vectors(ids, [0], methods=["rollout"])


def test_a_failing_method_does_not_stop_the_others(monkeypatch):
    gpt = make_model("gpt2")
    ids, _ = padded_batch()
    res = integrate_mamba_attention_neurons(gpt, ids, [0], ["attention_weighted", "block", "nonsense"])
    assert "Mamba-only" in res["errors"]["block"] and "valid methods" in res["errors"]["nonsense"]
    assert set(res["analysis_results"]) == {"attention_weighted"}

    def broken(data):
        raise RuntimeError("rollout exploded")

    monkeypatch.setitem(methods_module.METHOD_FUNCTIONS, "rollout", broken)
    res = integrate_mamba_attention_neurons(make_model("mamba"), ids, [0, 1], ["rollout", "attention_weighted"])
    assert res["errors"] == {"rollout": "RuntimeError: rollout exploded"}
    assert set(res["analysis_results"]["attention_weighted"]) == {0, 1}
    assert "rollout" not in res["mamba_neurons"]


# ---------------------------------------------------------------------------------- summary and plots


def test_run_attention_analysis_is_json_and_plots(tmp_path):
    model = make_model("mamba2")
    windows = torch.randint(0, V, (4, 10), generator=torch.Generator().manual_seed(0))
    summary = run_attention_analysis(model, windows, layers=[1], methods=["attention_weighted", "rollout"],
                                     faithfulness=False, batch_size=3)
    json.dumps(summary, allow_nan=False)
    entry = summary["results"]["rollout"]["1"]
    assert entry["num_neurons"] == 32 and len(entry["relevance_first_window"]) == 10
    # the row mean over all windows (two batches) equals a one-batch extraction's mean
    res = integrate_mamba_attention_neurons(model, windows, [1], ["rollout", "attention_weighted"])
    assert rel(torch.tensor(entry["importance"]), res["mamba_neurons"]["rollout"][1]["importance"]) < 1e-5
    for obj, name in [(summary, "summary.png"), (res, "integrate.png")]:
        path = plot_attention_neurons_analysis(obj, 1, tmp_path / name)
        assert path.stat().st_size > 10_000
    # create_mamba_neurons records alone, with the extraction's channel-mean attention as the heatmap
    records, vectors = res["mamba_neurons"]["rollout"], res["attention_data"][1]["attention_vectors"][0]
    path = plot_attention_neurons_analysis(records, 1, tmp_path / "records.png", attention=vectors)
    assert path.stat().st_size > 10_000
