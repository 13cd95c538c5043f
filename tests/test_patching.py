"""Activation patching, causal tracing and attribution patching (docs/patching.md) on the bundled models.

References independent of the batched edits: the traced runs themselves (a patch of every position
restores the clean logits bit for bit), and a loop of plain Hugging Face forwards with a hand-made
``register_forward_hook`` on the layer (or part) module, one forward per patch.
"""

import copy
import json

import jsonschema
import pytest
import torch
from torch import nn

from cli_helpers import one_line, run
from mambascope.interventions import activation_patching, attribution_patching, gaussian_noise, run_patched
from mambascope.interventions.patching import NOISE_UNIT, Patch, embedding_std, unit_rows
from mambascope.models import load_model
from mambascope.report import results_schema
from mambascope.trace import trace

MODELS = ["tiny-mamba", "tiny-mamba2", "tiny-gpt", "tiny-hybrid"]
PROMPT = "The function returns the value of the"
SWAP = (1, " class")  # the corrupted prompt: " function" -> " class" at position 1


@pytest.fixture(scope="module")
def bundled():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_model(name, device="cpu")
        return cache[name]

    return get


def prompt_pair(tokenizer, model):
    clean = tokenizer(PROMPT, return_tensors="pt").input_ids
    corrupt = clean.clone()
    (swap,) = tokenizer(SWAP[1], add_special_tokens=False).input_ids
    corrupt[0, SWAP[0]] = swap
    target = int(trace(model, clean, names=[]).logits[0, -1].argmax())
    return clean, corrupt, target


def n_layers(model):
    return len(trace(model, torch.tensor([[1]]), names="*hook_resid_pre"))


# --------------------------------------------------------------------------------- exact against the runs

@pytest.mark.parametrize("name", MODELS)
def test_patching_every_position_restores_the_clean_logits(bundled, name):
    """The residual stream of any layer patched at every position: the rest of the forward is the clean one."""
    model, tokenizer = bundled(name)
    clean, corrupt, _ = prompt_pair(tokenizer, model)
    clean_run = trace(model, clean, names=["*hook_resid_pre", "*hook_resid_post"])
    L = clean.shape[1]
    for hook in clean_run:
        logits = run_patched(model, corrupt, [[Patch(hook, p) for p in range(L)]], clean_run)
        assert torch.equal(logits, clean_run.logits), hook


@pytest.mark.parametrize("name", ["tiny-mamba2", "tiny-gpt", "tiny-hybrid"])
def test_all_heads_are_the_whole_unit(bundled, name):
    """Patching every head of a layer at every position is patching its whole attn.hook_z / mixer.hook_y."""
    model, tokenizer = bundled(name)
    clean, corrupt, _ = prompt_pair(tokenizer, model)
    rows = unit_rows(model, "heads")
    clean_run = trace(model, clean, names=sorted({r.name for r in rows}))
    positions = range(clean.shape[1])
    for hook in sorted({r.name for r in rows}):
        heads = [Patch(r.name, p, r.index) for r in rows if r.name == hook for p in positions]
        whole = [Patch(hook, p) for p in positions]
        # the same values written the same way, each in a batch of one: equal bit for bit on any CPU
        by_heads, by_unit = (run_patched(model, corrupt, [row], clean_run) for row in (heads, whole))
        assert torch.equal(by_heads, by_unit), hook
        assert not torch.allclose(by_unit, trace(model, corrupt, names=[]).logits, atol=1e-3)  # it does something


def test_all_channels_are_the_neurons(bundled):
    model, tokenizer = bundled("tiny-mamba")
    clean, corrupt, _ = prompt_pair(tokenizer, model)
    clean_run = trace(model, clean, names="*mixer.hook_post")
    width = clean_run["blocks.2.mixer.hook_post"].shape[-1]
    (row,) = unit_rows(model, "channels", layers=[2], channels=list(range(width)))
    positions = range(clean.shape[1])
    by_channels, by_unit = (run_patched(model, corrupt, [patches], clean_run) for patches in (
        [Patch(row.name, p, row.index) for p in positions], [Patch(row.name, p) for p in positions]))
    assert torch.equal(by_channels, by_unit)


