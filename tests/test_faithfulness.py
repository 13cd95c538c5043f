"""Faithfulness evaluation (docs/methods.md): perturbation curves, neuron ablation against random units."""

import json

import pytest
import torch

from mambascope.attribution import evaluate_faithfulness, faithfulness, faithfulness_table
from mambascope.attribution.faithfulness import context_ranking, perturbed_logprob, token_ranking
from mambascope.attribution.input_attribution import TOKEN_METHODS, Settings
from mambascope.interventions import ablation_edits, heldout_loss
from mambascope.trace import trace
from test_attention_neurons import V, make_model

T = 10


def windows(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["mamba2", "gpt2"])
def evaluated(request):
    model = make_model(request.param)
    sel, ev = windows(4, 1), windows(5, 2)
    res = evaluate_faithfulness(model, sel, ev, [0, 1], ["attention_weighted", "rollout", "gradient_x_post"],
                                k=3 if request.param != "gpt2" else 1, steps=4, seed=0, batch_size=3,
                                query_margin=None, whole_model=["lrp", "gradient_x_input"])
    return request.param, model, sel, ev, res


def test_token_curves(evaluated):
    _, model, _, ev, res = evaluated
    json.dumps(res, allow_nan=False)
    tok = res["token"]
    assert tok["fractions"] == [0.0, 0.25, 0.5, 0.75, 1.0] and tok["query_positions"] == [T - 2] * 5
    # the unperturbed log-prob of the actual next token, from a plain forward
    with torch.no_grad():
        logits = trace(model, ev, []).logits[:, T - 2]
    base = torch.log_softmax(logits, -1).gather(1, ev[:, T - 1:])[:, 0].mean()
    assert tok["baseline_logprob"] == pytest.approx(float(base), abs=1e-5)
    rows = [tok["random"]] + [tok["methods"][m][str(layer)] for m in tok["methods"] for layer in (0, 1)]
    assert set(tok["methods"]) == {"attention_weighted", "rollout", "gradient_x_post"}
    for row in rows:
        assert len(row["morf"]) == len(row["lerf"]) == 5
        # f = 0 removes nothing; f = 1 removes the whole context whatever the order
        assert row["morf"][0] == pytest.approx(float(base), abs=1e-5)
        assert row["lerf"][0] == pytest.approx(float(base), abs=1e-5)
        assert row["morf"][-1] == pytest.approx(row["lerf"][-1], abs=1e-5)
        assert row["difference"] == pytest.approx(row["lerf_area"] - row["morf_area"])
        want = sum((a + b) / 2 * 0.25 for a, b in zip(row["morf"][:-1], row["morf"][1:], strict=True))
        assert row["morf_area"] == pytest.approx(want)
    assert tok["random"]["seeds"] == 3 and len(tok["random"]["per_seed_difference"]) == 3
    for method in tok["methods"]:
        for layer in ("0", "1"):
            e = tok["methods"][method][layer]
            ci, vs = e["difference_ci"], e["vs_random"]
            assert ci["low"] <= e["difference"] <= ci["high"] and ci["n"] == 5
            assert e["above_random"] == (vs["low"] > 0)
            assert vs["mean"] == pytest.approx(e["difference"] - tok["random"]["difference"])


def test_whole_model_methods_are_scored_by_the_same_curves(evaluated):
    """Each whole-model method's MoRF / LeRF curves equal a slow loop: its relevance for one window at a time
    (input_attribution's one-prediction functions), a plain sort, the top (bottom) round(f·q) context
    positions masked by hand, the traced forward's log-prob of the next token."""
    _, model, _, ev, res = evaluated
    tok, q = res["token"], T - 2
    assert set(tok["whole_model"]) == {"lrp", "gradient_x_input"} and res["whole_model_methods"] == list(
        tok["whole_model"])
    for method, entry in tok["whole_model"].items():
        morf, lerf = torch.zeros(len(ev), 5), torch.zeros(len(ev), 5)
        for w, ids in enumerate(ev):
            target = int(ids[q + 1])
            relevance = TOKEN_METHODS[method](model, ids, q, target, Settings())[0].relevance[:q]
            order = torch.argsort(relevance, descending=True)
            for i, f in enumerate(tok["fractions"]):
                k = round(f * q)
                for curve, removed in ((morf, order[:k]), (lerf, order.flip(0)[:k])):
                    mask = torch.ones(1, T, dtype=torch.long)
                    mask[0, removed] = 0
                    with torch.no_grad():
                        logits = trace(model, ids[None], [], attention_mask=mask).logits[0, q]
                    curve[w, i] = torch.log_softmax(logits, -1)[target]
        assert entry["morf"] == pytest.approx(morf.mean(0).tolist(), abs=1e-5)
        assert entry["lerf"] == pytest.approx(lerf.mean(0).tolist(), abs=1e-5)
        vs = entry["vs_random"]
        assert entry["above_random"] == (vs["low"] > 0) and (method in tok["above_random"]) == entry["above_random"]
    table = faithfulness_table(res)
    whole = table[table["method"].isin(["lrp", "gradient_x_input"])]
    assert len(whole) == 2 and whole["layer"].isna().all() and list(whole["layer"]) == [None, None]
    assert not table[table["method"] == "random"]["layer"].isna().any()


