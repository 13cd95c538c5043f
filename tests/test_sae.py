"""Sparse dictionaries (docs/features.md): the SAELens files read back by an independent reader, the evaluation
statistics against slow loops, the splice against hand-made forward hooks, exact resume, and the command."""

import json

import pytest
import torch
from safetensors import safe_open

from mambascope import load_model
from mambascope.cli import main
from mambascope.data import load_corpus, tokenize_windows
from mambascope.features import DictionarySpec, codes, load_dictionary, reconstruct, save_dictionary
from mambascope.features.activations import unit_rows
from mambascope.features.dictionary import new_coder, saelens_cfg
from mambascope.features.evaluate import DENSE, reconstruction_stats, splice_losses
from mambascope.features.train import TrainConfig, checkpoint_dir, load_checkpoint, train_dictionary

LAYER = 1


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model("tiny-mamba", device="cpu")
    texts = load_corpus("builtin", "validation").texts[:40]
    windows = tokenize_windows(texts, tokenizer, 32, max_tokens=32 * 12).ids
    return model.eval(), windows


def _spec(kind: str = "topk", d_sae: int = 48, k: int = 4) -> DictionarySpec:
    if kind == "topk":
        hook = f"blocks.{LAYER}.mixer.hook_post"
        return DictionarySpec("topk", hook, hook, 256, 256, d_sae, k, "tiny-mamba")
    return DictionarySpec("transcoder", f"blocks.{LAYER}.hook_resid_pre", f"blocks.{LAYER}.hook_mixer_out", 128, 128,
                          d_sae, k, "tiny-mamba")


def _hand_dictionary(spec: DictionarySpec, x: torch.Tensor, seed: int = 0):
    """A dictionary with non-zero biases everywhere (so that the b_dec fold matters), four latents that can
    never fire (bias −1e6) and encoder rows along the data (so that some latents fire often)."""
    torch.manual_seed(seed)
    coder = new_coder(spec)
    with torch.no_grad():
        picks = x[torch.randperm(x.shape[0])[:spec.d_sae]]
        coder.encoder.weight.copy_(picks / picks.norm(dim=1, keepdim=True) + 0.1 * torch.randn_like(picks))
        coder.b_dec.copy_(x.mean(0) + 0.05 * torch.randn(spec.d_out))
        coder.encoder.bias.copy_(0.1 * torch.randn(spec.d_sae))
        coder.encoder.bias[:4] = -1e6
        coder.W_dec.copy_(torch.randn(spec.d_sae, spec.d_out) * 0.05)
    return coder.eval()


# -- the format -------------------------------------------------------------------------------------------
def _saelens_read(directory):
    """An independent minimal SAELens reader: cfg.json + sae_weights.safetensors, and SAELens's TopK encode
    topk(x W_enc + b_enc) with ReLU on the kept values (apply_b_dec_to_input false)."""
    cfg = json.loads((directory / "cfg.json").read_text())
    with safe_open(str(directory / "sae_weights.safetensors"), framework="pt") as f:
        w = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    return cfg, w


def _saelens_encode(cfg, w, x):
    assert not cfg["apply_b_dec_to_input"] and cfg["normalize_activations"] == "none"
    pre = x @ w["W_enc"] + w["b_enc"]
    top = pre.topk(cfg["k"], dim=-1)
    return torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())