@pytest.mark.parametrize("name", MODELS)
def test_patching_nothing_is_the_corrupted_run(bundled, name):
    model, tokenizer = bundled(name)
    clean, corrupt, _ = prompt_pair(tokenizer, model)
    clean_run = trace(model, clean, names="blocks.1.hook_resid_pre")
    corrupted = trace(model, corrupt, names=[]).logits
    assert torch.equal(run_patched(model, corrupt, [[]], clean_run), corrupted)
    batch = run_patched(model, corrupt, [[], [Patch("blocks.1.hook_resid_pre", SWAP[0])], []], clean_run)
    # rows without a patch, beside one with, against the same rows of a batch of the same shape without any
    # (a batch of 3 rounds differently from a batch of 1 on some CPUs; the same shape does not)
    unpatched = run_patched(model, corrupt, [[], [], []], clean_run)
    for row in (0, 2):
        assert torch.equal(batch[row], unpatched[row])
    assert not torch.allclose(batch[1:2], corrupted, atol=1e-3)


@pytest.mark.parametrize("name", MODELS)
def test_embedding_patch_at_the_only_differing_token_restores_exactly_one(bundled, name):
    """docs/design.md §11; and patching where the prompts agree changes nothing (effect 0).

    Exactly, with one patch per forward: the patched forward is then the clean run (at the differing token)
    or the corrupted run (elsewhere), computed with the same shapes, so bit for bit; in a larger batch it
    rounds differently, by an amount that depends on the CPU."""
    model, tokenizer = bundled(name)
    clean, corrupt, target = prompt_pair(tokenizer, model)
    result = activation_patching(model, clean, corrupt, target=target, unit_types=["resid_pre"], layers=[0],
                                 batch_size=1)
    grid = result.grids["resid_pre"]
    expected = torch.zeros(1, clean.shape[1], dtype=torch.float64)
    expected[0, SWAP[0]] = 1.0
    assert torch.equal(grid.effect, expected)
    assert grid.changed.tolist() == [[p == SWAP[0] for p in range(clean.shape[1])]]


@pytest.mark.parametrize("name", MODELS)
def test_noising_mirrors_denoising(bundled, name):
    """At the corrupted token of layer 0 and at the last layer's output of the last position, denoising restores
    everything (1) and noising destroys everything (0); where the runs agree, noising leaves the clean run (1).
    Exactly, one patch per forward (as in the test above)."""
    model, tokenizer = bundled(name)
    clean, corrupt, target = prompt_pair(tokenizer, model)
    last, L = n_layers(model) - 1, clean.shape[1]
    kw = {"target": target, "unit_types": ["resid_pre", "resid_post"], "layers": [0, last], "batch_size": 1}
    denoise = activation_patching(model, clean, corrupt, direction="denoise", **kw).grids
    noise = activation_patching(model, clean, corrupt, direction="noise", **kw).grids
    for grid, value in ((denoise, 1.0), (noise, 0.0)):
        assert grid["resid_pre"].effect[0, SWAP[0]].item() == value
        assert grid["resid_post"].effect[1, L - 1].item() == value
    assert noise["resid_pre"].effect[0, 0].item() == 1.0
    assert denoise["resid_pre"].effect[0, 0].item() == 0.0


def test_gaussian_noise_causal_tracing(bundled):
    """Meng et al.'s corruption: seeded noise of std ν = 3σ on the subject's embeddings, undone by restoring them."""
    model, tokenizer = bundled("tiny-mamba")
    clean, _, target = prompt_pair(tokenizer, model)
    subject = [1, 2]
    noise = gaussian_noise(model, subject, seed=3)
    added = noise[NOISE_UNIT](torch.zeros(1, clean.shape[1], 128))
    assert torch.count_nonzero(added[0, [p for p in range(clean.shape[1]) if p not in subject]]) == 0
    assert added[0, subject].std().item() == pytest.approx(3 * embedding_std(model), rel=0.15)

    clean_run = trace(model, clean, names=[NOISE_UNIT])
    restored = run_patched(model, clean, [[Patch(NOISE_UNIT, p) for p in subject]], clean_run, noise)
    assert torch.equal(restored, clean_run.logits)

    result = activation_patching(model, clean, target=target, corrupt_edits=noise, unit_types=["resid_pre"],
                                 batch_size=1)  # one patch per forward: exact where nothing changed (above)
    again = activation_patching(model, clean, target=target, corrupt_edits=gaussian_noise(model, subject, seed=3),
                                unit_types=["resid_pre"], layers=[0])
    other = activation_patching(model, clean, target=target, corrupt_edits=gaussian_noise(model, subject, seed=4),
                                unit_types=["resid_pre"], layers=[0])
    assert again.corrupt_metric == result.corrupt_metric != other.corrupt_metric
    grid = result.grids["resid_pre"]
    assert grid.changed[0].tolist() == [p in subject for p in range(clean.shape[1])]
    outside = [p for p in range(clean.shape[1]) if p not in subject]
    assert torch.equal(grid.effect[0, outside], torch.zeros(len(outside), dtype=torch.float64))


