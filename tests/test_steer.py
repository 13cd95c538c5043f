"""``mambascope steer``: a neuron or a dictionary feature steered during generation, checked against greedy
decoding by full HF forwards with hand-written hooks; bad input is one line and exit 2, before the model loads."""

import json

import pytest
import torch
from safetensors.torch import save_file

import mambascope.models
from cli_helpers import run
from mambascope import load_model
from mambascope.arch import adapter

PROMPT = "The quick brown fox"


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("mambascope")]
    assert len(lines) == 1, err
    return lines[0]


def _steer_feature(capsys, tmp_path, feature: str, scale: float, new: int) -> dict:
    """``mambascope steer --feature DIR:i`` on tiny-mamba; its steer.json."""
    out = tmp_path / "steer"
    code, _, _ = run(capsys, "steer", "--model", "tiny-mamba", "--device", "cpu", "--prompt", PROMPT, "--feature",
                     feature, "--scale", scale, "--max-new-tokens", new, "--out", out, "--quiet")
    assert code == 0
    return json.loads((out / "steer.json").read_text())


def _slow_greedy(model, ids, new, module, hook, pre):
    """Greedy decoding by a full HF forward over the whole sequence at every step, ``hook`` on ``module``."""
    handle = module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for _ in range(new):
                ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    finally:
        handle.remove()
    return ids


@pytest.fixture(scope="module")
def mamba():
    return load_model("tiny-mamba", device="cpu")


def test_unit_steering_matches_hf_hooks(tmp_path, capsys, mamba):
    model, tokenizer = mamba
    layer, neuron, scale, new = 1, 12, 20.0, 8
    out = tmp_path / "steer"
    code, stdout, _ = run(capsys, "steer", "--model", "tiny-mamba", "--device", "cpu", "--prompt", PROMPT,
                           "--unit", f"{layer}:{neuron}", "--scale", str(scale), "--max-new-tokens", str(new),
                           "--out", str(out), "--quiet")
    assert code == 0
    record = json.loads((out / "steer.json").read_text())
    assert record["hook_name"] == f"blocks.{layer}.mixer.hook_post" and record["mode"] == "add"
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    assert record["prompt_ids"] == ids[0].tolist()

    def add(module, args):
        x = args[0].clone()
        x[..., neuron] += scale
        return (x, *args[1:])

    out_proj = adapter(model).out_projs(layer)["mixer.hook_post"]
    steered = _slow_greedy(model, ids, new, out_proj, add, pre=True)[0, ids.shape[1]:].tolist()
    plain = _slow_greedy(model, ids, new, out_proj, lambda m, a: None, pre=True)[0, ids.shape[1]:].tolist()
    assert record["tokens"] == {"unsteered": plain, "steered": steered}
    assert steered != plain
    assert record["texts"]["steered"] == tokenizer.decode(steered)
    assert "unsteered" in stdout and "steered (neuron 12)" in stdout