@pytest.mark.parametrize("kind", ["topk", "transcoder"])
def test_saelens_reader_gets_the_same_codes(tiny, tmp_path, kind):
    model, windows = tiny
    spec = _spec(kind)
    x, _ = unit_rows(model, windows[:4], spec)
    coder = _hand_dictionary(spec, x)
    save_dictionary(coder, spec, tmp_path)
    cfg, w = _saelens_read(tmp_path)
    assert cfg["architecture"] == kind and cfg["k"] == spec.k and cfg["d_sae"] == spec.d_sae
    assert cfg["hook_name"] == spec.hook_in and cfg["model_name"] == "tiny-mamba" and cfg["dtype"] == "float32"
    assert w["W_enc"].shape == (spec.d_in, spec.d_sae) and w["W_dec"].shape == (spec.d_sae, spec.d_out)
    assert w["b_enc"].shape == (spec.d_sae,) and w["b_dec"].shape == (spec.d_out,)
    ours = codes(coder, x)
    theirs = _saelens_encode(cfg, w, x)
    # the fold b_enc = b − W b_dec changes the rounding of the pre-activations by a few ulps of |W||x|
    tol = 1e-5 * float((x.abs() @ w["W_enc"].abs()).max())
    assert torch.equal(ours != 0, theirs != 0)
    assert float((ours - theirs).abs().max()) <= tol
    recon = theirs @ w["W_dec"] + w["b_dec"]
    assert float((recon - reconstruct(coder, x)).abs().max()) <= tol * float(w["W_dec"].abs().sum(0).max()) + 1e-6
    loaded, loaded_spec = load_dictionary(tmp_path)
    assert loaded_spec == spec
    assert float((codes(loaded, x) - ours).abs().max()) <= tol


def test_counterpart_hook_names():
    spec = _spec("transcoder")
    cfg = saelens_cfg(spec)
    assert cfg["hook_name_transformer_lens"] == f"blocks.{LAYER}.hook_resid_pre"
    assert cfg["hook_name_mamba_lens"] == f"blocks.{LAYER}.hook_resid_pre"
    assert cfg["hook_name_out"] == f"blocks.{LAYER}.hook_mixer_out"
    assert cfg["hook_name_mamba_lens_out"] == f"blocks.{LAYER}.hook_out_proj"


# -- the statistics -----------------------------------------------------------------------------------------
def _slow_stats(coder, spec, rows):
    """Token by token: pre-activations by hand, the k largest kept (ReLU), the reconstruction by hand."""
    W, b = coder.encoder.weight.double(), coder.encoder.bias.double()
    b_dec, W_dec = coder.b_dec.double(), coder.W_dec.double()
    counts = [0] * spec.d_sae
    l0 = 0
    errors, targets = [], []
    for x, y in rows:
        x, y = x.double(), y.double()
        pre = W @ (x if spec.kind == "transcoder" else x - b_dec) + b
        order = sorted(range(spec.d_sae), key=lambda i: -float(pre[i]))[:spec.k]
        y_hat = b_dec.clone()
        for i in order:
            if pre[i] > 0:
                counts[i] += 1
                l0 += 1
                y_hat += pre[i] * W_dec[i]
        errors.append(float(((y - y_hat) ** 2).sum()))
        targets.append(y)
    Y = torch.stack(targets)
    variance = float(((Y - Y.mean(0)) ** 2).sum())
    n = len(targets)
    return {"fvu": sum(errors) / variance, "mean_l0": l0 / n, "dead_latents": sum(c == 0 for c in counts),
            "dense_latents": sum(c / n > DENSE for c in counts), "tokens": n}


@pytest.mark.parametrize("kind", ["topk", "transcoder"])
def test_statistics_match_a_slow_loop(tiny, kind):
    model, windows = tiny
    spec = _spec(kind, d_sae=24, k=3)
    held = windows[:3]
    x, y = unit_rows(model, held, spec)
    coder = _hand_dictionary(spec, x, seed=1)
    fast = reconstruction_stats(model, coder, spec, held, batch_size=2)
    slow = _slow_stats(coder, spec, zip(x, y, strict=True))
    assert slow["dead_latents"] >= 4 and slow["dense_latents"] >= 1  # the test exercises both counts
    assert fast["tokens"] == slow["tokens"] == held.numel()
    for key in ("dead_latents", "dense_latents"):
        assert fast[key] == slow[key], key
    assert fast["mean_l0"] == pytest.approx(slow["mean_l0"], abs=1e-12)
    assert fast["fvu"] == pytest.approx(slow["fvu"], rel=1e-5)  # float32 codes against float64 by hand


# -- the splice ---------------------------------------------------------------------------------------------
def _hf_loss(model, ids, hooks):
    handles = [register(fn) for register, fn in hooks]
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return float(loss), float(logits.abs().max())


