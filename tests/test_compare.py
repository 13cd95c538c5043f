"""Cross-model comparison: attention statistics by hand, like-for-like census, failures, the CLI."""

import json

import pytest
import torch

from mambascope.cli import main
from mambascope.compare import attention_rows, attention_statistics, compare_models
from mambascope.data import load_corpus
from mambascope.models import load_model


def test_attention_statistics_by_hand():
    # one window, L = 3: rows 1 and 2 are what is averaged
    P = torch.tensor([[[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.5, 0.25, 0.25]]])
    s = attention_statistics(P, local_k=1)
    h1 = -(0.25 * torch.log(torch.tensor(0.25)) + 0.75 * torch.log(torch.tensor(0.75)))
    h2 = -(0.5 * torch.log(torch.tensor(0.5)) + 2 * 0.25 * torch.log(torch.tensor(0.25)))
    assert s["entropy"] == pytest.approx(float(h1 + h2) / 2)
    assert s["mean_distance"] == pytest.approx((0.25 * 1 + (0.5 * 2 + 0.25 * 1)) / 2)
    assert s["sink_mass"] == pytest.approx((0.25 + 0.5) / 2)
    assert s["previous_token_mass"] == pytest.approx((0.25 + 0.25) / 2)
    assert s["local_fraction"] == pytest.approx(0.5)  # row 1 keeps 0.75 on itself, row 2 only 0.25


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "gpt2"])
def test_attention_rows_are_distributions(kind, small_checkpoints):
    model, _ = load_model(small_checkpoints[kind], device="cpu")
    P = attention_rows(model, torch.randint(0, 512, (2, 12)))
    for p in P.values():
        assert p.shape == (2, 12, 12)
        assert torch.allclose(p.sum(-1), torch.ones(2, 12), atol=1e-5)
        assert torch.all(p.triu(1) == 0)


def test_compare_reports_failures_and_needs_two(small_checkpoints):
    texts = load_corpus("builtin", "validation").texts[:80]
    models = [small_checkpoints["mamba"], small_checkpoints["gpt2"], "no-such-model"]
    c = compare_models(models, texts, window=32, max_tokens=256, progress=False)
    assert set(c["models"]) == set(models[:2]) and "no-such-model" in c["errors"]
    depths = {(r["model"], r["depth"]) for r in c["layers"]}
    assert (models[0], 1.0) in depths and (models[1], 0.0) in depths
    with pytest.raises(ValueError, match="fewer than two"):
        compare_models([small_checkpoints["mamba"], "no-such-model"], texts, window=32, max_tokens=256,
                       progress=False)


def test_compare_cli(tmp_path, capsys, small_checkpoints):
    out = tmp_path / "cmp"
    code = main(["compare", "--models", small_checkpoints["mamba"], small_checkpoints["mamba2"],
                 small_checkpoints["gpt2"], "--window", "32", "--max-tokens", "256", "--out", str(out), "--quiet"])
    assert code == 0
    comparison = json.loads((out / "comparison.json").read_text())
    assert len(comparison["models"]) == 3
    assert (out / "figures" / "compare_pct_dead.png").stat().st_size > 0
    assert (out / "comparison.parquet").exists()
    page = (out / "comparison.html").read_text()
    assert 'id="comparison"' in page and "data:image/png;base64," in page
    assert "comparison:" in capsys.readouterr().out


def test_compare_cli_on_the_bundled_models(tmp_path, capsys):
    out = tmp_path / "bundled"
    assert main(["compare", "--window", "64", "--max-tokens", "512", "--out", str(out), "--quiet"]) == 0
    comparison = json.loads((out / "comparison.json").read_text())
    assert set(comparison["models"]) == {"tiny-mamba", "tiny-mamba2", "tiny-gpt"}
    assert {r["arch"] for r in comparison["layers"]} == {"mamba", "mamba2", "gpt2"}
