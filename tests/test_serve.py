"""``mambascope serve``: the HTTP API and pages through Starlette's test client, and the CLI.

The output served is tests/serve_fixtures.py's (the random Mamba of report_fixtures, written by the package's
own writers, one corpus token replaced by markup).  Every number is checked against a source other than the
code under test: results.json's arrays as the pipeline computed them (``mamba_results()``), the full-results
neuron payload, and, for live traces, an independent ``mambascope.trace.trace`` call and the loop reference of
hidden attention.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from starlette.testclient import TestClient

from mambascope.report.neuron_payload import neuron_data
from mambascope.serve import create_app
from report_fixtures import mamba_model, mamba_results
from serve_fixtures import EVIL, served_output

BASE = "http://127.0.0.1"


@pytest.fixture(scope="module")
def output() -> Path:
    return served_output()[0]


@pytest.fixture(scope="module")
def client(output: Path) -> TestClient:
    app = create_app(output, model=str(served_output()[1]))
    with TestClient(app, base_url=BASE, raise_server_exceptions=False) as c:
        yield c


def _no_traceback(response) -> None:
    assert "Traceback" not in response.text and 'File "' not in response.text


# ---------------------------------------------------------------------------------------------- pages

def test_summary_page_and_api(client: TestClient, output: Path) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    text = page.text
    for needle in ('<section id="explore">', "Key counts per layer", '<section id="summary">', 'id="live-form"',
                   '<link rel="stylesheet" href="static/report.css">', '<script src="static/neurons.js">'):
        assert needle in text, needle
    figures = re.findall(r'<img alt="[^"]*" src="(figures/[^"]+\.png)">', text)
    assert len(figures) == len(list((output / "figures").glob("*.png"))) > 5
    png = client.get("/" + figures[0])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content == (output / figures[0]).read_bytes()
    for name in ("report.css", "neurons.js", "serve.js"):
        assert client.get(f"/static/{name}").status_code == 200
    summary = client.get("/api/summary").json()
    results = mamba_results()
    assert summary["layers"] == {k: r["n_neurons"] for k, r in results["layers"].items()}
    assert summary["n_neurons"] == sum(r["n_neurons"] for r in results["layers"].values())
    assert summary["model"]["name"] == "tiny-random-mamba"
    assert summary["live"]["available"] is True


def test_corpus_markup_is_escaped(client: TestClient) -> None:
    page = client.get("/").text
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the detector table's chip
    hits = client.get("/api/neurons", params={"q": "<script>", "layer": 0}).json()
    assert hits["total"] >= 1 and all(EVIL in r["detector_tokens"] for r in hits["rows"])
    neuron = client.get("/api/neuron/0/3")
    assert neuron.headers["content-type"] == "application/json"  # data, never rendered as HTML by the browser
    assert EVIL in neuron.json()["strings"]


def test_error_pages_are_escaped_and_have_no_traceback(client: TestClient) -> None:
    r = client.get("/figures/" + "%3Cscript%3Ealert(1)%3C%2Fscript%3E.png")
    assert r.status_code == 404 and "<script>alert" not in r.text
    r = client.get("/api/neurons", params={"sort": "<b>x</b>"})
    assert r.status_code == 400 and r.json()["error"].startswith("sort: '<b>x</b>' is not a column")
    assert r.headers["content-type"] == "application/json"


# ---------------------------------------------------------------------------------------- traversal

@pytest.mark.parametrize("path", [
    "/figures/../results.json", "/figures/..%2Fresults.json", "/figures/%2e%2e/results.json",
    "/figures/%2e%2e%2fresults.json", "/figures/..%5Cresults.json", "/figures//etc/passwd",
    "/figures/%2Fetc%2Fpasswd.png", "/figures/....//results.json", "/figures/%252e%252e%252fresults.json",
    "/figures/../../../../etc/passwd", "/static/../results.json", "/static/..%2F..%2Fstore.py",
    "/static/%2e%2e/html.py", "/figures/x.png%00.png", "/results.json", "/store/manifest.json",
    "/.mambascope",
])
def test_no_path_outside_the_figures_is_readable(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code in (400, 404), (path, r.status_code)
    assert '"n_neurons"' not in r.text and "root:" not in r.text and "def " not in r.text
    _no_traceback(r)


def test_symlink_out_of_dir_is_refused(client: TestClient, output: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\nsecret")
    link = output / "figures" / "outside.png"
    link.symlink_to(secret)
    try:
        r = client.get("/figures/outside.png")
        assert r.status_code == 404 and b"secret" not in r.content
    finally:
        link.unlink()


# ---------------------------------------------------------------------------------- search and sort

def _rows(results: dict, key: str) -> list[tuple[int, int, float]]:
    return [(int(layer), e, v) for layer, r in results["layers"].items() for e, v in enumerate(r[key])]


@pytest.mark.parametrize(("column", "source"), [("frequency", "activation_frequency"),
                                                ("positional_mi", "positional_mi")])
def test_sort_by_a_statistic_with_paging(client: TestClient, column: str, source: str) -> None:
    want = sorted(_rows(mamba_results(), source), key=lambda x: (-x[2], x[0], x[1]))
    got = []
    for offset in range(0, len(want), 50):
        page = client.get("/api/neurons", params={"sort": column, "order": "desc", "offset": offset,
                                                  "limit": 50}).json()
        assert page["total"] == len(want) and page["offset"] == offset
        got += [(r["layer"], r["neuron"], r[column]) for r in page["rows"]]
    assert [(layer, e) for layer, e, _ in got] == [(layer, e) for layer, e, _ in want]
    assert [v for *_, v in got] == pytest.approx([v for *_, v in want])


def test_sort_by_delta_detector_and_importance(client: TestClient) -> None:
    results = mamba_results()
    r1 = results["layers"]["1"]
    page = client.get("/api/neurons", params={"layer": 1, "sort": "dt_selectivity", "limit": 5}).json()
    top_units = [d["index"] for d in r1["delta_sensitive"][:5]]
    assert [r["neuron"] for r in page["rows"]] == top_units  # Mamba-1: one neuron per Δ channel
    imp = results["attention_neurons"]["results"]["attention_weighted"]["1"]["importance"]
    page = client.get("/api/neurons", params={"sort": "importance_attention_weighted", "limit": 3}).json()
    assert [(r["layer"], r["neuron"]) for r in page["rows"]] == \
        [(1, e) for e in sorted(range(len(imp)), key=lambda e: -imp[e])[:3]]
    page = client.get("/api/neurons", params={"sort": "detector_token", "order": "asc", "limit": 500}).json()
    named = [r["detector_token"] for r in page["rows"] if r["detector_token"] is not None]
    assert named == sorted(named) and len(named) == sum(len(r["token_detectors"]) for r in results["layers"].values())
    page = client.get("/api/neurons", params={"layer": 0, "sort": "neuron", "order": "asc"}).json()
    assert [r["neuron"] for r in page["rows"]] == list(range(50)) and page["total"] == 64


@pytest.mark.parametrize("params", [
    {"sort": "nope"}, {"order": "sideways"}, {"limit": "0"}, {"limit": "100000"}, {"offset": "-1"},
    {"offset": "x"}, {"layer": "7"}, {"layer": "a"}, {"q": "x" * 500},
])
def test_malformed_search_params_get_4xx_json(client: TestClient, params: dict) -> None:
    r = client.get("/api/neurons", params=params)
    assert 400 <= r.status_code < 500 and set(r.json()) == {"error", "status"}
    _no_traceback(r)


# ---------------------------------------------------------------------------------------- neurons

def test_neuron_payload_equals_the_full_results_payload(client: TestClient) -> None:
    results = mamba_results()
    results["layers"]["0"]["token_detectors"][0]["token_strings"][0] = EVIL
    results["layers"]["0"]["top_contexts"]["tokens"][3][0][-1] = EVIL
    results["layers"]["0"]["logit_effects"]["promoted"][3][0] = EVIL
    full = neuron_data(results)  # from the pipeline's dict, not the store
    for layer, e in ((0, 3), (1, 63)):
        body = client.get(f"/api/neuron/{layer}/{e}").json()
        d, ref = body["layer"], full["layers"][str(layer)]
        assert d["embedded"] == [e] and d["E"] == ref["E"] and d["freq"] == ref["freq"]
        for part, keys in (("ctx", ("v", "a", "s")), ("logit", ("v", "s"))):
            for key in keys:
                assert d[part][key][e] == ref[part][key][e], (part, key)
                assert all(x is None for i, x in enumerate(d[part][key]) if i != e)
        strings = lambda ids, s: [s[i] for i in ids]  # noqa: E731
        assert strings(d["logit"]["p"][e], body["strings"]) == strings(ref["logit"]["p"][e], full["strings"])
        row, ref_row = d["attn"]["index"][str(e)], ref["attn"]["index"][str(e)]
        assert d["attn"]["v"][row] == ref["attn"]["v"][ref_row]
        detail = client.get(f"/api/detail/{layer}/{e}").json()
        assert detail["top_contexts"]["values"] == results["layers"][str(layer)]["top_contexts"]["values"][e]


@pytest.mark.parametrize(("path", "status"), [("/api/neuron/0/64", 404), ("/api/neuron/5/0", 404),
                                              ("/api/neuron/-1/0", 404), ("/api/neuron/x/1", 400),
                                              ("/api/detail/0/99999", 404), ("/api/neuron/0/1e3", 400)])
def test_bad_neurons(client: TestClient, path: str, status: int) -> None:
    r = client.get(path)
    assert r.status_code == status and r.json()["error"]
    _no_traceback(r)


def test_by_token(client: TestClient) -> None:
    results = mamba_results()
    det = results["layers"]["1"]["token_detectors"][0]
    token = det["token_strings"][0]
    body = client.get("/api/by_token", params={"token": token, "k": 200}).json()
    found = {(r["layer"], r["neuron"]) for r in body["rows"]}
    detectors = {(int(layer), d["neuron"]) for layer, r in results["layers"].items()
                 for d in r["token_detectors"] if token in d["token_strings"]}
    assert detectors and detectors <= found
    assert [r["source"] for r in body["rows"]][:len(detectors)] == ["detector"] * len(detectors)
    assert client.get("/api/by_token").status_code == 400
    assert client.get("/api/by_token", params={"token": "x", "k": "0"}).status_code == 400
    assert client.get("/api/by_token", params={"token": "no such token \u2603"}).json()["rows"] == []


# ---------------------------------------------------------------------------------------- live trace

def test_live_trace_equals_an_independent_trace(client: TestClient) -> None:
    from mambascope.ssm.reference import hidden_attention_loops
    from mambascope.trace import mixer_params, trace

    text = "The cat sat on the mat, and the dog sat too."
    layer, neuron, position = 1, 7, 5
    body = client.post("/api/trace", json={"text": text, "layer": layer, "neuron": neuron,
                                           "position": position}).json()
    model, tokenizer = mamba_model()  # a fresh copy of the weights, not the server's
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    names = [f"blocks.{layer}.mixer.{u}" for u in ("hook_post", "hook_dt", "hook_B", "hook_C")]
    tr = trace(model, ids, names)
    assert body["tokens"] == [tokenizer.decode([i]) for i in ids[0].tolist()]
    assert body["activations"] == pytest.approx(tr[names[0]][0, :, neuron].tolist(), rel=1e-5, abs=1e-7)
    params = mixer_params(model, layer)
    ref = hidden_attention_loops(tr[names[1]].double(), params.A.double(), tr[names[2]].double(),
                                 tr[names[3]].double())[0, neuron, position, :position + 1]
    assert body["attention"]["unit"] == "channel" and body["attention"]["index"] == neuron
    assert body["attention"]["row"] == pytest.approx(ref.tolist(), rel=1e-4, abs=1e-6)
    assert body["position"] == position
    last = client.post("/api/trace", json={"text": text, "layer": layer, "neuron": neuron}).json()
    assert last["position"] == len(body["tokens"]) - 1 and len(last["attention"]["row"]) == len(body["tokens"])


def test_live_trace_mamba2_rows_are_per_head() -> None:
    """Mamba-2 (bundled tiny-mamba2): the row of the neuron's head, against the loop reference."""
    from mambascope.models import load_model
    from mambascope.serve.live import LiveModel
    from mambascope.ssm.reference import hidden_attention_loops
    from mambascope.trace import mixer_params, trace

    model, tokenizer = load_model("tiny-mamba2", device="cpu")
    text, layer, neuron, position = "Hello there, general Kenobi.", 2, 37, 4
    body = LiveModel(model, tokenizer, "tiny-mamba2").trace(text, layer, neuron, position)
    params = mixer_params(model, layer)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    names = [f"blocks.{layer}.mixer.{u}" for u in ("hook_post", "hook_dt", "hook_B", "hook_C")]
    tr = trace(model, ids, names)
    head = neuron // params.head_dim
    assert body["attention"]["unit"] == "head" and body["attention"]["index"] == head and params.head_dim > 1
    ref = hidden_attention_loops(*(tr[n].double() for n in names[1:2]), params.A.double(),
                                 *(tr[n].double() for n in names[2:]))[0, head, position, :position + 1]
    assert body["attention"]["row"] == pytest.approx(ref.tolist(), rel=1e-4, abs=1e-6)
    assert body["activations"] == pytest.approx(tr[names[0]][0, :, neuron].tolist(), rel=1e-5, abs=1e-7)