@pytest.mark.parametrize("kind", ["topk", "transcoder"])
def test_splice_equals_a_hand_made_hook(tiny, kind):
    """hook_post: a pre-hook on out_proj replacing its input; transcoder: the block's input read by a pre-hook
    and the mixer's output replaced by a forward hook.  Zero ablation likewise."""
    model, windows = tiny
    spec = _spec(kind)
    held = windows[:4]
    x, _ = unit_rows(model, held, spec)
    coder = _hand_dictionary(spec, x, seed=2)
    ours = splice_losses(model, coder, spec, held, batch_size=4)
    block = model.backbone.layers[LAYER]
    if kind == "topk":
        def spliced(mod, args):
            return (reconstruct(coder, args[0].reshape(-1, spec.d_in)).reshape(args[0].shape),)
        splice_hooks = [(block.mixer.out_proj.register_forward_pre_hook, spliced)]
        zero_hooks = [(block.mixer.out_proj.register_forward_pre_hook, lambda mod, args: (torch.zeros_like(args[0]),))]
    else:
        seen = {}
        read = (block.register_forward_pre_hook, lambda mod, args: seen.__setitem__("x", args[0]))

        def spliced(mod, args, out):
            return reconstruct(coder, seen["x"].reshape(-1, spec.d_in)).reshape(out.shape)
        splice_hooks = [read, (block.mixer.register_forward_hook, spliced)]
        zero_hooks = [(block.mixer.register_forward_hook, lambda mod, args, out: torch.zeros_like(out))]
    results = {}
    for key, hooks in (("clean_loss", []), ("spliced_loss", splice_hooks), ("zero_ablated_loss", zero_hooks)):
        loss, peak = _hf_loss(model, held, hooks)
        # the tracer's logits are within 1e-4·max|logit| of the model's (tests/test_trace.py); the mean
        # cross-entropy moves by at most twice the largest logit change
        assert ours[key] == pytest.approx(loss, abs=2e-4 * peak), key
        results[key] = loss
    assert results["spliced_loss"] != results["clean_loss"]  # the splice changed something
    assert ours["delta_loss"] == pytest.approx(ours["spliced_loss"] - ours["clean_loss"])


# -- training ---------------------------------------------------------------------------------------------
def test_training_lowers_fvu_and_resumes_exactly(tiny, tmp_path):
    model, windows = tiny
    spec = _spec(d_sae=64, k=8)
    cfg = TrainConfig(tokens=3072, batch_tokens=64, buffer_tokens=256, lr=1e-2, dead_after=256, window_batch=2)
    rows = windows[:8].tolist()

    def source():
        return iter(rows)

    whole = train_dictionary(model, spec, cfg, source, progress=False)
    held = windows[8:]
    start = reconstruction_stats(model, new_state_coder(spec, cfg), spec, held)["fvu"]
    trained = reconstruction_stats(model, whole.coder, spec, held)["fvu"]
    assert trained < 0.8 * start

    ckpt = checkpoint_dir(tmp_path / "out")

    def stop(state):
        if state.step == 17:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_dictionary(model, spec, cfg, source, checkpoint=ckpt, checkpoint_every=1000, progress=False,
                         on_step=stop)
    assert json.loads((ckpt / "state.json").read_text())["step"] == 17
    assert not list(ckpt.glob("*.pt")) and not list(ckpt.glob("*.pkl"))
    resumed = train_dictionary(model, spec, cfg, source, state=load_checkpoint(ckpt, spec, cfg), progress=False)
    assert resumed.step == whole.step
    for (name, a), (_, b) in zip(whole.coder.named_parameters(), resumed.coder.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="other flags"):
        load_checkpoint(ckpt, spec, TrainConfig(tokens=2048, batch_tokens=128, buffer_tokens=256))


def new_state_coder(spec, cfg):
    """The untrained dictionary of the same seed."""
    from mambascope.features.train import new_state

    return new_state(spec, cfg).coder


