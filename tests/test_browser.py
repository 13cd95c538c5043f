"""report.html in a real headless Chromium: the scripts run, neuron pages render, no console errors.

Needs a Chromium binary (Debian: ``apt-get install -y chromium``); skipped, with that reason, where none is
installed, except that with ``MAMBASCOPE_REQUIRE_BROWSER=1`` (set by ``.ci/run``) a missing browser fails
every test instead, so CI cannot pass without having run them.  Chromium is driven from the command line:
``--dump-dom`` serialises the DOM after the page's scripts ran, ``--screenshot`` renders it,
``--enable-logging=stderr`` prints the console (``CONSOLE`` lines, uncaught exceptions included).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from report_fixtures import mamba_report

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
