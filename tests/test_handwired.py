"""The hand-wired Mamba-1 recall model (mambascope.models.handwired): its recall checked through its own forward, and
the ground-truth table on it, where the construction fixes which position each method must rank first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mambascope.data.tasks import NUM_VALUES, generate, query_correct
from mambascope.models.handwired import VALUE0, handwired_mamba_recall, save_handwired

FINDS_VALUE = ("attention_weighted", "gradient_guided", "rollout", "block")  # handwired.py, "Consequences"


@pytest.fixture(scope="module")
def model():
    return handwired_mamba_recall()


@pytest.mark.parametrize(("num_pairs", "seq_len"), [(8, 64), (16, 80)])
def test_handwired_model_recalls_every_query_by_its_own_forward(model, num_pairs: int, seq_len: int) -> None:
    batch = generate("mqar", 64, seq_len, num_pairs=num_pairs, seed=7)
    with torch.no_grad():
        correct = query_correct(model(input_ids=batch.input_ids).logits, batch)
    assert bool(correct.all()), f"{int((~correct).sum())} of {correct.numel()} queries wrong"


def test_handwired_prediction_follows_the_value_position_only(model) -> None:
    """Changing the token at value_pos changes the prediction to the new value; changing every other pair's
    value leaves it alone: the value position is the source, by the model's own forward."""
    batch = generate("mqar", 32, 64, num_pairs=8, seed=8)
    rows = torch.arange(32)
    q, s = batch.query[:, 0], batch.value_pos[:, 0]
    g = torch.Generator().manual_seed(0)
    moved = batch.input_ids.clone()
    new_value = VALUE0 + (batch.answer[:, 0] - VALUE0 + torch.randint(1, NUM_VALUES, (32,), generator=g)) % NUM_VALUES
    moved[rows, s] = new_value
    others = batch.input_ids.clone()
    value_slots = torch.arange(2, 17, 2)  # the pairs' value positions
    scrambled = VALUE0 + torch.randint(0, NUM_VALUES, (32, 8), generator=g)
    keep = value_slots[None, :] == s[:, None]
    others[:, value_slots] = torch.where(keep, others[:, value_slots], scrambled)
    with torch.no_grad():
        pred_moved = model(input_ids=moved).logits[rows, q].argmax(-1)
        pred_others = model(input_ids=others).logits[rows, q].argmax(-1)
    assert torch.equal(pred_moved, new_value)
    assert torch.equal(pred_others, batch.answer[:, 0])


def test_methods_give_relevance_only_to_the_value_position(model) -> None:
    """The derivation's support claim, on each method's own relevance: nonzero on the context 0..q-1 only at
    value_pos (so value hit@1 = 1 whatever the tie-break), and gradient_x_post exactly 0 on the context
    (one layer: post before the query reaches no later position)."""
    from mambascope.attribution import compute_method, extract

    batch = generate("mqar", 16, 64, num_pairs=8, seed=9)
    q, s = batch.query[:, 0], batch.value_pos[:, 0]
    data = extract(model, batch.input_ids, [0], methods=[*FINDS_VALUE, "gradient_x_post"], query=q,
                   target=batch.answer[:, 0], store="rows")
    assert not data.errors
    context = torch.arange(64)[None, :] < q[:, None]
    at_value = torch.zeros(16, 64, dtype=torch.bool)
    at_value[torch.arange(16), s] = True
    for method in FINDS_VALUE:
        rel = compute_method(data, method)[0]["relevance"]
        assert bool((rel[at_value] > 0).all()), method
        assert bool((rel[context & ~at_value] == 0).all()), method
    post = compute_method(data, "gradient_x_post")[0]["relevance"]
    assert bool((post[context] == 0).all())


def test_ground_truth_table_on_the_handwired_model(model) -> None:
    from mambascope.attribution.ground_truth import run_ground_truth

    res = run_ground_truth(model, {"task": "mqar", "seq_len": 64, "num_pairs": 8, "seed": 0}, n_queries=48,
                           batch_size=16)
    assert not res["errors"] and res["task_accuracy"] == 1.0 and res["layers"] == [0]
    rows = {(r["source"], r["method"], r["layer"]): r for r in res["rows"]}
    assert {m for _, m, layer in rows if layer == 0} == {*FINDS_VALUE, "gradient_x_post"}
    for method in FINDS_VALUE:
        row = rows[("value", method, 0)]
        assert row["hit_rate"]["mean"] == 1.0 and row["mrr"]["mean"] == 1.0
        assert row["beats_random"]["mrr"] and row["beats_recency"]["mrr"]
        assert rows[("key", method, 0)]["hit_rate"]["mean"] == 0.0  # the value outranks the key (relevance 0)


def test_attention_task_cli_runs_on_the_saved_handwired_model(tmp_path: Path) -> None:
    from mambascope.cli import main

    path = save_handwired(tmp_path / "handwired")
    code = main(["attention", "--model", str(path), "--task", "mqar", "--queries", "16", "--out",
                 str(tmp_path / "gt"), "--device", "cpu", "--no-report"])
    assert code == 0
    truth = json.loads((tmp_path / "gt" / "results.json").read_text())["ground_truth"]
    assert truth["task_accuracy"] == 1.0 and truth["n_queries"] == 16
    for method in FINDS_VALUE:
        row = next(r for r in truth["rows"] if (r["source"], r["method"]) == ("value", method))
        assert row["hit_rate"]["mean"] == 1.0
