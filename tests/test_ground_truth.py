"""Synthetic tasks (mambascope.data.tasks), task training, and attribution accuracy against ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mambascope.attribution.bootstrap import bootstrap_mean
from mambascope.attribution.ground_truth import (
    attribution_accuracy,
    ground_truth_table,
    one_query_per_example,
    source_ranks,
)
from mambascope.data.tasks import IGNORE, TASKS, generate, task_tokenizer, task_vocab

# --- generators: ground truth checked by a plain loop over the tokens ------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_generator_ground_truth_by_loop(task: str) -> None:
    batch = generate(task, 20, 64, num_pairs=8, seed=3)
    vocab = task_vocab()
    n, T = batch.input_ids.shape
    assert T == 64 and batch.query.shape == batch.key_pos.shape == batch.value_pos.shape
    for i in range(n):
        words = [vocab[t] for t in batch.input_ids[i].tolist()]
        assert words[0] == "<|endoftext|>"
        for j in range(batch.query.shape[1]):
            q, k, v = int(batch.query[i, j]), int(batch.key_pos[i, j]), int(batch.value_pos[i, j])
            # the query token is the key; the answer is the token after the key's first occurrence
            assert words[q] == words[k] and words.index(words[q]) == k and v == k + 1 < q
            assert int(batch.answer[i, j]) == batch.input_ids[i, v]
            # copy: the answer is the next input token; MQAR: the input there is filler (no leaked answers)
            assert words[q + 1] == (words[v] if task == "copy" else "_")
        # only the answer positions carry labels
        labelled = sorted((batch.labels[i] != IGNORE).nonzero()[:, 0].tolist())
        assert labelled == sorted((batch.query[i] + 1).tolist())
        if task == "mqar":
            pairs = words[1:17]
            keys = pairs[0::2]
            assert len(set(keys)) == 8 and all(w.startswith("k") for w in keys)
            assert all(w.startswith("v") for w in pairs[1::2])
            asked = set(batch.query[i].tolist())
            rest = [w for p, w in enumerate(words) if p >= 17 and p not in asked]
            assert set(rest) == {"_"}  # the query region is filler except the query keys
            assert sorted(words[int(q)] for q in batch.query[i]) == sorted(keys)  # every key asked once
        else:
            half = (T - 2) // 2
            assert words[half + 1] == "|" and words[1:half + 1] == words[half + 2:]
            assert len(set(words[1:half + 1])) == half


def test_generator_is_seeded_and_checks_sizes() -> None:
    a, b, c = generate("mqar", 4, seed=1), generate("mqar", 4, seed=1), generate("mqar", 4, seed=2)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    with pytest.raises(ValueError, match="too short"):
        generate("mqar", 1, 32, num_pairs=8)
    with pytest.raises(ValueError, match="unknown task"):
        generate("induction", 1)
    with pytest.raises(ValueError, match="even seq_len"):
        generate("copy", 1, 63)


def test_task_tokenizer_round_trips(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = task_tokenizer()
    batch = generate("mqar", 2, seed=0)
    text = tok.decode(batch.input_ids[0].tolist())
    assert tok(text, add_special_tokens=False)["input_ids"] == batch.input_ids[0].tolist()
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == batch.input_ids[0].tolist()


# --- ranks, hit rate, MRR: against a hand computation -------------------------------------------------------


def test_source_ranks_hand_computed() -> None:
    # row 0: query 4, context scores [0.1, 0.9, 0.5, 0.2] -> order 1, 2, 3, 0; source 2 has rank 2
    # row 1: query 3, context scores [0.3, 0.1, 0.7]; position 3.. (after the query) must be ignored even
    #        though it scores highest; source 2 has rank 1
    rel = torch.tensor([[0.1, 0.9, 0.5, 0.2, 5.0, 0.0], [0.3, 0.1, 0.7, 9.0, 9.0, 9.0]])
    ranks = source_ranks(rel, torch.tensor([4, 3]), torch.tensor([2, 2]), torch.Generator().manual_seed(0))
    assert ranks.tolist() == [2, 1]
    with pytest.raises(ValueError, match="context"):
        source_ranks(rel, torch.tensor([4, 3]), torch.tensor([4, 0]), torch.Generator())


def test_hit_rate_and_mrr_match_a_hand_computation() -> None:
    from mambascope.attribution import ground_truth as gt

    ranks = torch.tensor([1, 2, 4, 1])
    st = gt.rank_stats(ranks, seed=0)
    assert st["hit_rate"]["mean"] == pytest.approx(0.5)
    assert st["mrr"]["mean"] == pytest.approx((1 + 0.5 + 0.25 + 1) / 4)
    expected = gt._random_expectation(torch.tensor([2, 4]))
    assert expected["hit_rate"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert expected["mrr"] == pytest.approx(((1 + 1 / 2) / 2 + (1 + 1 / 2 + 1 / 3 + 1 / 4) / 4) / 2)


# --- bootstrap -------------------------------------------------------------------------------------------------


def test_bootstrap_interval_sanity() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, 400)
    ci = bootstrap_mean(x, seed=0)
    se = 2.0 / np.sqrt(400)
    assert ci["low"] < x.mean() < ci["high"]
    assert ci["high"] - ci["low"] == pytest.approx(2 * 1.96 * se, rel=0.15)  # the normal-theory width
    wide = bootstrap_mean(x[:100], seed=0)
    assert (wide["high"] - wide["low"]) > 1.6 * (ci["high"] - ci["low"])  # ~ 1/sqrt(n)
    assert bootstrap_mean(x, seed=0) == ci  # seeded
    const = bootstrap_mean([3.0] * 10)
    assert const["low"] == const["high"] == 3.0
    one = bootstrap_mean([2.5])
    assert one["mean"] == 2.5 and one["low"] is None and one["high"] is None
    # coverage: of 200 samples of n = 50 from N(0, 1), about 95 % of the intervals hold 0
    hits = 0
    for s in range(200):
        sample = rng.normal(0, 1, 50)
        r = bootstrap_mean(sample, n_boot=500, seed=s)
        hits += r["low"] < 0 < r["high"]
    assert 0.88 <= hits / 200 <= 0.99


# --- attribution accuracy on a model ---------------------------------------------------------------------------


def _tiny_task_model(arch: str):
    from transformers import AutoModelForCausalLM

    from mambascope.models.train import build_config

    shapes = {"mamba": {"hidden_size": 16, "num_hidden_layers": 2, "state_size": 4},
              "gpt2": {"n_embd": 16, "n_layer": 2, "n_head": 2, "n_inner": 32}}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(build_config(arch, len(task_vocab()), 0, 64, **shapes[arch])).eval()


@pytest.mark.parametrize("arch", ["mamba", "gpt2"])
def test_attribution_accuracy_rows_and_baselines(arch: str) -> None:
    model = _tiny_task_model(arch)
    batch = generate("mqar", 24, 64, seed=5)
    res = attribution_accuracy(model, batch, [0, 1], ["attention_weighted", "rollout"], seed=0, batch_size=10)
    json.dumps(res, allow_nan=False)
    assert res["n_queries"] == 24 and res["task_accuracy_queries"] == 24 * 8 and not res["errors"]
    pick = one_query_per_example(batch, 0)
    # recency's ranks are q - s exactly: its MRR is the mean of 1/(q - s)
    for source in ("value", "key"):
        rec = next(r for r in res["rows"] if r["source"] == source and r["method"] == "recency")
        want = (1.0 / (pick["query"] - pick[f"{source}_pos"]).double()).mean()
        assert rec["mrr"]["mean"] == pytest.approx(float(want))
        rnd = next(r for r in res["rows"] if r["source"] == source and r["method"] == "random")
        assert rnd["expected"]["hit_rate"] == pytest.approx(float((1.0 / pick["query"].double()).mean()))
    rows = [r for r in res["rows"] if r["layer"] is not None]
    assert {(r["source"], r["method"], r["layer"]) for r in rows} == {
        (s, m, layer) for s in ("value", "key") for m in ("attention_weighted", "rollout") for layer in (0, 1)}
    for r in rows:
        for metric in ("hit_rate", "mrr"):
            assert r[metric]["low"] <= r[metric]["mean"] <= r[metric]["high"]
            assert r["beats_random"][metric] == (r["vs_random"][metric]["low"] > 0)
    # the method's value-source hit rate, recomputed from its own relevance and a plain argmax
    from mambascope.attribution import compute_method, extract

    order = torch.argsort(pick["query"], stable=True)
    data = extract(model, batch.input_ids[order], [1], methods=["attention_weighted"], query=pick["query"][order],
                   store="rows")
    rel = compute_method(data, "attention_weighted")[1]["relevance"]
    q = pick["query"][order]
    masked = torch.where(torch.arange(64)[None, :] < q[:, None], rel, -torch.inf)
    top = masked.argmax(1)
    ties = (masked == masked.max(1, keepdim=True).values).sum(1)
    assert bool((ties == 1).all())  # continuous scores: no ties, so the top-1 is the plain argmax
    row = next(r for r in rows if (r["source"], r["method"], r["layer"]) == ("value", "attention_weighted", 1))
    assert row["hit_rate"]["mean"] == pytest.approx(float((top == pick["value_pos"][order]).double().mean()))
    table = ground_truth_table(res)
    assert {"random", "recency", "attention_weighted", "rollout"} == set(table["method"])


def test_train_task_and_attention_cli(tmp_path: Path) -> None:
    """A few steps of task training save a loadable checkpoint; ``attention --task`` writes the table."""
    from mambascope.cli import main
    from mambascope.models import load_model
    from mambascope.models.train_task import train_task

    out = tmp_path / "m"
    stats = train_task("gpt2", "mqar", out, steps=2, batch_size=4, eval_examples=8, device="cpu", log=lambda _: None,
                       config_overrides={"n_embd": 16, "n_layer": 2, "n_head": 2, "n_inner": 32})
    assert stats["heldout_queries"] == 64 and 0 <= stats["heldout_query_accuracy"] <= 1
    model, tok = load_model(str(out), device="cpu")
    assert len(tok) == len(task_vocab()) and type(model).__name__ == "GPT2LMHeadModel"
    code = main(["attention", "--model", str(out), "--task", "mqar", "--queries", "16", "--out", str(tmp_path / "gt"),
                 "--device", "cpu", "--methods", "attention_weighted", "rollout"])
    assert code == 0
    results = json.loads((tmp_path / "gt" / "results.json").read_text())
    assert results["ground_truth"]["n_queries"] == 16 and results["ground_truth"]["task"] == "mqar"
    assert (tmp_path / "gt" / "figures" / "ground_truth.png").stat().st_size > 5000
    html = (tmp_path / "gt" / "report.html").read_text()
    assert '<section id="ground-truth">' in html and "recency" in html
    schema = json.loads((Path(__file__).parents[1] / "src/mambascope/report/results_schema.json").read_text())
    import jsonschema

    jsonschema.validate(results, schema)
    assert main(["attention", "--model", str(out), "--task", "nope"]) == 2
    assert main(["attention", "--model", str(out), "--task", "copy", "--out", str(tmp_path / "x")]) == 2


def test_extract_explains_a_given_target() -> None:
    """MQAR's answer is not the next input token: ``extract(target=...)`` explains the answer's log-prob."""
    from mambascope.attribution import extract

    model = _tiny_task_model("mamba")
    batch = generate("mqar", 3, 64, seed=2)
    pick = one_query_per_example(batch, 0)
    data = extract(model, batch.input_ids, [1], methods=["gradient_guided"], query=pick["query"],
                   target=pick["answer"], store="rows")
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids).logits
    want = torch.log_softmax(logits[torch.arange(3), pick["query"]], -1)[torch.arange(3), pick["answer"]]
    assert torch.allclose(data.target_logprob, want, atol=1e-4)
    assert data.target_kind == ["given"] * 3 and torch.equal(data.target_token, pick["answer"])
    with pytest.raises(ValueError, match="one token per row"):
        extract(model, batch.input_ids, [1], methods=["rollout"], query=pick["query"], target=pick["answer"][:2])


def test_source_ranks_refuse_non_finite_relevance_naming_the_method() -> None:
    # a NaN would sort first and count as a hit; a method that emits one is refused by name
    rel = torch.tensor([[0.1, float("nan"), 0.3, 0.2, 0.0], [0.5, 0.4, 0.3, 0.2, 0.1]])
    with pytest.raises(ValueError, match=r"^gradient_x_post at layer 2: non-finite relevance .* 1 of 7 context"):
        source_ranks(rel, torch.tensor([4, 3]), torch.tensor([1, 2]), torch.Generator().manual_seed(0),
                     "gradient_x_post at layer 2")
    # after the query (outside the context) a non-finite value is never ranked
    rel[1, 4] = float("inf")
    ranks = source_ranks(rel[1:], torch.tensor([3]), torch.tensor([0]), torch.Generator().manual_seed(0))
    assert ranks.tolist() == [1]


def test_whole_model_rows_are_scored_from_each_querys_relevance() -> None:
    """``whole_model=``: one row per source and method with layer None, whose hit rate is that of the method's
    own relevance for log p(answer) at each query, recomputed here query by query."""
    from mambascope.attribution.input_attribution import gradient_x_input

    model = _tiny_task_model("mamba")
    batch = generate("mqar", 12, 64, seed=5)
    res = attribution_accuracy(model, batch, [0], ["attention_weighted"], seed=0, batch_size=12,
                               whole_model=["gradient_x_input", "knockout"])
    assert not res["errors"] and res["whole_model_methods"] == ["gradient_x_input", "knockout"]
    whole = {(r["source"], r["method"]): r for r in res["rows"] if r["method"] in ("gradient_x_input", "knockout")}
    assert set(whole) == {(s, m) for s in ("value", "key") for m in ("gradient_x_input", "knockout")}
    assert all(r["layer"] is None and "beats_random" in r for r in whole.values())
    pick = one_query_per_example(batch, 0)
    hits = []
    for i in range(12):
        q = int(pick["query"][i])
        rel = gradient_x_input(model, batch.input_ids[i], q, int(pick["answer"][i])).relevance[:q]
        assert int((rel == rel.max()).sum()) == 1  # continuous scores: the top-1 is the plain argmax
        hits.append(int(rel.argmax()) == int(pick["value_pos"][i]))
    assert whole[("value", "gradient_x_input")]["hit_rate"]["mean"] == pytest.approx(sum(hits) / 12)
    with pytest.raises(ValueError, match="unknown whole-model method 'rollout'"):
        attribution_accuracy(model, batch, [0], ["attention_weighted"], whole_model=["rollout"])