def test_live_trace_transformer_layer_has_no_hidden_attention() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from mambascope.serve.live import LiveInputError, LiveModel
    from mambascope.trace import trace

    tokenizer = mamba_model()[1]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=2, n_positions=16)).eval()
    live = LiveModel(model, tokenizer, "random-gpt2")
    body = live.trace("the cat sat", 1, 3)
    assert body["attention"] is None and "has no hidden attention" in body["reason"]
    ids = tokenizer("the cat sat", return_tensors="pt", add_special_tokens=False)["input_ids"]
    ref = trace(model, ids, ["blocks.1.mlp.hook_post"])["blocks.1.mlp.hook_post"][0, :, 3]
    assert body["activations"] == pytest.approx(ref.tolist(), rel=1e-5, abs=1e-7)
    assert live.max_tokens == 16  # the model's own maximum length caps the text
    with pytest.raises(LiveInputError, match="at most 16 for a live trace"):
        live.trace("the cat sat on the mat " * 10, 1, 3)


@pytest.mark.parametrize(("body", "status"), [
    ({"text": "a", "layer": 0}, 400), ({"text": "", "layer": 0, "neuron": 0}, 400),
    ({"text": "a", "layer": 9, "neuron": 0}, 400), ({"text": "a", "layer": 0, "neuron": 64}, 400),
    ({"text": "a b", "layer": 0, "neuron": 0, "position": 40}, 400), ({"text": 3, "layer": 0, "neuron": 0}, 400),
    ({"text": "a", "layer": "0", "neuron": 0}, 400), ({"text": "a", "layer": True, "neuron": 0}, 400),
    ({"text": "x " * 5000, "layer": 0, "neuron": 0}, 413), ({"text": "x" * 30000, "layer": 0, "neuron": 0}, 413),
])
def test_live_trace_bad_input(client: TestClient, body: dict, status: int) -> None:
    r = client.post("/api/trace", json=body)
    assert r.status_code == status, r.text
    _no_traceback(r)