def test_neuron_ablation_against_random(evaluated):
    kind, model, _, ev, res = evaluated
    neu = res["neuron"]
    assert neu["unit"] == ("head" if kind == "gpt2" else "channel")
    assert neu["baseline_loss"] == pytest.approx(heldout_loss(model, ev).loss)
    for layer in ("0", "1"):
        rnd = neu["random"][layer]
        assert len(rnd["losses"]) == 3 and rnd["delta_std"] >= 0
        assert rnd["smallest_p_value"] == pytest.approx(1 / 4)  # 3 draws cannot give p below 1/4
        for method in ("attention_weighted", "rollout", "gradient_x_post"):
            ent = neu["methods"][method][layer]
            assert len(ent["units"]) == ent["k"] == rnd["k"]
            # the Monte Carlo p-value by hand: the method's Δ ranked among the random draws' Δ
            at_least = len([d for d in rnd["deltas"] if d >= ent["delta"]])
            assert ent["random_at_least"] == at_least and ent["p_vs_random"] == (1 + at_least) / 4
            assert "z_vs_random" not in ent
    if kind != "gpt2":  # the reported loss is ablation_edits' zero-ablation of exactly those units
        ent = neu["methods"]["rollout"]["1"]
        loss = heldout_loss(model, ev, edits=ablation_edits(model, {1: ent["units"]})).loss
        assert ent["loss"] == pytest.approx(loss)
    table = faithfulness_table(res)
    assert set(table["method"]) == {"attention_weighted", "rollout", "gradient_x_post", "random", "lrp",
                                    "gradient_x_input"}
    assert len(table) == 4 * 2 + 2  # per layer, and one row for each whole-model method
    assert {"morf_area", "lerf_area", "area_difference", "delta_loss", "random_delta_mean", "random_delta_std"} <= set(
        table.columns)


def test_gpt2_head_ablation_removes_the_heads_write():
    """Zeroing a head's pattern (the GPT-2 unit ablation) equals subtracting that head's write from attn_out."""
    from mambascope.attribution.faithfulness import _head_edits
    from mambascope.trace import head_write_weights

    model = make_model("gpt2")
    ids = windows(2, 5)
    tr = trace(model, ids, ["blocks.0.attn.hook_v", "blocks.0.attn.hook_pattern", "blocks.0.hook_attn_out"])
    ablated = trace(model, ids, ["blocks.0.hook_attn_out"], edits=_head_edits(0, torch.tensor([2])))
    v, W = tr["blocks.0.attn.hook_v"], head_write_weights(model, 0)
    write = torch.einsum("bts,bsp,pd->btd", tr["blocks.0.attn.hook_pattern"][:, 2], v[:, :, 2], W[2])
    diff = tr["blocks.0.hook_attn_out"] - ablated["blocks.0.hook_attn_out"]
    assert torch.allclose(diff, write, atol=1e-5)


def test_perturbation_masks_exactly_the_ranked_positions():
    model = make_model("mamba2")
    ids = windows(2, 7)
    q = T - 2
    rel = torch.rand(2, q, generator=torch.Generator().manual_seed(0))
    order = token_ranking(rel, torch.Generator().manual_seed(1))
    assert torch.equal(order, rel.argsort(1, descending=True))  # no ties: plain descending order
    target = ids[:, q + 1]
    got = perturbed_logprob(model, ids, order, [0, 3], q, target)
    mask = torch.ones(2, q + 1, dtype=torch.long)
    mask[torch.arange(2)[:, None], order[:, :3]] = 0
    with torch.no_grad():
        logits = trace(model, ids[:, : q + 1], [], attention_mask=mask).logits[:, q]
    assert torch.allclose(got[:, 1], torch.log_softmax(logits, -1).gather(1, target[:, None])[:, 0], atol=1e-6)
    # ties are broken at random, not by position
    flat = token_ranking(torch.zeros(1, 50), torch.Generator().manual_seed(2))
    assert not torch.equal(flat[0], torch.arange(50))


