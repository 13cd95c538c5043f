"""``mambascope serve``'s steer panel (``POST /api/steer``) and attribution page (``/attribute``,
``POST /api/attribute``) through Starlette's test client.

The output and model are tests/serve_fixtures.py's (the random 2-layer Mamba-1 of report_fixtures, saved as a
checkpoint the server loads).  Every number is checked against a computation outside the server: a fresh copy
of the model (``mamba_model()``, the same seed) run through ``mambascope.generate`` with a ``Steer`` edit built
here, through ``input_attribution``'s functions called directly, and, for gradient x input, a hand-computed
``torch.autograd`` gradient of Hugging Face's own forward at the embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from starlette.testclient import TestClient

from mambascope.serve import create_app
from report_fixtures import mamba_model
from serve_fixtures import EVIL, served_output

BASE = "http://127.0.0.1"
PROMPT = "The cat sat on the"
NEURON = {"kind": "neuron", "layer": 1, "neuron": 7}
TEXT = "The cat sat on the mat. The cat"


@pytest.fixture(scope="module")
def client() -> TestClient:
    out, model = served_output()
    with TestClient(create_app(out, model=str(model)), base_url=BASE, raise_server_exceptions=False) as c:
        yield c


def _ids(text: str) -> torch.Tensor:
    tokenizer = mamba_model()[1]
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def _error(r, status: int) -> str:
    """The one-line message of a JSON error with ``status`` (and no traceback)."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    message = r.json()["error"]
    assert "\n" not in message and "Traceback" not in r.text
    return message


# ---------------------------------------------------------------------------------------------- pages

def test_panels_render(client: TestClient) -> None:
    page = client.get("/").text
    for needle in ('<section id="steer">', 'id="steer-form"', 'id="steer-scale"', 'id="steer-mode"',
                   'id="steer-positions"', 'id="steer-new"', 'max="128"', '<script src="static/steer.js">',
                   '<a href="attribute">Attribute</a>'):
        assert needle in page, needle
    attribute = client.get("/attribute")
    assert attribute.status_code == 200 and "default-src 'self'" in attribute.headers["content-security-policy"]
    from mambascope.attribution.input_attribution import TOKEN_METHODS

    for needle in ('id="attribute-form"', 'id="attribute-text"', 'id="attribute-target"', 'max="64"',
                   "At most 128 tokens and 64 integrated-gradients steps", '<script src="static/attribute.js">',
                   *(f'value="{m}"' for m in TOKEN_METHODS)):
        assert needle in attribute.text, needle
    for name in ("steer.js", "attribute.js"):
        assert client.get(f"/static/{name}").status_code == 200


def test_without_a_model_the_panels_say_why() -> None:
    with TestClient(create_app(served_output()[0], live=False), base_url=BASE) as c:
        assert "No steering: started without a model (--no-model)" in c.get("/").text
        assert "No live attribution: started without a model" in c.get("/attribute").text
        steer = c.post("/api/steer", json={"prompt": "a", "unit": NEURON, "scale": 1.0})
        assert "no live model" in _error(steer, 409)
        assert "no live model" in _error(c.post("/api/attribute", json={"text": "a"}), 409)


# ---------------------------------------------------------------------------------------------- steer