def test_live_trace_bad_bodies(client: TestClient) -> None:
    json_body = {"Content-Type": "application/json"}
    assert client.post("/api/trace", content=b"{not json", headers=json_body).status_code == 400
    assert client.post("/api/trace", content=b"[1, 2]", headers=json_body).status_code == 400
    assert client.post("/api/trace", content=b"\xff\xfe", headers=json_body).status_code == 400
    assert client.post("/api/trace", content=b" " * 300_000, headers=json_body).status_code == 413
    assert client.get("/api/trace").status_code == 405


def test_live_panel_says_why_without_a_model(output: Path) -> None:
    app = create_app(output)  # results.json names "tiny-random-mamba": no such model to load
    with TestClient(app, base_url=BASE) as c:
        page = c.get("/").text
        assert "No live traces: model &#39;tiny-random-mamba&#39; could not be loaded" in page
        r = c.post("/api/trace", json={"text": "a", "layer": 0, "neuron": 0})
        assert r.status_code == 409 and "tiny-random-mamba" in r.json()["error"]
    app = create_app(output, model="tiny-mamba")  # loads, but it is not this output's model
    with TestClient(app, base_url=BASE) as c:
        assert "does not match this output: its layer 0 has 256 neurons, the output&#39;s 64" in c.get("/").text


