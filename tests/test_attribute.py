"""``mambascope attribute`` end to end on the bundled tiny-mamba, and its bad inputs (issue 20, item 6)."""

import json

import jsonschema
import pytest
import torch

from cli_helpers import one_line, run
from mambascope.attribution.input_attribution import CAPTUM_METHODS, TOKEN_METHODS
from mambascope.cli import main
from mambascope.interventions.knockout import knockout_edits
from mambascope.models import load_model
from mambascope.report import results_schema
from mambascope.trace import trace

TEXT = "def read(self, path):\n    return open(path)."
ATTRIBUTE = ["attribute", "--model", "tiny-mamba", "--quiet"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("attribute") / "a"
    code = main([*ATTRIBUTE, "--text", TEXT, "--out", str(out)])
    return code, out


def test_every_method_row_figure_and_report(written, capsys):
    code, out = written
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    jsonschema.validate(results, results_schema())
    attribution = results["attribution"]
    model, tokenizer = load_model("tiny-mamba")
    ids = tokenizer(TEXT).input_ids
    assert attribution["ids"] == ids and len(attribution["tokens"]) == len(ids)
    # default target: the model's own top prediction at the last position
    logits = trace(model, torch.tensor([ids]), names=[]).logits[0, -1]
    assert attribution["target"]["id"] == int(logits.argmax()) and attribution["target"]["chosen"] == "top prediction"
    assert attribution["target"]["position"] == len(ids) - 1
    assert attribution["methods"] == list(TOKEN_METHODS) and not results["errors"]
    methods = [r["method"] for r in attribution["rows"]]
    assert methods[:5] == [*CAPTUM_METHODS, "lrp", "knockout"]
    n_layers = model.config.num_hidden_layers
    assert methods.count("rollout") == n_layers
    assert all(len(r["relevance"]) == len(ids) for r in attribution["rows"])
    lrp = attribution["rows"][3]  # conservation: what the relevance misses is what the biases absorb
    assert sum(lrp["relevance"]) + lrp["remainder"] == pytest.approx(lrp["logit"], rel=1e-9, abs=1e-9)
    assert lrp["logit"] == pytest.approx(float(logits[attribution["target"]["id"]]), rel=1e-4)
    ig = attribution["rows"][1]
    assert ig["n_steps"] == 64 and "convergence_delta" in ig and "mean input embedding" in ig["baseline"]
    assert (out / "figures" / "attribution.png").stat().st_size > 0
    html = (out / "report.html").read_text()
    assert 'id="attribution"' in html and "IG convergence delta" in html


def test_knockout_row_is_the_knocked_out_forward(written):
    """The knockout row's relevance at j: the target's log-prob drop of the forward with j knocked out of every
    SSM layer, recomputed here with the edits by hand."""
    _, out = written
    attribution = json.loads((out / "results.json").read_text())["attribution"]
    row = next(r for r in attribution["rows"] if r["method"] == "knockout")
    model, _ = load_model("tiny-mamba")
    ids = torch.tensor([attribution["ids"]])
    t = attribution["target"]["id"]
    logits = trace(model, ids, names=[]).logits[0, -1]
    clean = torch.log_softmax(logits.double(), -1)[t]
    # fp32 forwards of another batch shape round differently: a few ulps of the largest logit
    tol = 1e-5 * float(logits.abs().max())
    for j in (0, 5, len(attribution["ids"]) - 2):
        knocked = trace(model, ids, names=[], edits=knockout_edits(model, j)).logits[0, -1]
        drop = float(clean - torch.log_softmax(knocked.double(), -1)[t])
        assert abs(row["relevance"][j] - drop) < tol
        assert abs(drop) > 10 * tol  # the knockout matters here: the comparison can fail
    assert row["relevance"][-1] == 0  # no token after the last one to knock it out of


def test_given_target_position_and_methods(tmp_path, capsys):
    out = tmp_path / "b"
    code, stdout, _ = run(capsys, *ATTRIBUTE, "--text", TEXT, "--target", " return", "--position", "3",
                          "--methods", "occlusion", "gradient_x_input", "--no-report", "--top", "2", "--out", out)
    assert code == 0
    attribution = json.loads((out / "results.json").read_text())["attribution"]
    assert attribution["target"]["position"] == 3 and attribution["target"]["chosen"] == "given"
    assert attribution["target"]["token"] == " return"
    assert [r["method"] for r in attribution["rows"]] == ["occlusion", "gradient_x_input"]
    assert all(v == 0 for r in attribution["rows"] for v in r["relevance"][4:])
    assert "occlusion" in stdout and "' return'" in stdout
    assert not (out / "report.html").exists()


def _no_model(*args, **kwargs):
    raise AssertionError("the model must not load for this error")


@pytest.mark.parametrize("argv,needles", [
    (["--text", "   "], ["--text is empty"]),
    (["--text", TEXT, "--methods", "nope"], ["--methods", "'nope'"]),
    (["--text", TEXT, "--target", " returning values"], ["--target", "single token"]),
    (["--text", TEXT, "--position", "99"], ["--position 99"]),
    (["--text", TEXT, "--ig-steps", "0"], ["--ig-steps"]),
    (["--text", TEXT, "--baseline", "noise"], ["--baseline"]),
], ids=["empty-text", "unknown-method", "target-not-one-token", "position", "ig-steps", "baseline"])
def test_bad_inputs_fail_before_the_model_loads(tmp_path, monkeypatch, capsys, argv, needles):
    import mambascope.models

    monkeypatch.setattr(mambascope.models, "load_model", _no_model)
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *ATTRIBUTE, *argv, "--out", "o")
    assert code == 2
    one_line(err, *needles)
    assert not (tmp_path / "o").exists()


def test_method_the_model_lacks_is_refused(tmp_path, capsys):
    code, _, err = run(capsys, "attribute", "--model", "tiny-gpt", "--quiet", "--text", TEXT, "--methods", "block",
                       "--out", tmp_path / "c")
    assert code == 2
    one_line(err, "--methods block", "Mamba-only")
    assert not (tmp_path / "c").exists()