# -- the command --------------------------------------------------------------------------------------------
SMALL = ["--tokens", "512", "--batch-tokens", "128", "--buffer-tokens", "256", "--window", "32", "--batch-size", "4",
         "--eval-windows", "2", "--latents", "64", "--k", "4", "--quiet"]


@pytest.mark.parametrize("argv, message", [
    (["--hook", "blocks.1.mixer.hook_nope"], "valid units"),
    (["--hook", "mixer.hook_ssm_state"], "no per-token unit"),
    (["--latents", "8", "--k", "9"], "--k 9"),
    (["--tokens", "0"], "--tokens must be positive"),
    (["--input-hook", "hook_resid_pre"], "--kind transcoder"),
    (["--expansion", "-1"], "positive"),
])
def test_bad_flags_fail_before_the_model_loads(tmp_path, capsys, argv, message):
    assert main(["sae", "--out", str(tmp_path / "o"), "--model", str(tmp_path / "no-such-model"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_layer_out_of_range_and_existing_out(tmp_path, capsys):
    assert main(["sae", "--out", str(tmp_path / "o"), "--hook", "blocks.9.mixer.hook_post", *SMALL]) == 2
    assert "layers 0..3" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert main(["sae", "--out", str(tmp_path / "taken"), *SMALL]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["topk", "transcoder"])
def test_command_writes_a_loadable_dictionary(tmp_path, capsys, kind):
    out = tmp_path / "dict"
    assert main(["sae", "--out", str(out), "--kind", kind, *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "FVU" in printed and "spliced" in printed
    results = json.loads((out / "results.json").read_text())
    ev = results["evaluation"]
    assert results["errors"] == {} and ev["windows"] == 2 and ev["mean_l0"] <= 4
    assert {"fvu", "dead_latents", "dense_latents", "clean_loss", "spliced_loss", "zero_ablated_loss"} <= set(ev)
    coder, spec = load_dictionary(out)
    assert spec.kind == kind and spec.layer == 2 and coder.num_latents == spec.d_sae == 64
    assert not checkpoint_dir(out).exists()


@pytest.mark.parametrize("family, kind, hook_in, hook_out", [
    ("mamba2", "topk", "blocks.1.mixer.hook_post", "blocks.1.mixer.hook_post"),
    ("gpt2", "topk", "blocks.1.mlp.hook_post", "blocks.1.mlp.hook_post"),
    ("gpt2", "transcoder", "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out"),
])
def test_other_families(small_checkpoints, tmp_path, capsys, family, kind, hook_in, hook_out):
    out = tmp_path / "dict"
    assert main(["sae", "--model", small_checkpoints[family], "--out", str(out), "--kind", kind, *SMALL]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["errors"] == {}
    assert (results["dictionary"]["hook_in"], results["dictionary"]["hook_out"]) == (hook_in, hook_out)
    assert results["evaluation"]["spliced_loss"] != results["evaluation"]["clean_loss"]


def test_command_interrupted_then_resumed(tmp_path, capsys, monkeypatch):
    import mambascope.features.train as train_module

    out = tmp_path / "dict"
    real_step = train_module.train_step

    def interrupted(state, *args):
        if state.step == 3:
            raise KeyboardInterrupt
        return real_step(state, *args)

    monkeypatch.setattr(train_module, "train_step", interrupted)
    assert main(["sae", "--out", str(out), *SMALL]) == 130
    assert "--resume" in capsys.readouterr().err
    assert not out.exists() and json.loads((checkpoint_dir(out) / "state.json").read_text())["step"] == 3
    monkeypatch.setattr(train_module, "train_step", real_step)
    assert main(["sae", "--out", str(out), *SMALL]) == 2  # neither --resume nor --overwrite
    assert "pass --resume" in capsys.readouterr().err
    assert main(["sae", "--out", str(out), "--k", "5", *SMALL[:-3], "--resume"]) == 2  # other flags
    assert "other flags" in capsys.readouterr().err
    assert main(["sae", "--out", str(out), *SMALL, "--resume"]) == 0
    assert "resuming from step 3" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["training"]["steps"] == 4
    assert not checkpoint_dir(out).exists()