def test_host_header_guard(output: Path) -> None:
    app = create_app(output, live=False)
    with TestClient(app, base_url="http://evil.example") as c:
        assert c.get("/").status_code == 400  # DNS rebinding: a foreign Host is refused on a local server
    with TestClient(app, base_url="http://localhost:8000") as c:
        assert c.get("/api/summary").status_code == 200


EVIL_ORIGIN = "http://evil.example"
TRACE = {"text": "the cat", "layer": 1, "neuron": 2}


def _at(client: TestClient, base_url: str) -> TestClient:
    """The same app, reached under another URL (its Host header)."""
    return TestClient(client.app, base_url=base_url, raise_server_exceptions=False)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None])
def test_a_foreign_page_cannot_run_the_model(client: TestClient, content_type: str | None) -> None:
    """What a page on another site can send without a CORS preflight: a "simple" body, with its Origin."""
    headers = {"Content-Type": content_type} if content_type else {}
    body = json.dumps(TRACE).encode()
    r = client.post("/api/trace", content=body, headers={**headers, "Origin": EVIL_ORIGIN})
    assert r.status_code == 403 and "evil.example" in r.json()["error"], r.text
    r = client.post("/api/trace", content=body, headers=headers)  # no Origin: still not JSON
    assert r.status_code == 415 and "application/json" in r.json()["error"], r.text
    _no_traceback(r)