def _dictionary(directory, hook_name, W_dec, **extra):
    directory.mkdir()
    d_sae, d_in = W_dec.shape
    cfg = {"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "hook_name": hook_name, "k": 4, **extra}
    (directory / "cfg.json").write_text(json.dumps(cfg))
    save_file({"W_enc": W_dec.T.contiguous(), "b_enc": torch.zeros(d_sae), "W_dec": W_dec,
               "b_dec": torch.zeros(d_in)}, str(directory / "sae_weights.safetensors"))
    return directory


def test_feature_steering_adds_the_decoder_row(tmp_path, capsys, mamba):
    """A SAELens-format dictionary written here: steering feature i adds scale·W_dec[i] at its hook_name."""
    model, tokenizer = mamba
    d = model.config.hidden_size
    W_dec = torch.randn(6, d, generator=torch.Generator().manual_seed(0))
    sae = _dictionary(tmp_path / "sae", "blocks.0.hook_resid_post", W_dec)
    feature, scale, new = 4, 3.0, 8
    record = _steer_feature(capsys, tmp_path, f"{sae}:{feature}", scale, new)
    ids = torch.tensor([tokenizer.encode(PROMPT)])

    def add(module, args, output):
        return output + scale * W_dec[feature]

    block = adapter(model).blocks()[0]
    steered = _slow_greedy(model, ids, new, block, add, pre=False)[0, ids.shape[1]:].tolist()
    assert record["tokens"]["steered"] == steered
    assert record["tokens"]["steered"] != record["tokens"]["unsteered"]


def test_transcoder_feature_writes_at_its_output_hook(tmp_path, capsys, mamba):
    """A transcoder (hook_name its input, hook_name_out its output): W_dec[i] is added at hook_name_out,
    here the mixer's output (the output of out_proj)."""
    model, tokenizer = mamba
    d = model.config.hidden_size
    W_dec = torch.randn(5, d, generator=torch.Generator().manual_seed(1))
    sae = _dictionary(tmp_path / "tc", "blocks.1.hook_resid_pre", W_dec, architecture="transcoder",
                      hook_name_out="blocks.1.hook_mixer_out", d_out=d)
    feature, scale, new = 2, 4.0, 6
    record = _steer_feature(capsys, tmp_path, f"{sae}:{feature}", scale, new)
    assert record["hook_name"] == "blocks.1.hook_mixer_out"
    ids = torch.tensor([tokenizer.encode(PROMPT)])

    def add(module, args, output):
        return output + scale * W_dec[feature]

    out_proj = adapter(model).out_projs(1)["mixer.hook_post"]
    steered = _slow_greedy(model, ids, new, out_proj, add, pre=False)[0, ids.shape[1]:].tolist()
    assert record["tokens"]["steered"] == steered


@pytest.mark.parametrize("argv,message", [
    (["--prompt", "  ", "--unit", "0:1"], "--prompt is empty"),
    (["--unit", "3"], "--unit '3'"),
    (["--unit", "a:3"], "the layer must be"),
    (["--unit", "0:-1"], "non-negative"),
    (["--unit", "0:1", "--scale", "nan"], "--scale: 'nan' is not a finite number"),
    (["--unit", "0:1", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--unit", "0:1", "--max-new-tokens", "1000000"], "--max-new-tokens"),
    (["--unit", "0:1", "--positions", "5:2"], "--positions"),
    (["--feature", "/nonexistent/sae:1"], "no cfg.json"),
    (["--unit", "0:1", "--top-k", "0"], "--top-k"),
])
def test_bad_input_fails_before_the_model_loads(capsys, monkeypatch, argv, message):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(mambascope.models, "load_model", refuse)
    argv = ["steer", "--model", "tiny-mamba", *argv]
    if "--scale" not in argv:
        argv += ["--scale", "2"]
    if "--prompt" not in argv:
        argv += ["--prompt", PROMPT]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in _one_error_line(err)


def test_set_mode_refused_for_a_feature(tmp_path, capsys):
    sae = _dictionary(tmp_path / "sae", "blocks.0.hook_resid_post", torch.ones(3, 4))
    code, _, err = run(capsys, "steer", "--prompt", PROMPT, "--feature", f"{sae}:1", "--scale", "1",
                        "--mode", "set")
    assert code == 2 and "--mode set" in _one_error_line(err)


@pytest.mark.parametrize("spec,message", [
    ("unit:7:1", "layer 7 out of range"),
    ("unit:0:100000", "layer 0 has neurons 0.."),
    ("feature:hook:blocks.0.nope", "is not a unit"),
    ("feature:index:9", "out of range"),
    ("feature:width:3", "d_in is 3"),
])
def test_model_dependent_errors_are_one_line(tmp_path, capsys, spec, message):
    kind, *rest = spec.split(":")
    if kind == "unit":
        what = ["--unit", ":".join(rest)]
    else:
        hook = rest[1] if rest[0] == "hook" else "blocks.0.hook_resid_post"
        width = int(rest[1]) if rest[0] == "width" else 128
        sae = _dictionary(tmp_path / "sae", hook, torch.ones(4, width))
        what = ["--feature", f"{sae}:{rest[1] if rest[0] == 'index' else 1}"]
    code, _, err = run(capsys, "steer", "--model", "tiny-mamba", "--device", "cpu", "--prompt", PROMPT, *what,
                        "--scale", "1", "--max-new-tokens", "2", "--out", str(tmp_path / "o"), "--quiet")
    assert code == 2
    assert message in _one_error_line(err)
    assert not (tmp_path / "o").exists()


def test_an_existing_out_is_refused_before_any_generation(tmp_path, capsys, monkeypatch):
    import importlib

    generation = importlib.import_module("mambascope.trace.generate")  # the module, not the function it exports
    out = tmp_path / "steered"
    out.mkdir()
    (out / "mine.txt").write_text("kept")

    def refuse(*args, **kwargs):
        raise AssertionError("generated before --out was claimed")

    monkeypatch.setattr(generation, "generate", refuse)
    code, stdout, err = run(capsys, "steer", "--model", "tiny-mamba", "--prompt", PROMPT, "--unit", "0:1",
                             "--scale", "2", "--max-new-tokens", "2", "--out", str(out))
    assert code == 2 and stdout == ""
    assert "exists; pass --overwrite" in _one_error_line(err)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
