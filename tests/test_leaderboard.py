"""The attribution leaderboard (mambascope.attribution.leaderboard) and ΔA^F (attribution/token_flipping.py):
its scores against the ground-truth scorer and against a plain count of ranks, its knockout effect against
hand-made forward hooks on the model's own forward, ΔA^F's curves against a slow loop, and the CLI's
results.json against the schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from mambascope.attribution.ground_truth import attribution_accuracy
from mambascope.attribution.input_attribution import TOKEN_METHODS, Settings, baseline_embedding
from mambascope.attribution.leaderboard import (
    baseline_entries,
    knockout_drop,
    neuron_entries,
    score_entries,
    task_models,
    task_queries,
    whole_model_entries,
)
from mambascope.attribution.token_flipping import curve_area, flip_orders, flipping_curves, flipping_faithfulness
from mambascope.cli import main
from mambascope.models import load_model
from mambascope.models.handwired import NAME as HANDWIRED
from mambascope.models.handwired import handwired_mamba_recall
from mambascope.models.train_task import heldout_task_batch
from mambascope.report import results_schema


@pytest.fixture(scope="module")
def gpt_mqar():
    return load_model("tiny-gpt-mqar", device="cpu")[0]


@pytest.fixture(scope="module")
def mqar_batch():
    return heldout_task_batch("mqar", 10, 64, 8, 0)


def test_task_models_are_read_from_training_json() -> None:
    models = task_models()
    assert {"tiny-mamba2-mqar", "tiny-gpt-mqar", "tiny-gpt-copy", "tiny-mamba2-copy"} <= set(models)
    assert "tiny-mamba" not in models and models[-1] == HANDWIRED


def test_leaderboard_rows_match_the_ground_truth_scorer(gpt_mqar, mqar_batch) -> None:
    """The leaderboard's rows equal attribution_accuracy's (same queries, same bootstrap) for every method whose
    relevance has no ties (the scorers break ties with different draws)."""
    methods = ["attention_weighted", "gradient_guided", "rollout"]
    tq = task_queries(mqar_batch, 0)
    errors: dict[str, str] = {}
    entries = [e for e in neuron_entries(gpt_mqar, tq, errors) if e.method in methods]
    entries += whole_model_entries(gpt_mqar, tq, errors, methods=["occlusion"])
    rows = score_entries(gpt_mqar, tq, [*baseline_entries(tq, 0), *entries], errors)
    assert not errors
    truth = attribution_accuracy(gpt_mqar, mqar_batch, methods=methods, whole_model=["occlusion"])
    board = {(r["method"], r["layer"]): r for r in rows}
    tied = {(e.method, e.layer) for e in entries
            if any(e.relevance[i, :q].unique().numel() < q for i, q in enumerate(tq.query.tolist()))}
    compared = 0
    for r in truth["rows"]:
        if r["method"] == "random" or (r["method"], r["layer"]) in tied:
            continue
        mine = board[(r["method"], r["layer"])][r["source"]]
        for metric in ("hit_rate", "mrr"):
            for k in ("mean", "low", "high"):
                assert mine[metric][k] == pytest.approx(r[metric][k], abs=1e-12), (r["method"], r["layer"], metric)
        if "beats_random" in r:
            assert mine["vs_recency"]["mrr"]["mean"] == pytest.approx(r["vs_recency"]["mrr"]["mean"], abs=1e-12)
        compared += 1
    assert compared >= 2 * 4 and len(tied) <= 3  # both sources of recency and of most methods


def test_leaderboard_hits_equal_a_plain_count_from_single_queries(gpt_mqar, mqar_batch) -> None:
    """Independent path: each query's relevance from the single-prediction registry (its own extraction), the
    rank of the value counted by hand (1 + context positions with larger relevance)."""
    tq = task_queries(mqar_batch, 0)
    errors: dict[str, str] = {}
    entries = [e for e in neuron_entries(gpt_mqar, tq, errors) if e.method == "rollout" and e.layer == 1]
    entries += whole_model_entries(gpt_mqar, tq, errors, methods=["occlusion"])
    rows = {r["method"]: r for r in score_entries(gpt_mqar, tq, entries, errors)}
    for method, pick in (("rollout", lambda rs: rs[1]), ("occlusion", lambda rs: rs[0])):
        hits, rrs = [], []
        for i in range(tq.ids.shape[0]):
            q, v = int(tq.query[i]), int(tq.value_pos[i])
            rel = pick(TOKEN_METHODS[method](gpt_mqar, tq.ids[i], q, int(tq.answer[i]), Settings())).relevance[:q]
            rank = 1 + int((rel > rel[v]).sum())
            hits.append(float(rank == 1))
            rrs.append(1.0 / rank)
        assert rows[method]["value"]["hit_rate"]["mean"] == pytest.approx(np.mean(hits), abs=1e-12)
        assert rows[method]["value"]["mrr"]["mean"] == pytest.approx(np.mean(rrs), abs=1e-9)


def _eager_knockout_logprob(model, ids: torch.Tensor, query: int, answer: int, source: int | None) -> float:
    """log p(answer) at query from GPT-2's own eager forward, with key ``source`` hidden from every later query
    in every layer by a hand-made additive mask passed to each attention module (a forward pre-hook)."""
    L = ids.shape[0]
    mask = torch.full((L, L), float("-inf")).triu(1)
    if source is not None:
        mask[source + 1:, source] = float("-inf")

    def pre(module, args, kwargs):
        return args, kwargs | {"attention_mask": mask[None, None]}

    before = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    handles = [block.attn.register_forward_pre_hook(pre, with_kwargs=True) for block in model.transformer.h]
    try:
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0, query].double()
    finally:
        for h in handles:
            h.remove()
        model.config._attn_implementation = before
    return float(torch.log_softmax(logits, -1)[answer])


def test_knockout_effect_matches_a_hand_made_attention_mask(gpt_mqar, mqar_batch) -> None:
    tq = task_queries(mqar_batch, 0)
    n = 4
    sources = torch.stack([tq.value_pos[:2], tq.key_pos[2:4]]).reshape(-1)[:n]
    drop = knockout_drop(gpt_mqar, tq.ids[:n], tq.query[:n], tq.answer[:n], sources)
    for i in range(n):
        q, a = int(tq.query[i]), int(tq.answer[i])
        expected = (_eager_knockout_logprob(gpt_mqar, tq.ids[i], q, a, None)
                    - _eager_knockout_logprob(gpt_mqar, tq.ids[i], q, a, int(sources[i])))
        assert float(drop[i]) == pytest.approx(expected, abs=2e-4)
    assert float(drop[0]) > 1.0  # the recalled value matters on this model


def test_knockout_effect_matches_a_hand_made_scan_hook() -> None:
    """One-layer Mamba-1 (the hand-wired model): knocking s out of every later token's scan output is, at a
    later query, the model's own forward with B_s zeroed at x_proj's output (B̄_s·u_s never enters the state;
    position s's own output reaches no later position in one layer)."""
    model = handwired_mamba_recall()
    batch = heldout_task_batch("mqar", 6, 64, 8, 0)
    tq = task_queries(batch, 0)
    mixer = model.backbone.layers[0].mixer
    R, N = mixer.time_step_rank, mixer.ssm_state_size
    sources = torch.cat([tq.value_pos[:3], tq.value_pos[3:] - 1])
    drop = knockout_drop(model, tq.ids, tq.query, tq.answer, sources)
    for i in range(tq.ids.shape[0]):
        def zero_b(module, args, out, s=int(sources[i])):
            out = out.clone()
            out[:, s, R:R + N] = 0
            return out

        with torch.no_grad():
            clean = model(input_ids=tq.ids[i:i + 1]).logits[0, tq.query[i]].double().log_softmax(-1)
            handle = mixer.x_proj.register_forward_hook(zero_b)
            try:
                knocked = model(input_ids=tq.ids[i:i + 1]).logits[0, tq.query[i]].double().log_softmax(-1)
            finally:
                handle.remove()
        a = int(tq.answer[i])
        assert float(drop[i]) == pytest.approx(float(clean[a] - knocked[a]), abs=1e-4)
    assert (drop[:3] > 1.0).all()  # the value is the source by construction


@pytest.fixture(scope="module")
def tiny_gpt():
    return load_model("tiny-gpt", device="cpu")


def test_flipping_curves_match_a_slow_loop(tiny_gpt) -> None:
    """Each point of the MoRF and LeRF curves equals the model's own forward on inputs_embeds with the flipped
    rows replaced by the mean embedding, one flip count at a time; the area is the trapezoid rule."""
    model, tok = tiny_gpt
    ids = torch.tensor(tok("def read(self, path):\n    return open(path).read()").input_ids[:12])
    P = ids.shape[0] - 1
    with torch.no_grad():
        y = int(model(input_ids=ids[None]).logits[0, P].argmax())
    rel = TOKEN_METHODS["occlusion"](model, ids, P, y, Settings())[0].relevance[:P]
    orders = flip_orders(rel, torch.Generator().manual_seed(0))
    curves = flipping_curves(model, ids, P, y, orders)
    emb = model.get_input_embeddings()(ids[None]).detach()
    base = baseline_embedding(model, emb, "mean")
    for order, curve in zip(orders, curves, strict=True):
        assert sorted(order.tolist()) == list(range(P))
        for k in range(P + 1):
            e = emb.clone()
            e[0, order[:k]] = base[0, order[:k]]
            with torch.no_grad():
                logits = model(inputs_embeds=e).logits[0, P].double()
            assert float(curve["logit"][k]) == pytest.approx(float(logits[y]), abs=1e-4)
            assert float(curve["accuracy"][k]) == float(int(logits.argmax()) == y)
        m = curve["logit"].numpy()
        assert curve_area(curve["logit"]) == pytest.approx(sum((m[k] + m[k + 1]) / 2 for k in range(P)) / P)
    assert bool((rel[orders[0]].diff() <= 0).all()) and bool((rel[orders[1]].diff() >= 0).all())  # MoRF, LeRF


def test_flipping_faithfulness_against_a_loop_and_the_schema(tiny_gpt) -> None:
    model, tok = tiny_gpt
    from mambascope.attribution.leaderboard import lm_windows

    windows = lm_windows(tok, 12, 12)
    result = flipping_faithfulness(model, windows, n_positions=3, methods=("occlusion", "random"))
    assert result["n_positions"] == 3 and not result["errors"]
    P = windows.shape[1] - 1
    gen = torch.Generator().manual_seed(0)
    deltas = []
    for pos in result["positions"]:  # occlusion, by hand
        w, y = pos["window"], pos["target"]
        rel = TOKEN_METHODS["occlusion"](model, windows[w], P, y, Settings())[0].relevance[:P]
        morf, lerf = flipping_curves(model, windows[w], P, y, flip_orders(rel, gen))
        deltas.append(curve_area(lerf["logit"]) - curve_area(morf["logit"]))
        # context-dependent: with the whole context flipped, y is no longer the top prediction
        assert morf["logit"].numel() == P + 1 and float(morf["accuracy"][-1]) == 0.0 == float(lerf["accuracy"][-1])
    row = next(r for r in result["rows"] if r["method"] == "occlusion" and r["metric"] == "logit")
    assert row["delta_a_f"]["mean"] == pytest.approx(float(np.mean(deltas)), abs=1e-6)  # fp32 forwards
    doc = {"model": {"name": "leaderboard", "arch": "several"}, "corpus": {"name": "builtin"}, "errors": {},
           "leaderboard": {"models": {}, "flipping": {"tiny-gpt": json.loads(json.dumps(result))}, "errors": {},
                           "timings": {}, "table": []}}
    jsonschema.Draft202012Validator(results_schema()).validate(doc)


def test_cli_leaderboard_writes_a_valid_results_file(tmp_path: Path, capsys) -> None:
    out = tmp_path / "board"
    rc = main(["leaderboard", "--models", HANDWIRED, "--lm-models", "--queries", "4", "--out", str(out),
               "--quiet"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    jsonschema.Draft202012Validator(results_schema()).validate(results)
    board = results["leaderboard"]["models"][HANDWIRED]
    methods = {r["method"] for r in board["rows"]}
    assert {"random", "recency", "attention_weighted", "block", "layer_map", "layer_map_rollout_no_conv",
            "integrated_gradients", "lrp", "knockout"} <= methods
    for r in board["rows"]:
        if r["method"] in ("attention_weighted", "gradient_guided", "block", "lrp", "occlusion"):
            assert r["value"]["hit_rate"]["mean"] == 1.0  # the construction's source (models/handwired.py)
            assert r["knockout_effect"]["mean"] == pytest.approx(board["knockout_reference"]["value"]["mean"])
    assert (out / "figures" / "leaderboard.png").is_file()
    html = (out / "report.html").read_text()
    assert '<section id="leaderboard">' in html and "layer_map_rollout_no_conv" in html
    assert "ms/query" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--models", "tiny-mamba"], "not a task model"),
    (["--lm-models", "tiny-gpt-mqar"], "not a bundled language model"),
    (["--queries", "1"], "--queries"),
    (["--flip-positions", "1"], "--flip-positions"),
])
def test_cli_leaderboard_bad_input_exits_2(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    out = tmp_path / "board"
    assert main(["leaderboard", *argv, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