@pytest.mark.parametrize(("mode", "scale", "positions", "ranges"), [
    ("add", 5.0, None, None), ("set", -3.0, "2:", ((2, None),)), ("add", 8.0, "1,5:9", ((1, 2), (5, 9))),
])
def test_steer_equals_generate_called_directly(client: TestClient, mode: str, scale: float,
                                               positions: str | None, ranges) -> None:
    from mambascope.trace.generate import Steer, generate

    new = 8
    body = client.post("/api/steer", json={"prompt": PROMPT, "unit": NEURON, "scale": scale, "mode": mode,
                                           "positions": positions, "max_new_tokens": new}).json()
    model, tokenizer = mamba_model()  # a fresh copy of the weights, not the server's
    ids = _ids(PROMPT)
    width = model.config.intermediate_size  # Mamba-1's neurons: the d_inner channels of hook_post
    direction = torch.zeros(width)
    direction[NEURON["neuron"]] = 1.0
    edit = Steer(direction, scale, ranges, mode)
    plain = generate(model, ids, new)[0, ids.shape[1]:].tolist()
    steered = generate(model, ids, new, edits={"blocks.1.mixer.hook_post": edit})[0, ids.shape[1]:].tolist()
    assert body["unsteered"]["ids"] == plain and body["steered"]["ids"] == steered
    assert plain != steered  # the edit changes this continuation, so the comparison above can tell
    assert body["steered"]["text"] == tokenizer.decode(steered)
    assert body["unsteered"]["tokens"] == [tokenizer.decode([i]) for i in plain]
    assert body["prompt_tokens"] == [tokenizer.decode([i]) for i in ids[0].tolist()]
    assert body["hook"] == "blocks.1.mixer.hook_post" and body["unit"] == NEURON
    assert body["positions"] == (None if ranges is None else [list(r) for r in ranges])


def test_steer_unsteered_equals_hugging_face_greedy(client: TestClient) -> None:
    """The unsteered continuation against the model's own greedy ``generate`` (no mambascope code)."""
    body = client.post("/api/steer", json={"prompt": PROMPT, "unit": NEURON, "scale": 1.0,
                                           "max_new_tokens": 6}).json()
    model, _ = mamba_model()
    ids = _ids(PROMPT)
    hf = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)[0, ids.shape[1]:].tolist()
    assert body["unsteered"]["ids"] == hf


def test_steer_keeps_hostile_text_as_data(client: TestClient) -> None:
    r = client.post("/api/steer", json={"prompt": EVIL, "unit": NEURON, "scale": 2.0, "max_new_tokens": 3})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "".join(r.json()["prompt_tokens"]) == EVIL  # returned as JSON strings; the page sets textContent
    bad = client.post("/api/steer", json={"prompt": "a", "unit": NEURON, "scale": 1.0, "mode": EVIL})
    assert EVIL in _error(bad, 400)  # echoed inside JSON only, never in an HTML page


RAW_STEER = '{"prompt": "a", "unit": {"kind": "neuron", "layer": 1, "neuron": 7}, "scale": %s}'


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"prompt": "", "unit": NEURON, "scale": 1.0}, 400, "prompt: give a non-empty string"),
    ({"unit": NEURON, "scale": 1.0}, 400, "prompt: give a non-empty string"),
    ({"prompt": "a", "unit": NEURON, "scale": "1"}, 400, "scale: give a finite number"),
    ({"prompt": "a", "unit": NEURON, "scale": True}, 400, "scale: give a finite number"),
    ({"prompt": "a", "unit": NEURON}, 400, "scale: give a finite number"),
    ({"prompt": "a", "unit": NEURON, "scale": 1.0, "mode": "mul"}, 400, "mode: 'mul' is not one of add, set"),
    ({"prompt": "a", "unit": NEURON, "scale": 1.0, "positions": "x"}, 400, "positions: 'x' is not N, A:B or A:"),
    ({"prompt": "a", "unit": NEURON, "scale": 1.0, "positions": "3:1"}, 400, "positions: '3:1' is not a non-empty"),
    ({"prompt": "a", "unit": NEURON, "scale": 1.0, "positions": [1]}, 400, "positions: give a string"),
    ({"prompt": "a", "unit": NEURON, "scale": 1.0, "max_new_tokens": 0}, 400, "max_new_tokens: give an integer in"),
    ({"prompt": "a", "unit": NEURON, "scale": 1.0, "max_new_tokens": 129}, 400, "in 1..128"),
    ({"prompt": "a", "unit": NEURON, "scale": 1.0, "max_new_tokens": "5"}, 400, "max_new_tokens"),
    ({"prompt": "a", "scale": 1.0}, 400, "unit: give an object whose kind is one of neuron"),
    ({"prompt": "a", "unit": {"kind": "feature", "index": 3}, "scale": 1.0}, 400, "unit: give an object"),
    ({"prompt": "a", "unit": {"kind": "neuron", "layer": 1}, "scale": 1.0}, 400, "neuron: give an integer"),
    ({"prompt": "a", "unit": {**NEURON, "layer": 9}, "scale": 1.0}, 400, "layer: 9 is not a layer of this output"),
    ({"prompt": "a", "unit": {**NEURON, "neuron": 64}, "scale": 1.0}, 400, "neuron 64: layer 1 has neurons 0..63"),
    ({"prompt": "x " * 1100, "unit": NEURON, "scale": 1.0}, 413, "at most 1024 for a steered prompt"),
    ({"prompt": "x" * 30000, "unit": NEURON, "scale": 1.0}, 413, "prompt: 30000 characters; at most 20000"),
])
def test_steer_bad_input(client: TestClient, body: dict, status: int, message: str) -> None:
    assert message in _error(client.post("/api/steer", json=body), status)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_steer_scale_must_be_finite(client: TestClient, literal: str) -> None:
    # Python's json reads NaN / Infinity literals and overflows 1e999 to inf: the check is on the value
    r = client.post("/api/steer", content=RAW_STEER % literal, headers={"Content-Type": "application/json"})
    assert "scale: give a finite number" in _error(r, 400)