@pytest.mark.parametrize("origin", [EVIL_ORIGIN, "null", "http://127.0.0.1:9999", "https://127.0.0.1",
                                    "http://localhost.evil.example", "http://127.0.0.1.evil.example"])
@pytest.mark.parametrize("path", ["/api/neuron/0/1", "/api/neurons", "/api/by_token?token=a", "/api/summary", "/"])
def test_foreign_origins_are_refused(client: TestClient, origin: str, path: str) -> None:
    r = client.get(path, headers={"Origin": origin})
    assert r.status_code == 403, (origin, path, r.status_code)
    r = client.post("/api/trace", json=TRACE, headers={"Origin": origin})
    assert r.status_code == 403, (origin, r.status_code)


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
def test_cross_site_fetches_are_refused(client: TestClient, site: str) -> None:
    """Fetch metadata: another site (or another port of localhost: the same site) may link to the page but
    not use the API, the figures or the scripts, even where the browser sends no Origin (an <img>, a GET)."""
    for path in ("/api/neuron/0/1", "/api/neurons", "/static/serve.js", "/api/summary"):
        assert client.get(path, headers={"Sec-Fetch-Site": site, "Sec-Fetch-Mode": "no-cors"}).status_code == 403
    assert client.get("/api/summary", headers={"Sec-Fetch-Site": site, "Sec-Fetch-Mode": "navigate"}
                      ).status_code == 403
    assert client.post("/api/trace", json=TRACE, headers={"Sec-Fetch-Site": site}).status_code == 403
    page = client.get("/", headers={"Sec-Fetch-Site": site, "Sec-Fetch-Mode": "navigate"})  # a link to the page
    assert page.status_code == 200 and "Explore neurons" in page.text
    for own in ("same-origin", "none"):
        assert client.get("/api/neuron/0/1", headers={"Sec-Fetch-Site": own}).status_code == 200


@pytest.mark.parametrize("base", ["http://127.0.0.1", "http://127.0.0.1:8000", "http://127.0.0.2:8123",
                                  "http://localhost:8000", "http://[::1]:8000", "http://127.1.2.3"])