def test_failures_and_input_errors():
    gpt = make_model("gpt2")
    sel, ev = windows(3, 1), windows(3, 2)
    res = evaluate_faithfulness(gpt, sel, ev, [1], ["block", "attention_weighted"], k=1, steps=2,
                                neuron_level=False, batch_size=4, query_margin=-100.0)
    assert "Mamba-only" in res["errors"]["block"] and "attention_weighted" in res["token"]["methods"]
    assert "block" not in set(faithfulness_table(res)["method"])
    # no window where the context matters by 50 nats: the token level fails by name, the neuron level runs
    res = evaluate_faithfulness(gpt, sel, ev, [1], ["attention_weighted"], k=1, steps=2, query_margin=50.0)
    assert res["token"] is None and "50.0 nats" in res["errors"]["token_level"]
    assert "attention_weighted" in res["neuron"]["methods"]
    with pytest.raises(ValueError, match="disjoint"):
        evaluate_faithfulness(gpt, ev, ev, [0], ["rollout"], k=1, token_level=False)
    with pytest.raises(ValueError, match="draws"):
        evaluate_faithfulness(gpt, sel, ev, [0], ["rollout"], draws=2)


def test_context_queries_pick_the_largest_gap_above_the_margin():
    """The chosen query and its two log-probs, against plain forwards with hand-built masks."""
    from mambascope.attribution.faithfulness import context_queries

    model = make_model("mamba2")
    ev = windows(6, 3)
    got = context_queries(model, ev, margin=0.05, candidates=4, seed=1)
    for i in range(ev.shape[0]):
        q = int(got["query"][i])
        assert T // 4 <= q <= T - 2
        with torch.no_grad():
            full = torch.log_softmax(trace(model, ev[i:i + 1], []).logits[0, q], -1)[ev[i, q + 1]]
            mask = torch.zeros(1, q + 1, dtype=torch.long)
            mask[0, q] = 1
            alone = torch.log_softmax(trace(model, ev[i:i + 1, :q + 1], [], attention_mask=mask).logits[0, q], -1)
        assert float(got["full"][i]) == pytest.approx(float(full), abs=1e-5)
        assert float(got["masked"][i]) == pytest.approx(float(alone[ev[i, q + 1]]), abs=1e-5)
        assert bool(got["keep"][i]) == (float(full - alone[ev[i, q + 1]]) >= 0.05)
    fixed = context_queries(model, ev, margin=None)
    assert fixed["query"].tolist() == [T - 2] * 6 and bool(fixed["keep"].all())


def test_context_queries_stop_once_enough_windows_qualify():
    """Scoring in blocks until ``enough`` qualify gives a prefix of what scoring every window gives."""
    from mambascope.attribution.faithfulness import context_queries

    model = make_model("mamba")
    ev = windows(12, 5)
    every = context_queries(model, ev, margin=0.05, candidates=4, seed=2)
    assert 3 <= int(every["keep"].sum()) < 12  # some windows qualify, some do not: the stop is exercised
    part = context_queries(model, ev, margin=0.05, candidates=4, seed=2, enough=3, block=2)
    n = part["keep"].shape[0]
    assert n < 12 and int(part["keep"].sum()) >= 3 and int(part["keep"][:n - 2].sum()) < 3  # stopped at once
    assert torch.equal(part["query"], every["query"][:n]) and torch.equal(part["keep"], every["keep"][:n])
    for key in ("full", "masked"):
        assert torch.allclose(part[key], every[key][:n], atol=1e-5)
    assert context_queries(model, ev, margin=0.05, candidates=4, seed=2, enough=100, block=5)["keep"].shape == (12,)


