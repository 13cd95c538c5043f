"""Sparse dictionary features as units (docs/features.md, "Features as units"): the census of feature activations
against a slow loop that encodes hand-captured activations from the saved file, the logit effects against a hand
computation from the model's own parameters, the store round trip, and bad dictionaries refused."""

import json
import statistics

import pytest
import torch
from safetensors.torch import load_file

from mambascope import load_model
from mambascope.cli import main
from mambascope.data import load_corpus, tokenize_windows
from mambascope.features import DictionarySpec, save_dictionary
from mambascope.features.census import open_dictionary
from mambascope.features.dictionary import new_coder
from mambascope.pipeline import census_pass, feature_census

LAYER, TOP = 2, 5


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model("tiny-mamba", device="cpu")
    texts = load_corpus("builtin", "validation").texts[:60]
    windows = tokenize_windows(texts, tokenizer, 32, max_tokens=32 * 16).ids
    return model.eval(), tokenizer, windows


def _captured(model, windows, layer: int, where: str) -> torch.Tensor:
    """[n, T, d] captured by a hand-made hook on the Hugging Face modules: the input of the layer's out_proj
    (``mixer.hook_post``) or of the block itself (``hook_resid_pre``)."""
    got = []
    block = model.backbone.layers[layer]
    module = block.mixer.out_proj if where == "post" else block
    handle = module.register_forward_pre_hook(lambda mod, args: got.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            model(windows)
    finally:
        handle.remove()
    return got[0]


def _post_dictionary(tmp_path, model, windows):
    """An SAE on blocks.2.mixer.hook_post with non-zero biases, latents along the data and 3 that never fire."""
    spec = DictionarySpec("topk", f"blocks.{LAYER}.mixer.hook_post", f"blocks.{LAYER}.mixer.hook_post", 256, 256,
                          40, 4, "tiny-mamba")
    x = _captured(model, windows, LAYER, "post").reshape(-1, 256)
    torch.manual_seed(0)
    coder = new_coder(spec)
    with torch.no_grad():
        picks = x[torch.randperm(x.shape[0])[:spec.d_sae]]
        coder.encoder.weight.copy_(picks / picks.norm(dim=1, keepdim=True) + 0.1 * torch.randn_like(picks))
        coder.encoder.bias.copy_(0.1 * torch.randn(spec.d_sae))
        coder.encoder.bias[:3] = -1e6
        coder.b_dec.copy_(0.05 * torch.randn(256))
        coder.W_dec.copy_(torch.randn(spec.d_sae, 256) * 0.05)
    path = tmp_path / "sae-post"
    path.mkdir()
    save_dictionary(coder, spec, path)
    return path


def _planted_dictionary(tmp_path, model, tokenizer, windows):
    """An SAE on blocks.0.hook_resid_pre (the token embedding) whose feature 0 fires on exactly one token type,
    the corpus's most frequent, and whose other features are weak random directions."""
    spec = DictionarySpec("topk", "blocks.0.hook_resid_pre", "blocks.0.hook_resid_pre", 128, 128, 16, 2, "tiny-mamba")
    E = model.get_input_embeddings().weight.detach()
    ids = windows.flatten()
    ids = ids[ids != tokenizer.bos_token_id]
    target = int(torch.bincount(ids).argmax())
    direction = E[target] / E[target].norm()
    proj = E[ids.unique()] @ direction
    others = proj[ids.unique() != target].max()
    torch.manual_seed(1)
    coder = new_coder(spec)
    with torch.no_grad():
        coder.encoder.weight.copy_(0.001 * torch.randn(16, 128))
        coder.encoder.weight[0] = 100 * direction
        coder.b_dec.zero_()
        coder.encoder.bias.zero_()
        coder.encoder.bias[0] = -100 * (proj.max() + others) / 2
        coder.W_dec.copy_(torch.randn(16, 128))
    path = tmp_path / "sae-planted"
    path.mkdir()
    save_dictionary(coder, spec, path)
    return path, target


def _slow_codes(path, x: torch.Tensor, k: int) -> torch.Tensor:
    """z [n, d_sae] by the SAELens formula from the saved tensors, one token at a time: ReLU(x W_enc + b_enc),
    all but the k largest set to zero."""
    w = load_file(str(path / "sae_weights.safetensors"))
    out = torch.zeros(x.shape[0], w["W_enc"].shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        pre = torch.relu(x[t].double() @ w["W_enc"].double() + w["b_enc"].double())
        keep = pre.topk(k).indices
        out[t, keep] = pre[keep]
    return out


def test_feature_statistics_equal_a_slow_loop(tiny, tmp_path):
    model, tokenizer, windows = tiny
    path = _post_dictionary(tmp_path, model, windows)
    out = feature_census(model, tokenizer, windows, (*open_dictionary(path, model), path), progress=False)
    r = out["layers"][str(LAYER)]
    x = _captured(model, windows, LAYER, "post").reshape(-1, 256)
    z = _slow_codes(path, x, 4)
    valid = windows.flatten() != tokenizer.bos_token_id
    z = z[valid]
    active = z > 0
    n = int(valid.sum())
    assert r["tokens"] == n and r["n_neurons"] == 40 and r["arch"] == "feature"
    assert r["activity"]["active_count"] == active.sum(0).tolist()
    assert r["dead_neurons"] == [i for i in range(40) if not active[:, i].any()]
    assert set(range(3)) <= set(r["dead_neurons"])
    # float32 codes summed in float64: each term's relative error is a few float32 ulps of the encoding
    tol = 1e-5 * float(z.abs().max())
    assert torch.allclose(torch.tensor(r["activity"]["mean_post"], dtype=torch.float64), z.mean(0), atol=tol)
    peaks = [vs[0] if vs else None for vs in r["top_contexts"]["values"]]
    for i in range(40):
        if active[:, i].any():
            assert peaks[i] == pytest.approx(float(z[:, i].max()), abs=tol)
        else:
            assert peaks[i] in (None, 0.0)
    # every reported trigger: its count and precision from the slow codes
    tokens = windows.flatten()[valid]
    for det in r["token_detectors"]:
        for token, count, precision in zip(det["tokens"], det["counts"], det["precision"], strict=True):
            on = tokens == token
            assert count == int((active[:, det["neuron"]] & on).sum())
            assert precision == pytest.approx(count / int(on.sum()))


def test_a_planted_token_feature_is_a_token_detector(tiny, tmp_path):
    model, tokenizer, windows = tiny
    path, target = _planted_dictionary(tmp_path, model, tokenizer, windows)
    out = feature_census(model, tokenizer, windows, (*open_dictionary(path, model), path), progress=False)
    r = out["layers"]["0"]
    found = {d["neuron"]: d for d in r["token_detectors"]}
    assert 0 in found and found[0]["tokens"] == [target] and found[0]["precision"] == [1.0]
    valid = windows.flatten() != tokenizer.bos_token_id
    assert found[0]["counts"] == [int((windows.flatten()[valid] == target).sum())]


def _hand_effects(model, direction: torch.Tensor) -> torch.Tensor:
    """[V] logits per unit of a residual-stream write ``direction`` [d_model]: lm_head · (norm_f gain ⊙ d)."""
    return model.lm_head.weight.detach().double() @ (model.backbone.norm_f.weight.detach().double()
                                                     * direction.double())


@pytest.mark.parametrize("which", ["post", "planted"])
def test_logit_effects_equal_a_hand_computation(tiny, tmp_path, which):
    model, tokenizer, windows = tiny
    if which == "post":
        path = _post_dictionary(tmp_path, model, windows)
        layer = LAYER
    else:
        path, _ = _planted_dictionary(tmp_path, model, tokenizer, windows)
        layer = 0
    out = feature_census(model, tokenizer, windows, (*open_dictionary(path, model), path), progress=False)
    le = out["layers"][str(layer)]["logit_effects"]
    W_dec = load_file(str(path / "sae_weights.safetensors"))["W_dec"]
    out_proj = model.backbone.layers[layer].mixer.out_proj.weight.detach()
    for i in (3, 7, 11):
        d = out_proj.double() @ W_dec[i].double() if which == "post" else W_dec[i]
        effect = _hand_effects(model, d)
        top = effect.topk(10)
        assert le["promoted"][i] == tokenizer.batch_decode([[t] for t in top.indices.tolist()])
        scale = float(effect.abs().max())
        assert le["promoted_values"][i] == pytest.approx(top.values.tolist(), abs=1e-5 * scale)
        low = effect.topk(10, largest=False)
        assert le["suppressed_values"][i] == pytest.approx(low.values.tolist(), abs=1e-5 * scale)


def test_features_versus_neurons_on_the_same_tokens(tiny, tmp_path):
    model, tokenizer, windows = tiny
    path = _post_dictionary(tmp_path, model, windows)
    neurons = census_pass(model, tokenizer, windows, layers=[LAYER], progress=False)["layers"]
    out = feature_census(model, tokenizer, windows, (*open_dictionary(path, model), path), neurons, progress=False)
    vs = out["versus_neurons"]
    assert vs["same_tokens_and_criteria"] and vs["criteria"]["min_precision"] == 0.95
    assert vs["neurons"]["token_detectors"] == len(neurons[str(LAYER)]["token_detectors"])
    assert vs["features"]["token_detectors"] == len(out["layers"][str(LAYER)]["token_detectors"])
    assert vs["features"]["dead"] == len(out["layers"][str(LAYER)]["dead_neurons"]) >= 3
    # types covering 95 % of a unit's activations, counted by hand from the slow codes for the features
    x = _captured(model, windows, LAYER, "post").reshape(-1, 256)
    valid = windows.flatten() != tokenizer.bos_token_id
    active = _slow_codes(path, x, 4)[valid] > 0
    tokens = windows.flatten()[valid]
    needed = []
    for i in range(40):
        if int(active[:, i].sum()) >= 5:
            counts = torch.bincount(tokens[active[:, i]]).sort(descending=True).values
            needed.append(int((counts.cumsum(0) < 0.95 * counts.sum()).sum()) + 1)
    got = vs["features"]["types_needed"]
    assert got["units_counted"] == len(needed)
    assert got["at_most_20"] == sum(n <= 20 for n in needed)
    assert got["median"] == statistics.median(needed)


def test_bad_dictionaries_exit_2_before_any_work(tmp_path, capsys):
    spec = DictionarySpec("topk", "blocks.2.mixer.hook_post", "blocks.2.mixer.hook_post", 200, 200, 16, 2, "other")
    wrong_width = tmp_path / "wide"
    wrong_width.mkdir()
    save_dictionary(new_coder(spec), spec, wrong_width)
    no_layer = tmp_path / "deep"
    no_layer.mkdir()
    spec9 = DictionarySpec("topk", "blocks.9.mixer.hook_post", "blocks.9.mixer.hook_post", 256, 256, 16, 2, "x")
    save_dictionary(new_coder(spec9), spec9, no_layer)
    cases = {tmp_path / "missing": "not a dictionary", wrong_width: "width 200", no_layer: "layers 0..3"}
    for directory, says in cases.items():
        out = tmp_path / f"out-{directory.name}"
        code = main(["census", "--model", "tiny-mamba", "--max-tokens", "512", "--window", "32", "--no-ablation",
                     "--no-report", "--dictionary", str(directory), "--out", str(out), "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, err
        assert len(err) == 1 and says in err[0] and "--dictionary" in err[0]
        assert not out.exists()
    code = main(["census", "--model", "tiny-mamba", "--detector-precision", "1.5", "--out", str(tmp_path / "p")])
    assert code == 2 and "--detector-precision" in capsys.readouterr().err and not (tmp_path / "p").exists()


@pytest.fixture(scope="module")
def census_out(tmp_path_factory, tiny):
    """``mambascope census --dictionary`` of the hook_post dictionary on layer 2 of tiny-mamba, with its report."""
    model, _, windows = tiny
    tmp = tmp_path_factory.mktemp("features-census")
    path = _post_dictionary(tmp, model, windows)
    out = tmp / "census"
    code = main(["census", "--model", "tiny-mamba", "--max-tokens", "1024", "--window", "32", "--no-ablation",
                 "--layers", str(LAYER), "--dictionary", str(path), "--out", str(out), "--quiet"])
    assert code == 0
    return out, path


def test_census_command_writes_the_feature_store(census_out):
    from mambascope.results import open_results
    from mambascope.results.store import FEATURE_STORE_DIR, NeuronStore

    out, _ = census_out
    slim = json.loads((out / "results.json").read_text())
    assert slim["features"]["store"]["path"] == FEATURE_STORE_DIR and "in_store" in slim["features"]["layers"]["2"]
    results, _ = open_results(out, detail=True)
    full = results["features"]["layers"][str(LAYER)]
    store = NeuronStore(out, FEATURE_STORE_DIR)
    assert store.layers == [LAYER] and store.n_neurons == 40
    page = store.neuron(LAYER, 5)
    assert page["summary"]["frequency"] == full["activation_frequency"][5]
    assert page["logit_effects"]["promoted"] == full["logit_effects"]["promoted"][5]
    assert page["top_contexts"]["values"] == full["top_contexts"]["values"][5]
    assert results["features"]["versus_neurons"]["neurons"]["units"] == 256
    report = (out / "report.html").read_text()
    assert 'id="features"' in report and "Features versus the neurons of layer 2" in report
    pages = (out / "features.html").read_text()
    data = json.loads(pages.split('<script type="application/json" id="neuron-data">')[1].split("</script>")[0])
    assert data["unit"] == "feature" and data["layers"]["2"]["E"] == 40
    assert data["layers"]["2"]["freq"][5] == pytest.approx(full["activation_frequency"][5], rel=1e-3)
    (out / "features.html").unlink()  # `mambascope report DIR` renders the feature pages again, from the store
    assert main(["report", str(out)]) == 0
    assert (out / "features.html").read_text() == pages


def test_serve_shows_feature_pages_and_traces_a_feature(census_out, tiny):
    from starlette.testclient import TestClient

    from mambascope.results import open_results
    from mambascope.serve import create_app
    from mambascope.trace.generate import Steer, dictionary_direction, steered_pair

    out, path = census_out
    model, tokenizer, _ = tiny
    full = open_results(out, detail=True)[0]["features"]["layers"][str(LAYER)]
    with TestClient(create_app(out, model="tiny-mamba"), base_url="http://127.0.0.1",
                    raise_server_exceptions=False) as client:
        assert 'href="features/' in client.get("/").text
        page = client.get("/features/")
        assert page.status_code == 200 and '"unit":"feature"' in page.text
        listing = client.get("/features/api/neurons", params={"sort": "frequency", "order": "desc"}).json()
        assert listing["total"] == 40
        assert [r["frequency"] for r in listing["rows"]] == sorted(full["activation_frequency"], reverse=True)[:50]
        one = client.get(f"/features/api/neuron/{LAYER}/7").json()
        assert one["layer"]["freq"][7] == pytest.approx(full["activation_frequency"][7], rel=1e-3)
        detail = client.get(f"/features/api/detail/{LAYER}/7").json()
        assert detail["logit_effects"]["promoted"] == full["logit_effects"]["promoted"][7]
        assert client.get(f"/features/api/neuron/{LAYER}/40").status_code == 404
        text = "The cat <b>sat</b> on the mat."
        live = client.post("/features/api/trace", json={"text": text, "layer": LAYER, "neuron": 7})
        assert live.status_code == 200 and live.headers["content-type"].startswith("application/json")
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        z = _slow_codes(path, _captured(model, ids, LAYER, "post")[0], 4)[:, 7]
        assert live.json()["activations"] == pytest.approx(z.tolist(), abs=1e-5 * max(1.0, float(z.abs().max())))
        assert live.json()["attention"] is None and live.json()["unit"] == "feature"
        bad = client.post("/features/api/trace", json={"text": text, "layer": LAYER, "neuron": 40})
        assert bad.status_code == 400 and "out of range" in bad.json()["error"]
        long = client.post("/features/api/trace", json={"text": " the" * 5000, "layer": LAYER, "neuron": 7})
        assert long.status_code == 413
        # the steer panel of a feature page: scale·W_dec[7] added at the dictionary's hook, as `steer --feature`
        unit = {"kind": "feature", "layer": LAYER, "feature": 7}
        steered = client.post("/features/api/steer", json={"prompt": "The cat", "unit": unit, "scale": 8.0,
                                                           "max_new_tokens": 4})
        assert steered.status_code == 200, steered.text
        hook, direction = dictionary_direction(path, 7)
        ids = tokenizer("The cat", return_tensors="pt", add_special_tokens=False)["input_ids"]
        want = steered_pair(model, ids, hook, Steer(direction, 8.0), 4)
        assert steered.json()["hook"] == hook == f"blocks.{LAYER}.mixer.hook_post"
        assert steered.json()["steered"]["ids"] == want["steered"][0].tolist()
        assert steered.json()["unsteered"]["ids"] == want["unsteered"][0].tolist()
        assert steered.json()["steered"]["ids"] != steered.json()["unsteered"]["ids"]  # the direction mattered
        neuron_kind = client.post("/features/api/steer", json={"prompt": "The cat", "scale": 1.0, "unit": {
            "kind": "neuron", "layer": LAYER, "neuron": 7}})
        assert neuron_kind.status_code == 400 and "feature" in neuron_kind.json()["error"]


def _pair(tokenizer, windows):
    """Clean and corrupted ids of 8 tokens (two windows' starts) and the clean run's top next token."""
    clean, corrupt = windows[0, 1:9], windows[3, 1:9]
    return clean, corrupt


def test_feature_patch_equals_a_hand_made_hook(tiny, tmp_path):
    from mambascope.interventions.patching import Dictionary, activation_patching

    model, tokenizer, windows = tiny
    path = _post_dictionary(tmp_path, model, windows)
    clean, corrupt = _pair(tokenizer, windows)
    with torch.no_grad():
        target = int(model(clean[None]).logits[0, -1].argmax())
    dictionary = Dictionary(*open_dictionary(path, model), (3, 7, 11))
    result = activation_patching(model, clean, corrupt, target=target, metric="logprob", unit_types=["features"],
                                 dictionary=dictionary, batch_size=5)
    grid = result.grids["features"]
    W = load_file(str(path / "sae_weights.safetensors"))
    z_clean = _slow_codes(path, _captured(model, clean[None], LAYER, "post")[0], 4)
    out_proj = model.backbone.layers[LAYER].mixer.out_proj
    checked = 0
    for row, feature in enumerate((3, 7, 11)):
        for p in range(8):
            def hook(module, args, feature=feature, p=p):
                x = args[0]
                z = _slow_codes(path, x[0], 4)
                change = (z_clean[p, feature] - z[p, feature]).float()
                x = x.clone()
                x[0, p] += change * W["W_dec"][feature]
                return (x,)

            handle = out_proj.register_forward_pre_hook(hook)
            try:
                with torch.no_grad():
                    want = float(torch.log_softmax(model(corrupt[None]).logits[0, -1].double(), -1)[target])
            finally:
                handle.remove()
            # float32 forwards of another batch shape: agreement to float32 rounding of logits of size ~10
            assert float(grid.metric[row, p]) == pytest.approx(want, abs=1e-4)
            checked += bool(grid.changed[row, p])
    assert checked > 0  # some patch changed a feature's activation (the test is not all no-ops)


def test_an_unchanged_feature_patch_leaves_the_forward_exactly(tiny, tmp_path):
    from mambascope.interventions.patching import FEATURES, Dictionary, Patch, run_patched
    from mambascope.trace import trace

    model, tokenizer, windows = tiny
    path = _post_dictionary(tmp_path, model, windows)
    _, corrupt = _pair(tokenizer, windows)
    dictionary = Dictionary(*open_dictionary(path, model))
    hook = dictionary.spec.hook_in
    base = trace(model, corrupt[None].expand(3, -1), names=[hook])
    # the base run's own codes (encoded in the forward's batch shape, so bit for bit): each patch writes z onto z
    source = {FEATURES: dictionary.codes(base[hook])[:1]}
    rows = [[Patch(FEATURES, p, (i,))] for p, i in ((0, 5), (4, 9), (7, 30))]
    patched = run_patched(model, corrupt[None], rows, source, dictionary=dictionary)
    assert torch.equal(patched, base.logits)


def test_patch_command_patches_features(tmp_path, tiny, capsys):
    model, _, windows = tiny
    path = _post_dictionary(tmp_path, model, windows)
    common = ["patch", "--model", "tiny-mamba", "--clean", "The cat sat on the mat", "--corrupt",
              "The dog sat on the mat", "--target", " and", "--quiet", "--no-report"]
    out = tmp_path / "patch"
    assert main([*common, "--units", "features", "--dictionary", str(path), "--features", "3,7",
                 "--out", str(out)]) == 0
    patching = json.loads((out / "results.json").read_text())["patching"]
    assert patching["grids"]["features"]["layers"] == [LAYER, LAYER]
    assert patching["dictionary"]["features"] == [3, 7]
    capsys.readouterr()
    assert main([*common, "--units", "features", "--out", str(tmp_path / "no")]) == 2
    assert "--dictionary" in capsys.readouterr().err and not (tmp_path / "no").exists()
    assert main([*common, "--units", "features", "--dictionary", str(path), "--features", "40",
                 "--out", str(tmp_path / "no")]) == 2
    assert "out of range" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_transcoder_feature_patch_equals_hand_made_hooks(tiny, tmp_path):
    """A transcoder reads blocks.1.hook_resid_pre and writes blocks.1.hook_mixer_out: the patch reads the block's
    input on the way and changes the mixer's output, as a block pre-hook and a mixer forward hook do by hand."""
    from mambascope.interventions.patching import Dictionary, activation_patching

    model, tokenizer, windows = tiny
    spec = DictionarySpec("transcoder", "blocks.1.hook_resid_pre", "blocks.1.hook_mixer_out", 128, 128, 24, 3,
                          "tiny-mamba")
    torch.manual_seed(2)
    coder = new_coder(spec)
    with torch.no_grad():
        coder.encoder.bias.copy_(0.1 * torch.randn(24))
        coder.W_dec.copy_(torch.randn(24, 128))
    path = tmp_path / "tc"
    path.mkdir()
    save_dictionary(coder, spec, path)
    clean, corrupt = _pair(tokenizer, windows)
    with torch.no_grad():
        target = int(model(clean[None]).logits[0, -1].argmax())
    result = activation_patching(model, clean, corrupt, target=target, metric="logprob", unit_types=["features"],
                                 dictionary=Dictionary(*open_dictionary(path, model), (0, 5)), batch_size=4)
    W = load_file(str(path / "sae_weights.safetensors"))
    block = model.backbone.layers[1]
    z_clean = _slow_codes(path, _captured(model, clean[None], 1, "resid")[0], 3)
    changed = 0
    for row, feature in enumerate((0, 5)):
        for p in range(8):
            seen = {}

            def read(module, args, seen=seen):
                seen["x"] = args[0]

            def patch(module, args, out, feature=feature, p=p, seen=seen):
                change = (z_clean[p, feature] - _slow_codes(path, seen["x"][0], 3)[p, feature]).float()
                out = out.clone()
                out[0, p] += change * W["W_dec"][feature]
                return out

            handles = [block.register_forward_pre_hook(read), block.mixer.register_forward_hook(patch)]
            try:
                with torch.no_grad():
                    want = float(torch.log_softmax(model(corrupt[None]).logits[0, -1].double(), -1)[target])
            finally:
                for handle in handles:
                    handle.remove()
            assert float(result.grids["features"].metric[row, p]) == pytest.approx(want, abs=1e-4)
            changed += bool(result.grids["features"].changed[row, p])
    assert changed > 0