def test_the_servers_own_origin_is_accepted_on_any_loopback_host(client: TestClient, base: str) -> None:
    own = _at(client, base)
    headers = {"Origin": base, "Sec-Fetch-Site": "same-origin"}
    r = own.post("/api/trace", json=TRACE, headers={**headers, "Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200 and r.json()["neuron"] == 2, r.text
    assert own.get("/api/neuron/0/1", headers=headers).status_code == 200
    other_port = base.rsplit(":", 1)[0] + ":9" if base.count(":") > 1 else base + ":9"
    assert own.post("/api/trace", json=TRACE, headers={"Origin": other_port}).status_code == 403


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.nip.io:8000", "localhost.evil",
                                  "10.0.0.1:8000", "", "a/b"])
def test_dns_rebinding_hosts_are_refused(client: TestClient, host: str) -> None:
    for path in ("/", "/api/summary"):
        r = client.get(path, headers={"Host": host})
        assert r.status_code == 400, (host, path, r.status_code)
    r = client.post("/api/trace", json=TRACE, headers={"Host": host, "Origin": f"http://{host}"})
    assert r.status_code == 400


def test_a_server_on_another_loopback_address_answers_its_own_url(output: Path) -> None:
    """``--host 127.0.0.2``: its URL works (the Host check knew only 127.0.0.1 / localhost / [::1]), its own
    page may post, other sites may not."""
    import httpx

    proc, head, url = _start(str(output), "--host", "127.0.0.2", "--port", "0", "--no-model")
    try:
        assert url.startswith("http://127.0.0.2:") and "warning" not in head
        assert httpx.get(url + "api/summary").json()["n_neurons"] == 128
        origin = url.rstrip("/")
        r = httpx.post(url + "api/trace", json=TRACE, headers={"Origin": origin})
        assert r.status_code == 409 and "no live model" in r.json()["error"]  # allowed through; no model here
        assert httpx.post(url + "api/trace", json=TRACE, headers={"Origin": EVIL_ORIGIN}).status_code == 403
        assert httpx.post(url + "api/trace", content=json.dumps(TRACE), headers={"Origin": origin,
                          "Content-Type": "text/plain"}).status_code == 415
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.stderr.read()
        proc.wait(30)


def _damaged_copy(output: Path, tmp_path: Path, name: str, how: str) -> tuple[Path, Path]:
    """(a copy of the output with one store file damaged, that file)."""
    import shutil

    from test_store import damage_parquet

    copy = tmp_path / "out"
    shutil.copytree(output, copy, symlinks=True)
    damage_parquet(copy / "store" / name, how)
    return copy, copy / "store" / name


def test_a_damaged_store_answers_503_json(output: Path, tmp_path: Path) -> None:
    """Pages whose footer is intact but whose data is not: found only when a request reads them."""
    copy, damaged = _damaged_copy(output, tmp_path, "neurons/layer=0/part-0.parquet", "pages")
    with TestClient(create_app(copy, live=False), base_url=BASE, raise_server_exceptions=False) as c:
        for path in ("/api/neuron/0/5", "/api/detail/0/5"):
            r = c.get(path)
            assert r.status_code == 503 and r.headers["content-type"] == "application/json", (path, r.text)
            error = r.json()["error"]
            assert str(damaged) in error and "damaged" in error and "\n" not in error
            _no_traceback(r)
        assert c.get("/api/neuron/1/5").status_code == 200


@pytest.mark.parametrize("name", ["tokens.parquet", "neurons/layer=1/part-0.parquet", "summary.parquet"])
def test_cli_serve_on_a_truncated_store_is_one_line(output: Path, tmp_path: Path, name: str) -> None:
    """Exit 2 with one line naming the file, before the port is bound (a process: the old code served on)."""
    copy, damaged = _damaged_copy(output, tmp_path, name, "truncate")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "mambascope", "serve", str(copy), "--port", "0", "--no-model"],
                          env=env, capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert str(damaged) in err and "damaged" in err and "serving" not in err