def test_random_std_over_one_seed_is_null_and_per_row_queries():
    model = make_model("gpt2")
    res = evaluate_faithfulness(model, windows(2, 1), windows(6, 4), [0], ["attention_weighted"], steps=2,
                                random_seeds=1, neuron_level=False, query_margin=-100.0, query_candidates=3)
    tok = res["token"]
    assert tok["random"]["difference_std"] is None and len(tok["random"]["per_seed_difference"]) == 1
    assert tok["n_windows"] == 6 and all(T // 4 <= q <= T - 2 for q in tok["query_positions"])
    json.dumps(res, allow_nan=False)


def test_per_row_queries_mask_exactly_the_ranked_positions():
    """perturbed_logprob with a query per row equals a plain forward of each row under its own mask."""
    model = make_model("mamba2")
    ids = windows(3, 8)
    q = torch.tensor([4, 8, 6])
    rel = torch.rand(3, 8, generator=torch.Generator().manual_seed(0))
    rel[torch.arange(8)[None, :] >= q[:, None]] = -torch.inf
    order = token_ranking(rel, torch.Generator().manual_seed(1))
    counts = torch.tensor([[0, 0, 0], [2, 3, 1]])
    target = ids[torch.arange(3), q + 1]
    got = perturbed_logprob(model, ids, order, counts, q, target)
    for i in range(3):
        mask = torch.ones(1, int(q[i]) + 1, dtype=torch.long)
        mask[0, order[i, : int(counts[1, i])]] = 0
        assert bool((order[i, : int(counts[1, i])] < q[i]).all())
        with torch.no_grad():
            logits = trace(model, ids[i:i + 1, : int(q[i]) + 1], [], attention_mask=mask).logits[0, int(q[i])]
        assert float(got[i, 1]) == pytest.approx(float(torch.log_softmax(logits, -1)[target[i]]), abs=1e-5)


def test_non_finite_relevance_is_refused_naming_the_method(monkeypatch):
    context = torch.ones(2, 5, dtype=torch.bool)
    rel = torch.rand(2, 5)
    for bad in (float("nan"), float("inf"), -float("inf")):
        rel_bad = rel.clone()
        rel_bad[1, 2] = bad
        with pytest.raises(ValueError, match=r"^rollout at layer 1: non-finite relevance .* 1 of 10 context"):
            context_ranking(rel_bad, context, torch.Generator(), "rollout at layer 1")
    with pytest.raises(ValueError, match=r"^relevance: non-finite"):  # a NaN would sort first
        token_ranking(torch.tensor([[0.1, float("nan"), 0.3]]), torch.Generator())
    # outside the context a method's NaN is never ranked (−inf marks those positions)
    rel_bad = rel.clone()
    rel_bad[:, 4] = float("nan")
    context[:, 4] = False
    assert context_ranking(rel_bad, context, torch.Generator(), "m")[:, 4:].eq(4).all()
    # end to end: a method that emits NaN fails by name, the others are scored
    real = faithfulness.method_records

    def nan_rollout(*args, **kwargs):
        for batch, data, records in real(*args, **kwargs):
            for layer in records.get("rollout", {}):
                records["rollout"][layer]["relevance"] = torch.full_like(records["rollout"][layer]["relevance"],
                                                                        float("nan"))
            yield batch, data, records

    monkeypatch.setattr(faithfulness, "method_records", nan_rollout)
    res = evaluate_faithfulness(make_model("mamba2"), windows(3, 1), windows(3, 2), [0],
                                ["rollout", "attention_weighted"], k=1, steps=2, neuron_level=False,
                                query_margin=None)
    assert res["errors"]["rollout"].startswith("rollout at layer 0: non-finite relevance")
    assert set(res["token"]["methods"]) == {"attention_weighted"}


def test_a_whole_model_method_the_family_lacks_is_named_and_the_others_run():
    """Zamba2 has no LRP rules: ``lrp`` is reported by name with the reason (and by the run's summary), gradient
    × input is scored; an unknown name is refused before any work."""
    import io

    from mambascope.pipeline import print_analysis_summary
    from test_ssm_state import FAMILIES

    model = FAMILIES["zamba2"]()
    w = torch.randint(0, 50, (6, T), generator=torch.Generator().manual_seed(3))
    res = evaluate_faithfulness(model, w[:3], w[3:], None, ["attention_weighted"], steps=2, query_margin=None,
                                whole_model=["lrp", "gradient_x_input"], k=1, neuron_level=False)
    assert "not zamba2" in res["errors"]["lrp"] and list(res["token"]["whole_model"]) == ["gradient_x_input"]
    out = io.StringIO()
    print_analysis_summary({"layers": {}, "errors": {}, "attention_neurons": {"errors": {}, "faithfulness": res}},
                           file=out)
    assert "FAILED faithfulness lrp: LRP is implemented for" in out.getvalue()
    with pytest.raises(ValueError, match="unknown whole-model method 'saliency'"):
        evaluate_faithfulness(model, w[:3], w[3:], None, ["attention_weighted"], whole_model=["saliency"])
