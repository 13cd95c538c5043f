"""report.html and ``mambascope serve`` in a real headless Chromium: the scripts run, neuron pages render, the
explorer searches, opens neurons and traces text live, with no console errors.

Needs a Chromium binary (Debian: ``apt-get install -y chromium``); skipped, with that reason, where none is
installed, except that with ``MAMBASCOPE_REQUIRE_BROWSER=1`` (set by ``.ci/run``) a missing browser fails
every test instead, so CI cannot pass without having run them.  The static report is driven from the command
line: ``--dump-dom`` serialises the DOM after the page's scripts ran, ``--screenshot`` renders it,
``--enable-logging=stderr`` prints the console (``CONSOLE`` lines, uncaught exceptions included).  The server's
pages need clicks and typing: Playwright (the ``test`` extra) drives the same system Chromium
(``executable_path``; no browser download) against the app served by uvicorn on a free port in a thread.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from report_fixtures import mamba_model, mamba_report, mamba_results
from serve_fixtures import EVIL, served_output

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
CHROMIUM = next((path for path in map(shutil.which, BROWSERS) if path), None)

REQUIRED = os.environ.get("MAMBASCOPE_REQUIRE_BROWSER", "") not in ("", "0")


@pytest.fixture(scope="module", autouse=True)
def browser() -> None:
    """Skip (or, where the browser is required, fail) before the report is built."""
    if CHROMIUM is None:
        why = "no Chromium/Chrome binary on PATH (install it: apt-get install -y chromium)"
        if REQUIRED:
            pytest.fail(f"{why}; MAMBASCOPE_REQUIRE_BROWSER=1 requires the browser tests to run", pytrace=False)
        pytest.skip(why)

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-extensions", "--enable-logging=stderr", "--v=0"]


def _chromium(url: str, tmp: Path, *extra: str) -> tuple[str, str]:
    """(stdout, stderr) of one headless Chromium run on ``url``, with a fresh profile under ``tmp``."""
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    proc = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *extra, url],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def _console(stderr: str, page: str = "report") -> list[str]:
    """Console messages the page logged (CONSOLE lines whose source is our page)."""
    return [line for line in stderr.splitlines() if "CONSOLE" in line and page in line]


def _dom(url: str, tmp: Path) -> tuple[str, list[str]]:
    out, err = _chromium(url, tmp, "--dump-dom")
    return out, _console(err)


@pytest.fixture(scope="module")
def report() -> Path:
    return mamba_report()[1]


def test_neuron_page_renders_from_the_hash(report: Path, tmp_path: Path) -> None:
    dom, console = _dom(report.as_uri() + "#neuron-0-5", tmp_path)
    assert console == [], console
    assert not any("Uncaught" in line for line in console)
    assert re.search(r'<h3 id="neuron-title">Layer 0 · neuron 5</h3>', dom)
    assert re.search(r'<div id="neuron-view">', dom), "the neuron view is shown (no hidden attribute)"
    assert re.search(r'<main id="report" hidden', dom), "the report body is hidden behind it"
    page = dom[dom.index('<div id="neuron-page">'):dom.index('<main id="report"')]
    for heading in ("Top-activating contexts", "Direct logit effects", "Hidden-attention row at the top context"):
        assert heading in page, heading
    spans = re.findall(r'<span class="t[ "][^>]*>', page)
    colours = [m.group(1) for m in map(re.compile(r'background-color: (rgba?\([^)]*\))').search, spans) if m]
    assert len(spans) >= 16 and len(colours) >= 16, "contexts and the attention row show shaded tokens"
    assert all("data-act=" in span for span in spans if "background-color" in span)
    assert any(c.startswith("rgb(") for c in colours), "the peak is fully shaded (alpha 1)"
    assert len(set(colours)) > 3, "shading varies with the activation"
    assert page.count('class="t peak"') + page.count('class="t empty peak"') >= 2
    assert "not computed" not in page
    assert "activation frequency" in page and "Δ selectivity" in page


def test_search_box_and_bad_neurons(report: Path, tmp_path: Path) -> None:
    harness = tmp_path / "report-harness.html"
    probe = """<script>