# ---------------------------------------------------------------------------------------- attribution

METHODS = ["gradient_x_input", "integrated_gradients", "occlusion", "lrp", "knockout", "attention_weighted"]


def test_attribution_equals_input_attribution_called_directly(client: TestClient) -> None:
    from mambascope.attribution import input_attribution as ia

    body = client.post("/api/attribute", json={"text": TEXT, "target": " the", "methods": METHODS,
                                               "ig_steps": 16, "baseline": "zero"}).json()
    model, tokenizer = mamba_model()
    ids = _ids(TEXT)[0]
    P, t = len(ids) - 1, tokenizer(" the", add_special_tokens=False).input_ids[0]
    assert body["target"]["id"] == t and body["target"]["position"] == P and body["target"]["token"] == " the"
    assert body["tokens"] == [tokenizer.decode([i]) for i in ids.tolist()] and body["errors"] == {}
    want = [ia.gradient_x_input(model, ids, P, t), ia.integrated_gradients(model, ids, P, t, n_steps=16,
                                                                            baseline="zero"),
            ia.occlusion(model, ids, P, t, baseline="zero"), ia.mamba_lrp(model, ids, P, t),
            ia.knockout(model, ids, P, t),
            *ia.neuron_method("attention_weighted")(model, ids, P, t, ia.Settings())]
    got = body["rows"]
    assert [(r["method"], r["layer"]) for r in got] == [(w.method, w.layer) for w in want]
    for row, ref in zip(got, want, strict=True):
        # the same float32 computation on the same weights; 1e-5 of the row's largest value absorbs the
        # summation order of a second run
        scale = float(ref.relevance.abs().max())
        assert row["relevance"] == pytest.approx(ref.relevance.tolist(), rel=1e-5, abs=1e-5 * scale), row["method"]
    ig = got[1]
    assert ig["n_steps"] == 16 and ig["baseline"] == ia.BASELINES["zero"]


def test_gradient_x_input_equals_a_hand_computed_gradient(client: TestClient) -> None:
    """R_j = Σ_d e[j, d]·∂logit[P, t]/∂e[j, d] from torch.autograd through Hugging Face's own forward
    (``inputs_embeds``), with the model's top prediction as the target."""
    body = client.post("/api/attribute", json={"text": TEXT, "methods": ["gradient_x_input"]}).json()
    model, _ = mamba_model()
    ids = _ids(TEXT)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=emb).logits[0, -1]
    top = int(logits.argmax())
    (grad,) = torch.autograd.grad(logits[top], emb)
    ref = (emb * grad)[0].sum(-1).detach()
    assert body["target"]["id"] == top and body["target"]["chosen"] == "top prediction"
    # float32 through two implementations of the scan (HF's sequential loop, the tracer's): they agree to
    # about 1e-6 relative per operation; 1e-4 of the largest |R| bounds the accumulated difference
    scale = float(ref.abs().max())
    assert body["rows"][0]["relevance"] == pytest.approx(ref.tolist(), rel=1e-4, abs=1e-4 * scale)