# ------------------------------------------------------------------------ against a loop of hooked HF forwards

def _layer_modules(model, name):
    """(layer output module, a part's output module, that part's unit type) per layer, from HF's own modules."""
    if name in ("tiny-mamba", "tiny-mamba2"):
        return [(b, b.mixer, "mixer_out") for b in model.backbone.layers]
    if name == "tiny-gpt":
        return [(b, b.mlp, "mlp_out") for b in model.transformer.h]
    return [(b, b.feed_forward, "mlp_out") for b in model.model.layers]


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, tensor):
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


def hooked_metric(model, ids, module, position, value, metric):
    """The metric of one plain HF forward with ``module``'s output at ``position`` replaced by ``value``."""
    def hook(mod, args, output):
        out = _first(output).clone()
        out[:, position] = value
        return _replace_first(output, out)

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
    finally:
        handle.remove()
    return float(metric(logits)[0])


def clean_outputs(model, ids, modules):
    saved = {}
    handles = [m.register_forward_hook(lambda mod, a, out, i=i: saved.__setitem__(i, _first(out)[0].clone()))
               for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [saved[i] for i in range(len(modules))]


@pytest.mark.parametrize("name", MODELS)
def test_batched_grid_matches_a_loop_of_hooked_forwards(bundled, name):
    model, tokenizer = bundled(name)
    clean, corrupt, target = prompt_pair(tokenizer, model)
    layers = _layer_modules(model, name)
    part = layers[0][2]
    for direction, base, source in (("denoise", corrupt, clean), ("noise", clean, corrupt)):
        result = activation_patching(model, clean, corrupt, target=target, unit_types=["resid_post", part],
                                     direction=direction, batch_size=7)
        for unit, pick in (("resid_post", 0), (part, 1)):
            modules = [entry[pick] for entry in layers]
            values = clean_outputs(model, source, modules)
            loop = torch.tensor([[hooked_metric(model, base, module, p, values[i][p], result.metric)
                                  for p in range(clean.shape[1])] for i, module in enumerate(modules)],
                                dtype=torch.float64)
            torch.testing.assert_close(result.grids[unit].metric, loop, atol=1e-5, rtol=1e-5)


def cached_decoding_metric(model, clean, corrupt, layer, position, metric):
    """The state patch by Hugging Face's own recurrent decoding: both prefixes up to ``position`` cached, the
    corrupted cache given the clean SSM state of ``layer``, the rest of the corrupted prompt fed a token at a
    time from it (the conv windows stay the corrupted run's, as in the tracer's state edit)."""
    with torch.no_grad():
        source = model(clean[:, :position + 1], use_cache=True).cache
        out = model(corrupt[:, :position + 1], use_cache=True)
        cache = out.cache
        cache.layers[layer].recurrent_states[0].copy_(source.layers[layer].recurrent_states[0])
        for q in range(position + 1, corrupt.shape[1]):
            out = model(corrupt[:, q:q + 1], cache=cache, use_cache=True)
    return float(metric(out.logits)[0])


@pytest.mark.parametrize("name", ["tiny-mamba", "tiny-mamba2"])
def test_state_patching_matches_cached_decoding(bundled, name):
    model, tokenizer = bundled(name)
    clean, corrupt, target = prompt_pair(tokenizer, model)
    result = activation_patching(model, clean, corrupt, target=target, unit_types=["state"], batch_size=5)
    grid = result.grids["state"]
    loop = torch.tensor([[cached_decoding_metric(model, clean, corrupt, row.layer, p, result.metric)
                          for p in grid.positions] for row in grid.rows], dtype=torch.float64)
    torch.testing.assert_close(grid.metric, loop, atol=1e-5, rtol=1e-5)
    assert grid.effect[:, 1:-1].abs().max() > 0.05  # the states between the corrupted token and the end matter
    # Nothing reads the state after the last position: writing the clean or the corrupted run's state there
    # is the same forward bit for bit.  (Its effect is not exactly 0: tracing the states rounds the scan
    # differently from the unpatched corrupted run, by an amount that depends on the CPU.)
    L = clean.shape[1]
    names = [row.name for row in grid.rows]
    clean_run, corrupt_run = (trace(model, ids, names=names, state_positions=list(range(L)))
                              for ids in (clean, corrupt))
    for name in names:
        assert not torch.equal(clean_run[name][:, -1], corrupt_run[name][:, -1])
        written = [run_patched(model, corrupt, [[Patch(name, L - 1)]], source) for source in (clean_run, corrupt_run)]
        assert torch.equal(*written), name


def test_state_rows_are_the_ssm_layers(bundled):
    model, _ = bundled("tiny-hybrid")
    assert [r.layer for r in unit_rows(model, "state")] == [0, 1, 3]  # layer 2 is attention
    with pytest.raises(ValueError, match="no 'state' unit"):
        unit_rows(bundled("tiny-gpt")[0], "state")


# ------------------------------------------------------------------------------------------ attribution

def test_attribution_is_exact_where_the_metric_is_linear(bundled):
    """Without the final norm, the logit difference is linear in the last layer's resid_post, mlp_out and post
    (lm_head, c_proj and the residual sum are linear): the first-order estimate is exact there.  Every bundled
    model ends in a scale-invariant norm (RMSNorm / LayerNorm), so this uses tiny-gpt with ln_f removed; with
    ln_f in place, the same cells differ."""
    model, tokenizer = bundled("tiny-gpt")
    clean, corrupt, target = prompt_pair(tokenizer, model)
    linear = copy.deepcopy(model)
    linear.transformer.ln_f = nn.Identity()
    last = n_layers(model) - 1
    kw = {"target": target, "unit_types": ["resid_post", "mlp_out", "post"], "layers": [last]}
    for direction in ("denoise", "noise"):
        true = activation_patching(linear, clean, corrupt, direction=direction, **kw)
        estimate = attribution_patching(linear, clean, corrupt, direction=direction, **kw)
        for unit in kw["unit_types"]:
            torch.testing.assert_close(estimate.grids[unit].effect, true.grids[unit].effect, atol=1e-5, rtol=1e-5)
            unpatched = 0.0 if direction == "denoise" else 1.0
            assert (true.grids[unit].effect[0, -1] - unpatched).abs() > 0.1  # a cell that matters
    true = activation_patching(model, clean, corrupt, **kw)
    estimate = attribution_patching(model, clean, corrupt, **kw)
    assert (estimate.grids["resid_post"].effect[0, -1] - true.grids["resid_post"].effect[0, -1]).abs() > 1e-3


# ------------------------------------------------------------------------------------------ errors

def test_api_refuses_bad_requests(bundled):
    model, tokenizer = bundled("tiny-gpt")
    clean, corrupt, target = prompt_pair(tokenizer, model)
    with pytest.raises(ValueError, match="same number of tokens"):
        activation_patching(model, clean, corrupt[:, :-1], target=target)
    with pytest.raises(ValueError, match="unknown unit type 'nope'"):
        activation_patching(model, clean, corrupt, target=target, unit_types=["nope"])
    with pytest.raises(ValueError, match="no 'mixer_out' unit"):
        activation_patching(model, clean, corrupt, target=target, unit_types=["mixer_out"])
    with pytest.raises(ValueError, match="out of range"):
        unit_rows(model, "channels", channels=[10_000])
    with pytest.raises(ValueError, match="nothing for patching to restore"):
        activation_patching(model, clean, clean, target=target)


# ------------------------------------------------------------------------------------------ CLI

PATCH = ["patch", "--model", "tiny-mamba", "--quiet"]


def test_patch_cli_writes_grids_figures_and_report(tmp_path, capsys, bundled):
    out = tmp_path / "p"
    code, stdout, _ = run(capsys, *PATCH, "--clean", PROMPT, "--corrupt", "The class returns the value of the",
                          "--target", " given", "--units", "resid,mixer_out,post,state", "--batch-size", "1",
                          "--out", out)
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    jsonschema.Draft202012Validator(results_schema()).validate(results)
    patching = results["patching"]
    prompts = patching["prompts"]
    assert prompts["clean_tokens"][1] == " function" and prompts["corrupt_tokens"][1] == " class"
    assert set(patching["grids"]) == set(patching["attribution"]) == {"resid_pre", "mixer_out", "post", "state"}
    grid = patching["grids"]["resid_pre"]
    assert len(grid["effect"]) == len(grid["layers"]) == 4 and len(grid["effect"][0]) == len(grid["positions"]) == 7
    # The library's grid for the same units, bit for bit (one patch per forward).  Tracing the state rounds
    # the unpatched runs differently from the patched forwards, so this cell is 1 only to rounding, by an
    # amount that depends on the CPU; test_embedding_patch_at_the_only_differing_token_restores_exactly_one
    # checks the 1 exactly.
    model, tokenizer = bundled("tiny-mamba")
    clean, corrupt, _ = prompt_pair(tokenizer, model)
    assert prompts["clean_tokens"] == [tokenizer.decode(t) for t in clean[0]]
    library = activation_patching(model, clean, corrupt, target=patching["metric"]["target"],
                                  other=patching["metric"]["other"], unit_types=list(patching["grids"]),
                                  batch_size=1)
    assert grid["effect"][0] == library.grids["resid_pre"].effect[0].tolist()
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "patching_mixer_out.png", "patching_post.png", "patching_resid_pre.png", "patching_state.png"]
    assert 'id="patching"' in (out / "report.html").read_text()
    assert "mixer_out" in stdout
    (out / "report.html").unlink()
    assert run(capsys, "report", out)[0] == 0
    assert "patching_resid_pre.png" in (out / "report.html").read_text()