def test_not_an_output(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a mambascope output"):
        create_app(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        create_app(tmp_path / "missing")


# ------------------------------------------------------------------------------------------------ CLI

def _cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    from mambascope.cli import main

    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--port", "70000"], "--port must be between 0 and 65535"), (["--port", "x"], "invalid int value"),
    (["--device", "tpu"], "device"), (["--bogus"], "unrecognized arguments"),
    (["--model", "tiny-mamba", "--no-model"], "--model and --no-model exclude each other"),
])
def test_cli_bad_flags_exit_2(output: Path, capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    code, err = _cli(capsys, "serve", str(output), *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_cli_not_an_output_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = _cli(capsys, "serve", str(tmp_path))
    assert code == 2 and "is not a mambascope output" in err and len(err.strip().splitlines()) == 1


def test_cli_busy_port_is_a_one_line_error(output: Path, capsys: pytest.CaptureFixture) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        code, err = _cli(capsys, "serve", str(output), "--port", str(busy.getsockname()[1]), "--no-model")
    assert code == 2 and "cannot listen on 127.0.0.1:" in err, err


def _start(*args: str) -> tuple[subprocess.Popen, str, str]:
    """(process, its stderr up to the "serving URL" line, URL)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "mambascope", "serve", *args, "--quiet"], env=env,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        m = re.search(r"serving (http://\S+)", line)
        if m:
            return proc, "".join(lines), m.group(1)
    proc.wait(10)
    raise AssertionError("".join(lines))


def test_cli_serves_and_stops_cleanly_on_ctrl_c(output: Path) -> None:
    import httpx

    proc, head, url = _start(str(output), "--port", "0", "--no-model")
    try:
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0/")
        assert "warning" not in head
        assert httpx.get(url + "api/summary").json()["n_neurons"] == 128
    finally:
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        proc.wait(30)
    assert proc.returncode == 0 and "server stopped" in rest, rest


def test_hundreds_of_parallel_requests_against_a_real_server(output: Path) -> None:
    """A browser opening pages, or a script, fires requests in parallel; the server answers them in a thread
    pool.  The store's Parquet reader was one object shared by those threads: 50 parallel neuron pages crashed
    the process (segfault in libarrow) or got 500s (``ReadRangeCache did not find matching cache entry``).
    Here: 3 bursts of about 600 requests (every neuron page twice), 64 at a time, on a fresh server (the first
    burst opens the store's files), each answer 200 and byte-equal to the same request made alone afterwards."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import urlencode

    import httpx

    proc, _, url = _start(str(output), "--port", "0", "--no-model")
    log: list[str] = []
    drain = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)  # a full pipe would stall it
    drain.start()
    paths = [f"api/{kind}/{layer}/{e}" for kind in ("neuron", "detail") for layer in (0, 1) for e in range(64)]
    paths += [f"api/neurons?sort=frequency&offset={k}&limit=7" for k in range(0, 128, 7)]
    tokens = sorted({t for r in mamba_results()["layers"].values() for d in r["token_detectors"]
                     for t in d["token_strings"]})
    paths = 2 * (paths + [f"api/by_token?{urlencode({'token': t, 'k': 5})}" for t in tokens] + ["api/summary"] * 8)
    try:
        with httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=64)) as http:
            def get(path: str) -> tuple[int, bytes]:
                r = http.get(path)
                return r.status_code, r.content

            bursts = []
            for _ in range(3):
                with ThreadPoolExecutor(64) as pool:
                    bursts.append(list(pool.map(get, paths)))
                assert proc.poll() is None, f"the server died (exit {proc.returncode}): {''.join(log)[-2000:]}"
            alone = [get(path) for path in paths]
        assert {status for status, _ in alone} == {200}
        for burst in bursts:
            wrong = [(path, got[0]) for path, got, want in zip(paths, burst, alone, strict=True) if got != want]
            assert not wrong, (wrong[:5], "".join(log)[-2000:])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        drain.join(10)
    assert proc.returncode == 0, "".join(log)[-2000:]


def test_cli_non_local_host_warns(output: Path) -> None:
    proc, head, _ = _start(str(output), "--host", "0.0.0.0", "--port", "0", "--no-model")
    try:
        assert "warning: serving on 0.0.0.0, not only this machine" in head
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.stderr.read()
        proc.wait(30)
    assert proc.returncode == 0