def test_attribution_defaults_and_hostile_text(client: TestClient) -> None:
    from mambascope.attribution.input_attribution import WHOLE_MODEL_METHODS

    r = client.post("/api/attribute", json={"text": EVIL})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert "".join(body["tokens"]) == EVIL and body["text"] == EVIL
    assert body["methods"] == list(WHOLE_MODEL_METHODS) and body["settings"]["ig_steps"] == 64
    bad = client.post("/api/attribute", json={"text": "a", "target": EVIL})
    assert "target '<script>alert(1)</script>' must be a single token" in _error(bad, 400)


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"text": ""}, 400, "text: give a non-empty string"),
    ({}, 400, "text: give a string"),
    ({"text": 3}, 400, "text: give a string"),
    ({"text": "a b", "target": " the cat"}, 400, "target ' the cat' must be a single token"),
    ({"text": "a b", "target": ""}, 400, "target '' must be a single token"),
    ({"text": "a b", "target": 5}, 400, "target: give the token's text"),
    ({"text": "a b", "methods": ["nope"]}, 400, "methods: unknown attribution method 'nope'"),
    ({"text": "a b", "methods": []}, 400, "methods: give a non-empty list"),
    ({"text": "a b", "methods": "lrp"}, 400, "methods: give a non-empty list"),
    ({"text": "a b", "ig_steps": 0}, 400, "ig_steps: give an integer in 1..64"),
    ({"text": "a b", "ig_steps": 65}, 400, "ig_steps: give an integer in 1..64"),
    ({"text": "a b", "ig_steps": 2.5}, 400, "ig_steps: give an integer"),
    ({"text": "a b", "baseline": "noise"}, 400, "baseline: 'noise' is not one of mean, zero"),
    ({"text": "a b", "position": 9}, 400, "position: 9 is outside the text"),
    ({"text": "a b", "position": True}, 400, "position: give an integer"),
    ({"text": "x " * 129}, 413, "tokens; at most 128 for a live attribution"),
    ({"text": "x" * 20001}, 413, "text: 20001 characters; at most 20000"),
])
def test_attribution_bad_input(client: TestClient, body: dict, status: int, message: str) -> None:
    assert message in _error(client.post("/api/attribute", json=body), status)


# ------------------------------------------------------------------------------------- guard and limits

@pytest.mark.parametrize(("path", "body"), [
    ("/api/steer", {"prompt": PROMPT, "unit": NEURON, "scale": 1.0, "max_new_tokens": 2}),
    ("/api/attribute", {"text": TEXT, "methods": ["gradient_x_input"]}),
    ("/api/trace", {"text": TEXT, "layer": 1, "neuron": 7}),
])
def test_a_busy_model_answers_503_after_the_wait(client: TestClient, monkeypatch: pytest.MonkeyPatch, path: str,
                                                 body: dict) -> None:
    """One computation at a time: while another holds the model, a request waits ``LOCK_WAIT_S``, then 503."""
    from mambascope.serve import live

    monkeypatch.setattr(live, "LOCK_WAIT_S", 0.2)
    model = client.app.state.explorer.live
    assert model._lock.acquire(timeout=30)
    try:
        assert "the model is busy" in _error(client.post(path, json=body), 503)
    finally:
        model._lock.release()
    assert client.post(path, json=body).status_code == 200


