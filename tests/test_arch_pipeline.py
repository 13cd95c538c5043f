"""A hybrid (Nemotron-H: Mamba-2, attention and MLP layers) through analyze, report and compare."""

import json

import pytest
import torch
from transformers import NemotronHConfig, NemotronHForCausalLM

from mambascope.cli import main

PATTERN = ["linear_attention", "mlp", "full_attention", "linear_attention"]


@pytest.fixture(scope="module")
def hybrid_checkpoint(tmp_path_factory, small_tokenizer):
    torch.manual_seed(0)
    special = small_tokenizer.eos_token_id
    config = NemotronHConfig(vocab_size=len(small_tokenizer), hidden_size=32, layers_block_type=PATTERN,
                             mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=1, chunk_size=16,
                             intermediate_size=48, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                             bos_token_id=special, eos_token_id=special, pad_token_id=special)
    path = tmp_path_factory.mktemp("ckpt-hybrid")
    NemotronHForCausalLM(config).save_pretrained(path)
    small_tokenizer.save_pretrained(path)
    return str(path)


def test_analyze_a_hybrid(tmp_path, hybrid_checkpoint):
    out = tmp_path / "hyb"
    # every method named, rollout included (analyze's default leaves it out)
    code = main(["analyze", "--model", hybrid_checkpoint, "--window", "32", "--max-tokens", "512", "--draws", "3",
                 "--out", str(out), "--quiet", "--device", "cpu", "--methods", "attention_weighted",
                 "gradient_guided", "rollout", "block", "gradient_x_post"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["layer_kinds"] == ["mamba2", "mlp", "attention", "mamba2"]
    # the attention-only layer has no neurons: skipped by name; the others carry their kind
    assert set(results["layers"]) == {"0", "1", "3"}
    assert {k: r["layer_kind"] for k, r in results["layers"].items()} == {"0": "mamba2", "1": "mlp", "3": "mamba2"}
    assert results["census"]["skipped_layers"] == {"2": "attention layer: no neurons"}
    assert results["layers"]["1"]["delta_sensitive"] is None and results["layers"]["0"]["delta_sensitive"]
    assert "attention_rows" in results["layers"]["0"] and "attention_rows" not in results["layers"]["1"]
    assert results["ablation"]["groups"]["dead"] and results["pruning"]["ratios"]
    attention = results["attention_neurons"]
    assert sorted(int(layer) for layer in attention["layers"]) == [0, 3]
    assert "rollout" in attention["errors"] and "not SSM layers" in attention["errors"]["rollout"]
    # the whole-model methods by default: MambaLRP's rules cover Nemotron-H's SSM, attention and MLP layers
    assert attention["faithfulness"]["whole_model_methods"] == ["lrp", "gradient_x_input"]
    assert attention["faithfulness"]["token"] is None or set(attention["faithfulness"]["token"]["whole_model"]) == {
        "lrp", "gradient_x_input"}
    assert set(results["errors"]) == set()
    page = (out / "report.html").read_text()
    assert "1 (mlp)" in page and "0 (mamba2)" in page


def test_compare_a_hybrid_with_pure_models(tmp_path, hybrid_checkpoint, small_checkpoints):
    out = tmp_path / "cmp"
    code = main(["compare", "--models", small_checkpoints["mamba2"], hybrid_checkpoint, small_checkpoints["gpt2"],
                 "--window", "32", "--max-tokens", "256", "--out", str(out), "--quiet"])
    assert code == 0
    comparison = json.loads((out / "comparison.json").read_text())
    rows = [r for r in comparison["layers"] if r["arch"] == "nemotron_h"]
    assert [r["layer_kind"] for r in rows] == ["mamba2", "mlp", "attention", "mamba2"]
    assert rows[2]["entropy"] is not None and "entropy" not in rows[1]  # real softmax pattern; MLP has none


def test_analyze_leaves_rollout_out_of_its_default_methods(small_checkpoints):
    """``analyze`` without --methods: every method the model supports but rollout; --methods and the other
    commands are passed through unchanged."""
    import argparse

    from mambascope.cli import _attention_methods
    from mambascope.models import load_model

    mamba, _ = load_model(small_checkpoints["mamba2"], device="cpu")
    gpt, _ = load_model(small_checkpoints["gpt2"], device="cpu")
    analyze = argparse.Namespace(command="analyze", methods=None)
    assert _attention_methods(analyze, mamba) == ["attention_weighted", "gradient_guided", "block", "gradient_x_post"]
    assert _attention_methods(analyze, gpt) == ["attention_weighted", "gradient_guided", "gradient_x_post"]
    named = argparse.Namespace(command="analyze", methods=["rollout"])
    assert _attention_methods(named, mamba) == ["rollout"]
    assert _attention_methods(argparse.Namespace(command="attention", methods=None), mamba) is None


def test_whole_model_methods_default_to_the_cheap_ones_the_model_supports(small_checkpoints):
    """``--whole-model-methods``: lrp and gradient × input by default, lrp only where the family has its rules;
    ``none`` runs none; names pass through; analyze's token level scores 32 windows, attention's 64."""
    import argparse

    from mambascope.cli import _whole_model_methods, build_parser
    from mambascope.models import load_model
    from test_ssm_state import FAMILIES

    mamba, _ = load_model(small_checkpoints["mamba2"], device="cpu")
    default, none = argparse.Namespace(whole_model_methods=None), argparse.Namespace(whole_model_methods=["none"])
    assert _whole_model_methods(default, mamba) == ["lrp", "gradient_x_input"]
    assert _whole_model_methods(none, mamba) == []
    named = argparse.Namespace(whole_model_methods=["occlusion", "lrp"])
    assert _whole_model_methods(named, mamba) == ["occlusion", "lrp"]
    # a family without LRP rules (Zamba2's shared blocks re-read the embeddings)
    assert _whole_model_methods(default, FAMILIES["zamba2"]()) == ["gradient_x_input"]
    parser = build_parser()
    assert parser.parse_args(["analyze"]).token_windows == 32
    assert parser.parse_args(["attention"]).token_windows == 64