(function () {
  var N = window.mambascopeNeurons, out = {};
  out.parse = ["L1 N3", "1:3", "l1n3", "layer 1 neuron 3", "1 3", "#neuron-1-3", "L1", "bogus"].map(N.parseQuery);
  out.badLayer = N.render(9, 0);
  out.badLayerMessage = document.getElementById("neuron-message").textContent;
  out.badNeuron = N.render(0, 100000);
  out.badNeuronMessage = document.getElementById("neuron-message").textContent;
  document.getElementById("neuron-search").value = "L1 N3";
  document.getElementById("neuron-search-form").dispatchEvent(new Event("submit", {cancelable: true}));
  window.dispatchEvent(new HashChangeEvent("hashchange"));
  out.hash = location.hash;
  out.title = document.getElementById("neuron-title").textContent;
  var pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script></body>"""
    harness.write_text(report.read_text(encoding="utf-8").replace("</body>", probe), encoding="utf-8")
    dom, console = _dom(harness.as_uri(), tmp_path)
    assert [line for line in console if "report-harness" in line] == []
    out = json.loads(html.unescape(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1)))
    assert out["parse"] == [[1, 3]] * 6 + [None, None]
    assert out["badLayer"] is False and "Layer 9 is not in this report (layers: 0, 1)" in out["badLayerMessage"]
    assert out["badNeuron"] is False and "layer 0 has neurons 0..63" in out["badNeuronMessage"]
    assert out["hash"] == "#neuron-1-3"
    assert out["title"] == "Layer 1 · neuron 3"


def test_report_opens_without_errors(report: Path, tmp_path: Path) -> None:
    dom, console = _dom(report.as_uri(), tmp_path)
    assert console == [], console
    assert re.search(r'<div id="neuron-view" hidden', dom)
    assert '<section id="summary">' in dom and "Key counts per layer" in dom
    assert '<option value="1">layer 1</option>' in dom  # the layer picker was filled by the script


def test_screenshot_of_a_neuron_page(report: Path, tmp_path: Path) -> None:
    from matplotlib.image import imread

    shot = tmp_path / "neuron-0-5.png"
    _, err = _chromium(report.as_uri() + "#neuron-0-5", tmp_path, "--hide-scrollbars", "--window-size=1280,2000",
                       f"--screenshot={shot}")
    assert _console(err) == []
    assert shot.stat().st_size > 10_000
    pixels = imread(shot)
    assert pixels.shape[:2] == (2000, 1280)
    assert float(pixels[..., :3].std()) > 0.05, "the screenshot is not blank"


def test_partial_report_says_how_to_open_the_rest(tmp_path: Path) -> None:
    from mambascope.report import render_report
    from mambascope.report.neuron_payload import top_neurons

    results = mamba_results()
    keep = top_neurons(results, None, 5)
    report = render_report(results, tmp_path, figures=[], max_embedded_neurons=100, top_per_layer=5)
    left_out = next(e for e in range(64) if e not in keep[0])
    dom, console = _dom(report.as_uri() + f"#neuron-0-{left_out}", tmp_path)
    assert console == [], console
    page = dom[dom.index('<div id="neuron-page">'):dom.index('<main id="report"')]
    assert f"Layer 0 · neuron {left_out}" in page and "activation frequency" in page
    assert "run: mambascope serve DIR" in page and page.count("Not embedded in this report") == 3
    dom, console = _dom(report.as_uri() + f"#neuron-0-{keep[0][0]}", tmp_path)
    page = dom[dom.index('<div id="neuron-page">'):dom.index('<main id="report"')]
    assert console == [] and "Not embedded" not in page and "Top-activating contexts" in page


# ------------------------------------------------------------------------------------- mambascope serve

@pytest.fixture(scope="module")
def served_url() -> Iterator[str]:
    """The explorer of tests/serve_fixtures.py's output (with its model for live traces) on a free port."""
    import uvicorn

    from mambascope.serve import create_app
    from mambascope.serve.server import bind, url

    out, model = served_output()
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(out, model=str(model)), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield url(sock)
    server.should_exit = True
    thread.join(30)
    sock.close()


@pytest.fixture(scope="module")
def playwright_browser() -> Iterator[object]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        why = "playwright is not installed (pip install -e '.[test]')"
        if REQUIRED:
            pytest.fail(f"{why}; MAMBASCOPE_REQUIRE_BROWSER=1 requires the browser tests to run", pytrace=False)
        pytest.skip(why)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


def _page(browser: object, problems: list[str]) -> object:
    """A fresh page that records console errors/warnings, uncaught exceptions and dialogs in ``problems``."""
    page = browser.new_page(viewport={"width": 1280, "height": 1600})
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda exc: problems.append(f"uncaught: {exc}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    return page


def test_served_explorer_search_neuron_page_and_live_trace(served_url: str, playwright_browser: object,
                                                           tmp_path: Path) -> None:
    from playwright.sync_api import expect

    from mambascope.trace import trace

    results = mamba_results()
    problems: list[str] = []
    page = _page(playwright_browser, problems)
    page.goto(served_url)
    assert "Key counts per layer" in page.inner_text("#summary")
    assert page.locator("#census-dead figure img").count() >= 1

    # sort all neurons by frequency (the default order: descending), page forward
    page.select_option("#search-sort", "frequency")
    page.click("#search-go")
    freq = sorted(((v, -int(layer), -e) for layer, r in results["layers"].items()
                   for e, v in enumerate(r["activation_frequency"])), reverse=True)
    expect(page.locator("#search-results a").first).to_have_text(f"L{-freq[0][1]} N{-freq[0][2]}")
    assert page.inner_text("#search-message") == "neurons 1\u201350 of 128"
    page.click("#search-next")
    expect(page.locator("#search-message")).to_have_text(re.compile(r"^neurons 51\u2013100 of 128$"))

    # which neurons fire most on a token: a detector's trigger
    det = results["layers"]["1"]["token_detectors"][0]
    page.fill("#bytoken-token", det["token_strings"][0])
    page.fill("#bytoken-k", "200")
    page.click("#bytoken-go")
    page.wait_for_selector("#bytoken-results table")
    hrefs = page.locator("#bytoken-results a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
    assert f"#neuron-1-{det['neuron']}" in hrefs

    # open that neuron's page from the result
    page.click(f"#bytoken-results a[href='#neuron-1-{det['neuron']}']")
    page.wait_for_selector("#neuron-title")
    assert page.inner_text("#neuron-title") == f"Layer 1 · neuron {det['neuron']}"
    body = page.inner_text("#neuron-page")
    for heading in ("Token detector", "Top-activating contexts", "Direct logit effects", "Hidden-attention row"):
        assert heading in body, heading

    # live trace of the user's text, checked against an independent trace
    text = "The cat sat on the mat."
    page.fill("#live-text", text)
    page.fill("#live-position", "3")
    page.click("#live-go")
    page.wait_for_selector("#live-table")
    model, tokenizer = mamba_model()
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    post = trace(model, ids, ["blocks.1.mixer.hook_post"])["blocks.1.mixer.hook_post"][0, :, det["neuron"]].tolist()
    rows = page.locator("#live-table tr").evaluate_all(
        "rows => rows.slice(1).map(r => Array.from(r.cells).map(c => c.textContent))")
    assert len(rows) == len(post)
    assert [float(r[2]) for r in rows] == pytest.approx(post, rel=2e-3, abs=1e-6)  # shown to 4 digits
    assert [r[3] for r in rows[4:]] == [""] * (len(post) - 4) and all(r[3] for r in rows[:4])  # causal row at t=3
    assert "Hidden-attention row α[t, ·] of channel" in page.inner_text("#live-result")
    page.screenshot(path=str(tmp_path / "live.png"), full_page=True)
    assert (tmp_path / "live.png").stat().st_size > 20_000
    assert problems == [], problems


def test_served_explorer_lists_neurons_on_load(served_url: str, playwright_browser: object) -> None:
    """The explorer shows the first page of neurons as soon as it opens, before any Search: layer 0's
    neurons in order (the fixture's layers have 64 neurons each), and paging works from there."""
    from playwright.sync_api import expect

    sizes = {int(layer): r["n_neurons"] for layer, r in mamba_results()["layers"].items()}
    problems: list[str] = []
    page = _page(playwright_browser, problems)
    page.goto(served_url)
    total = sum(sizes.values())
    expect(page.locator("#search-message")).to_have_text(f"neurons 1\u201350 of {total}")
    links = page.locator("#search-results a").evaluate_all("links => links.map(a => a.textContent)")
    assert links == [f"L0 N{e}" for e in range(50)] and sizes[0] >= 50
    assert page.locator("#search-prev").is_disabled() and page.locator("#search-next").is_enabled()
    page.click("#search-next")
    expect(page.locator("#search-message")).to_have_text(f"neurons 51\u2013100 of {total}")
    links = page.locator("#search-results a").evaluate_all("links => links.map(a => a.textContent)")
    assert links == [f"L0 N{e}" for e in range(50, sizes[0])] + [f"L1 N{e}" for e in range(100 - sizes[0])]
    assert problems == [], problems


def test_served_pages_escape_corpus_markup(served_url: str, playwright_browser: object) -> None:
    from playwright.sync_api import expect

    problems: list[str] = []
    page = _page(playwright_browser, problems)
    page.goto(served_url + "#neuron-0-3")
    page.wait_for_selector("#neuron-title")
    assert EVIL.replace(" ", "·") in page.inner_text("#neuron-page") or EVIL in page.inner_text("#neuron-page")
    assert page.locator("#neuron-page script").count() == 0
    page.click("#neuron-view a[href='#neurons']")  # back to the report and its explorer
    page.fill("#search-q", "<script>")
    page.click("#search-go")
    expect(page.locator("#search-results")).to_contain_text(EVIL)
    assert problems == [], problems
    page.fill("#bytoken-token", "")  # a bad request: the page shows the server's 400 message
    page.click("#bytoken-go")
    expect(page.locator("#bytoken-message")).to_have_text(re.compile(r"^token: give the token"))
    assert problems == ["console error: Failed to load resource: the server responded with a status of 400 "
                        "(Bad Request)"], problems


def test_served_steer_panel_and_attribution_page(served_url: str, playwright_browser: object) -> None:
    """The steer panel of a neuron page and the attribution page, driven with markup as the user's text: both
    show it as text (no element made from it), and show the server's numbers."""
    from mambascope.trace.generate import Steer, generate, neuron_direction

    problems: list[str] = []
    page = _page(playwright_browser, problems)
    page.goto(served_url + "#neuron-1-7")
    page.wait_for_selector("#neuron-title")
    page.fill("#steer-prompt", EVIL)
    page.fill("#steer-scale", "5")
    page.fill("#steer-new", "4")
    page.click("#steer-go")
    page.wait_for_selector("#steer-table")
    cells = page.locator("#steer-table td").evaluate_all("tds => tds.map(td => td.textContent)")
    model, tokenizer = mamba_model()
    ids = tokenizer(EVIL, return_tensors="pt", add_special_tokens=False)["input_ids"]
    edit = Steer(neuron_direction(model.config.intermediate_size, 7), 5.0)
    runs = [generate(model, ids, 4), generate(model, ids, 4, edits={"blocks.1.mixer.hook_post": edit})]
    assert cells == [EVIL + "".join(tokenizer.decode([i]) for i in run[0, ids.shape[1]:].tolist()) for run in runs]
    assert page.locator("#steer-result script").count() == 0

    page.goto(served_url + "attribute")
    page.fill("#attribute-text", EVIL)
    page.click("#attribute-go")
    page.wait_for_selector("#attribute-strip")
    titles = page.locator("#attribute-strip th.tokcol code").evaluate_all("cs => cs.map(c => JSON.parse(c.title))")
    assert "".join(titles) == EVIL and page.locator("#attribute-result script").count() == 0
    labels = page.locator("#attribute-strip tr th:first-child").evaluate_all("ths => ths.map(t => t.textContent)")
    assert labels == ["method", "gradient_x_input", "integrated_gradients", "occlusion", "lrp", "knockout"]
    assert problems == [], problems


@pytest.fixture(scope="module")
def feature_report(tmp_path_factory) -> Path:
    """``census --dictionary`` of a seeded random dictionary on layer 2 of tiny-mamba: report.html + features.html."""
    import torch

    from mambascope.cli import main
    from mambascope.features import DictionarySpec, save_dictionary
    from mambascope.features.dictionary import new_coder

    tmp = tmp_path_factory.mktemp("feature-report")
    spec = DictionarySpec("topk", "blocks.2.mixer.hook_post", "blocks.2.mixer.hook_post", 256, 256, 32, 4, "tiny-mamba")
    torch.manual_seed(0)
    (tmp / "sae").mkdir()
    save_dictionary(new_coder(spec), spec, tmp / "sae")
    out = tmp / "census"
    assert main(["census", "--model", "tiny-mamba", "--layers", "2", "--max-tokens", "1024", "--window", "32",
                 "--no-ablation", "--dictionary", str(tmp / "sae"), "--out", str(out), "--quiet"]) == 0
    return out


def test_feature_page_renders_from_the_hash(feature_report: Path, tmp_path: Path) -> None:
    dom, console = _dom((feature_report / "features.html").as_uri() + "#neuron-2-5", tmp_path)
    assert console == [], console
    assert re.search(r'<h3 id="neuron-title">Layer 2 · feature 5</h3>', dom)
    page = dom[dom.index('<div id="neuron-page">'):dom.index('<main id="report"')]
    for heading in ("Top-activating contexts", "Direct logit effects"):
        assert heading in page, heading
    # every label says "feature" (the ids, classes and #neuron-L-N links are the page's plumbing)
    assert "feature 6 →" in page and "neuron" not in re.sub(r'(id|class|href)="[^"]*"', "", page)
    report, console = _dom((feature_report / "report.html").as_uri() + "#features", tmp_path)
    assert console == [], console
    assert '<a href="features.html">features.html</a>' in report