@pytest.mark.parametrize("path", ["/api/steer", "/api/attribute"])
def test_the_guard_covers_the_panels(client: TestClient, path: str) -> None:
    body = json.dumps({"text": "a", "prompt": "a", "unit": NEURON, "scale": 1.0})
    r = client.post(path, content=body, headers={"Content-Type": "application/json", "Origin": "http://evil.test"})
    assert "cross-origin request" in _error(r, 403)
    assert _error(client.post(path, content=body, headers={"Content-Type": "text/plain"}), 415)
    assert _error(client.post(path, content=b" " * 300_000, headers={"Content-Type": "application/json"}), 413)
    assert _error(client.post(path, content=b"[1]", headers={"Content-Type": "application/json"}), 400)
    assert client.get(path).status_code == 405


def test_cli_steer_and_the_panel_give_the_same_continuations(client: TestClient, tmp_path: Path) -> None:
    """``mambascope steer --out`` (the CLI's steer.json) and the panel, on the same checkpoint and unit."""
    from mambascope.cli import main

    model = str(served_output()[1])
    code = main(["steer", "--model", model, "--device", "cpu", "--prompt", PROMPT, "--unit", "1:7", "--scale", "5",
                 "--positions", "1,3:", "--max-new-tokens", "8", "--out", str(tmp_path / "s"), "--quiet"])
    assert code == 0
    cli = json.loads((tmp_path / "s" / "steer.json").read_text())
    body = client.post("/api/steer", json={"prompt": PROMPT, "unit": NEURON, "scale": 5, "positions": "1,3:",
                                           "max_new_tokens": 8}).json()
    assert cli["prompt_ids"] == _ids(PROMPT)[0].tolist()  # the CLI's encode gives the panel's ids here
    assert cli["tokens"] == {"unsteered": body["unsteered"]["ids"], "steered": body["steered"]["ids"]}
    assert cli["texts"] == {"unsteered": body["unsteered"]["text"], "steered": body["steered"]["text"]}


# ------------------------------------------------------------------------------------------ other models

def test_a_family_generate_does_not_cover_says_why() -> None:
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    from mambascope.serve.live import LiveInputError, LiveModel

    torch.manual_seed(0)
    model = FalconMambaForCausalLM(FalconMambaConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2,
                                                     state_size=8)).eval()
    live = LiveModel(model, mamba_model()[1], "random-falcon-mamba")
    reason = live.describe()["steer"]["reason"]
    assert "generate does not support the falcon_mamba family" in reason
    hook, direction = live.neuron_steering(1, 3)
    with pytest.raises(LiveInputError, match="generate does not support the falcon_mamba family"):
        live.steer("the cat", hook, direction, 1.0)


def test_the_models_maximum_length_bounds_both_panels() -> None:
    """A GPT-2 with 16 positions: prompt + new tokens must fit, and the attribution text is cut to 16 tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mambascope.serve.live import LiveInputError, LiveModel, LiveTooLongError
    from mambascope.trace.generate import Steer, generate

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=2, n_positions=16)).eval()
    tokenizer = mamba_model()[1]
    live = LiveModel(model, tokenizer, "random-gpt2")
    hook, direction = live.neuron_steering(1, 3)
    assert hook == "blocks.1.mlp.hook_post" and direction.shape == (4 * 32,)
    ids = _ids("the cat sat")
    with pytest.raises(LiveInputError, match="exceed the model's maximum length 16"):
        live.steer("the cat sat", hook, direction, 1.0, max_new_tokens=16 - ids.shape[1] + 1)
    new = 16 - ids.shape[1]  # the longest continuation that fits
    body = live.steer("the cat sat", hook, direction, 4.0, "set", "0:", new)
    edit = Steer(torch.eye(128)[3], 4.0, ((0, None),), "set")
    assert body["steered"]["ids"] == generate(model, ids, new, edits={hook: edit})[0, ids.shape[1]:].tolist()
    assert live.describe()["attribute"]["max_tokens"] == 16
    with pytest.raises(LiveTooLongError, match="at most 16 for a live attribution"):
        live.attribute("the cat sat on the mat " * 4, methods=["gradient_x_input"])