def test_patch_cli_gaussian_noise(tmp_path, capsys):
    out = tmp_path / "p"
    code, _, _ = run(capsys, *PATCH, "--clean", PROMPT, "--noise-subject", " function returns", "--target", " given",
                     "--units", "resid_pre", "--batch-size", "1", "--out", out, "--no-report")
    assert code == 0
    patching = json.loads((out / "results.json").read_text())["patching"]
    assert patching["noise"]["subject_positions"] == [1, 2] and patching["prompts"]["corrupt"] is None
    # restoring an unchanged position: the corrupted run itself, bit for bit with one patch per forward
    assert patching["grids"]["resid_pre"]["effect"][0][0] == 0.0


def _no_model(*args, **kwargs):
    raise AssertionError("the model must not load for a flag error")


@pytest.mark.parametrize("argv,needles", [
    (["--corrupt", "a b", "--units", "resid,bogus"], ["--units", "'bogus'"]),
    (["--corrupt", "a b", "--units", "channels"], ["--channels"]),
    ([], ["--corrupt", "--noise-subject"]),
    (["--corrupt", "x", "--noise-subject", "The"], ["not both"]),
    (["--noise-subject", "nowhere"], ["'nowhere' does not occur"]),
    (["--corrupt", "a b", "--batch-size", "0"], ["--batch-size"]),
], ids=["unknown-unit", "channels-without-list", "no-corruption", "two-corruptions", "subject-not-in-clean",
        "batch-size"])
def test_patch_flags_fail_before_the_model_loads(tmp_path, monkeypatch, capsys, argv, needles):
    import mambascope.models

    monkeypatch.setattr(mambascope.models, "load_model", _no_model)
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *PATCH, "--clean", PROMPT, "--target", " given", *argv, "--out", "o")
    assert code == 2
    one_line(err, *needles)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,needles", [
    (["--corrupt", "The class returns the value"], ["same number of tokens", "--clean is 7", "--corrupt 5"]),
    (["--corrupt", "The class returns the value of the", "--target", " FileNotFoundError"],
     ["--target ' FileNotFoundError' must be a single token", "' File'"]),
    (["--corrupt", "The class returns the value of the", "--units", "attn_out"], ["no 'attn_out' unit"]),
], ids=["unequal-lengths", "multi-token-target", "unit-the-model-lacks"])
def test_patch_prompt_errors_are_one_line(tmp_path, monkeypatch, capsys, argv, needles):
    monkeypatch.chdir(tmp_path)
    target = [] if "--target" in argv else ["--target", " given"]
    code, _, err = run(capsys, *PATCH, "--clean", PROMPT, *target, *argv, "--out", "o")
    assert code == 2
    one_line(err, *needles)
    assert list(tmp_path.iterdir()) == []
