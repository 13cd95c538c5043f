"""The report layer: figures, the HTML report, the results schema (tests/report_fixtures.py has the data)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from mambascope.report import (
    FIGURES,
    FigureSet,
    FigureSkipped,
    create_comprehensive_report,
    neuron_data,
    render_report,
    results_schema,
)
from mambascope.report.html import SECTIONS
from report_fixtures import census_results, gpt2_report, gpt2_results, mamba_report, mamba_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def mamba_figures() -> FigureSet:
    return mamba_report()[0]


@pytest.fixture(scope="module")
def mamba_html() -> str:
    return mamba_report()[1].read_text(encoding="utf-8")


def _neuron_json(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="neuron-data">(.*?)</script>', page, re.S)
    assert m, "the neuron data is embedded"
    return json.loads(m.group(1))


def _q16(b64: str, scale: float) -> list[float | None]:
    q = np.frombuffer(base64.b64decode(b64), dtype="<i2")
    return [None if v == -32768 else float(v) / 32767 * scale for v in q]


# ------------------------------------------------------------------------------------------- figures

def test_every_figure_is_drawn_from_full_mamba_results(mamba_figures: FigureSet) -> None:
    # ground truth: task models only (tests/test_ground_truth.py); patching: `mambascope patch` only;
    # attribution: `mambascope attribute` only; leaderboard: `mambascope leaderboard` only
    assert set(mamba_figures.skipped) == {"ground_truth", "patching", "attribution", "leaderboard"}
    stems = {p.stem for p in mamba_figures}
    expected = set(FIGURES) - {"attention_neurons", "ground_truth", "patching", "attribution", "leaderboard"}
    assert expected <= stems
    assert {"attention_neurons_L1"} <= stems  # the seed's 6-panel figure, one per analysed layer
    for path in mamba_figures:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, path


def test_gpt2_figures_skip_what_does_not_apply() -> None:
    figs = gpt2_report()[0]
    assert "GPT-2 has no Δ" in figs.skipped["delta_selectivity"]
    for name in ("attention_neurons", "attention_diversity", "hidden_attention", "faithfulness_curves",
                 "faithfulness_neurons"):
        assert "not computed in this run" in figs.skipped[name], (name, figs.skipped[name])
    assert not any("drawing failed" in r for r in figs.skipped.values()), figs.skipped
    assert {"dead_neurons", "positional_frequency", "ablation", "pruning", "overlap"} <= {p.stem for p in figs}
    assert all(p.stat().st_size > 0 for p in figs)


def test_figures_from_empty_results_are_all_skipped_with_reasons(tmp_path: Path) -> None:
    figs = create_comprehensive_report({"errors": {"census": "ValueError: no windows"}}, tmp_path)
    assert list(figs) == []
    assert set(figs.skipped) == set(FIGURES)
    assert "failed (census): ValueError: no windows" in figs.skipped["dead_neurons"]
    assert not list(tmp_path.glob("*.png"))


def test_figures_from_the_run_census_layout(tmp_path: Path) -> None:
    results = census_results()
    for name in ("dead_neurons", "ablation", "pruning"):
        assert FIGURES[name](results, tmp_path).stat().st_size > 0


# ---------------------------------------------------------------------------------------------- HTML

def test_html_has_every_section_and_is_self_contained(mamba_html: str) -> None:
    for sid in SECTIONS:
        if sid not in ("patching", "attribution", "leaderboard", "features"):
            assert f'<section id="{sid}">' in mamba_html, sid
    assert '<section id="patching">' not in mamba_html  # shown only for `mambascope patch` results
    assert '<section id="attribution">' not in mamba_html  # shown only for `mambascope attribute` results
    assert '<section id="leaderboard">' not in mamba_html  # shown only for `mambascope leaderboard` results
    assert '<section id="features">' not in mamba_html  # shown only for `census --dictionary` results
    # all but ground_truth, patching, attribution and leaderboard
    assert mamba_html.count("data:image/png;base64,") >= len(FIGURES) - 4
    assert not re.search(r'(src|href)="(https?:)?//', mamba_html), "no network resources"
    assert "<link " not in mamba_html
    for text in ("Key counts per layer", "tiny-random-mamba", "held-out loss", "Token level (MoRF / LeRF)",
                 "Neuron level", "attention_weighted", "No analysis recorded an error"):
        assert text in mamba_html, text


def test_html_neuron_data(mamba_html: str) -> None:
    data = neuron_data(mamba_results())
    assert _neuron_json(mamba_html) == json.loads(json.dumps(data))
    results = mamba_results()
    for layer, r in results["layers"].items():
        d = data["layers"][layer]
        E = r["n_neurons"]
        assert d["E"] == E and len(d["freq"]) == E
        assert d["freq"][7] == pytest.approx(r["activation_frequency"][7], rel=1e-3)
        assert {x[0] for x in d["det"]} == {x["neuron"] for x in r["token_detectors"]}
        assert set(d["imp"]) == ({"attention_weighted", "rollout"} if layer == "1" else set())
        top = r["top_contexts"]
        W = top["width"]
        for e in (0, 5, E - 1):
            acts = _q16(d["ctx"]["a"][e], d["ctx"]["s"][e])
            for j, ctx_acts in enumerate(top["activations"][e]):
                # the context's tokens, rebuilt from the per-window token table
                win, pos = d["ctx"]["wp"][e][2 * j], d["ctx"]["wp"][e][2 * j + 1]
                seq = data["windows"][str(win)]
                tokens = [data["strings"][seq[p]] if p >= 0 else "" for p in range(pos - W + 1, pos + 1)]
                assert tokens == top["tokens"][e][j]
                scale = d["ctx"]["s"][e]
                for got, want in zip(acts[j * W:(j + 1) * W], ctx_acts, strict=True):
                    if want is None:
                        assert got is None
                    else:
                        assert got == pytest.approx(want, abs=scale * 2e-5 + 1e-12)
            lg = d["logit"]
            assert [data["strings"][i] for i in lg["p"][e]] == r["logit_effects"]["promoted"][e]
            vals = _q16(lg["v"][e], lg["s"][e])
            want = r["logit_effects"]["promoted_values"][e] + r["logit_effects"]["suppressed_values"][e]
            assert vals == pytest.approx(want, abs=lg["s"][e] * 2e-5)
            row = d["attn"]["index"][str(e)]
            assert d["attn"]["t"][row] == 0  # the same tokens as the top context: stored once
            assert _q16(d["attn"]["v"][row], d["attn"]["s"][row]) == pytest.approx(
                r["attention_rows"]["values"][e], abs=d["attn"]["s"][row] * 2e-5)


def test_html_gpt2_says_what_does_not_apply() -> None:
    page = gpt2_report()[1].read_text()
    assert "Not applicable: GPT-2 has no Δ" in page
    assert "Attention neurons: not computed in this run" in page
    assert "Faithfulness: not computed in this run" in page
    data = _neuron_json(page)
    assert data["arch"] == "gpt2"
    assert all(d["delta"] is None and d["attn"] is None and d["ctx"] for d in data["layers"].values())


def test_html_renders_recorded_errors_escaped(tmp_path: Path) -> None:
    results = mamba_results()
    results["ablation"] = results["pruning"] = None
    results["attention_neurons"] = None
    results["errors"] = {"interventions": "RuntimeError: out of memory <script>alert(1)</script>",
                         "attention_neurons": "ValueError: bad & worse"}
    results["incomplete"] = []
    with pytest.raises(FigureSkipped) as skipped:
        FIGURES["ablation"](results, tmp_path)
    page = render_report(results, tmp_path, FigureSet([], {"ablation": str(skipped.value)})).read_text()
    assert "<script>alert(1)" not in page
    assert "Ablation: failed (interventions): RuntimeError: out of memory &lt;script&gt;alert(1)&lt;/script&gt;" \
        in page
    assert "Pruning: failed (interventions)" in page
    assert "Attention neurons: failed (attention_neurons): ValueError: bad &amp; worse" in page
    assert "Faithfulness: failed (attention_neurons)" in page
    errors = page[page.index('<section id="errors">'):]
    assert "interventions" in errors and "attention_neurons" in errors
    assert "Figure &#39;ablation&#39; not drawn: no ablation results: failed (interventions)" in page


def test_html_escapes_token_strings(tmp_path: Path) -> None:
    evil = '<img src=x onerror="alert(1)">&amp;'
    results = mamba_results()
    layer = results["layers"]["0"]
    layer["token_detectors"][0]["token_strings"][0] = evil
    layer["top_contexts"]["tokens"][3][0][-1] = evil
    layer["logit_effects"]["promoted"][3][0] = evil
    layer["delta_sensitive"][0]["top_tokens"][0]["string"] = evil
    page = render_report(results, tmp_path, figures=[]).read_text()
    assert "<img" not in page  # no figures here, so no <img> at all
    assert "&lt;img·src=x·onerror=&#34;alert(1)&#34;&gt;&amp;amp;" in page  # a chip: spaces shown as ·
    data = _neuron_json(page)
    assert evil in data["strings"]  # the JSON carries the string as such; the page sets it as text


def test_html_says_not_computed_for_missing_neuron_extras(tmp_path: Path) -> None:
    results = mamba_results(with_attention_rows=False)
    for r in results["layers"].values():
        del r["top_contexts"], r["logit_effects"]
    page = render_report(results, tmp_path, figures=[]).read_text()
    assert "Not computed in this run: top-activating contexts, logit effects, hidden-attention rows." in page
    data = _neuron_json(page)
    assert all(d["ctx"] is None and d["logit"] is None and d["attn"] is None for d in data["layers"].values())


def test_html_from_the_run_census_layout(tmp_path: Path) -> None:
    page = render_report(census_results(), tmp_path, figures=[]).read_text()
    assert "Key counts per layer" in page and "zero Δloss" in page and "random loss (mean ± std)" in page
    assert len(_neuron_json(page)["layers"]) == 2


def test_neuron_data_size_is_sane_at_scale() -> None:
    """Bytes per neuron of the embedded data for a full-size layer (E = 1536, k = 5 contexts of 16
    tokens, 10 + 10 logit tokens, attention rows): synthetic shapes, for the encoding only."""
    rng = np.random.default_rng(0)
    E, k, w, V = 1536, 5, 16, 50000
    vocab = [f"tok{i}" for i in range(V)]
    windows = rng.integers(0, 512, (E, k))
    positions = rng.integers(w, 128, (E, k))
    corpus = rng.integers(0, V, (512, 128))
    tokens = [[[vocab[corpus[windows[e, j], p]] for p in range(positions[e, j] - w + 1, positions[e, j] + 1)]
               for j in range(k)] for e in range(E)]
    layer = {
        "n_neurons": E, "tokens": 10**6, "activation_frequency": rng.random(E).tolist(),
        "positional_mi": rng.random(E).tolist(), "dead_neurons": [], "rarely_active": [],
        "positional_neurons": [], "token_detectors": [], "delta_sensitive": [],
        "activity": {"mean_post": rng.normal(size=E).tolist(), "mean_abs_post": rng.random(E).tolist(),
                     "mean_post_active": rng.normal(size=E).tolist()},
        "positional": {"position_correlation": rng.normal(size=E).tolist(), "positional_threshold": 0.05},
        "delta": {"unit": "channel", "n_units": E, "mean": rng.random(E).tolist(), "std": rng.random(E).tolist(),
                  "selectivity": rng.random(E).tolist()},
        "top_contexts": {"k": k, "width": w, "values": rng.normal(size=(E, k)).tolist(),
                         "windows": windows.tolist(), "positions": positions.tolist(), "tokens": tokens,
                         "activations": rng.normal(size=(E, k, w)).tolist()},
        "logit_effects": {"promoted": [[vocab[i] for i in rng.integers(0, V, 10)] for _ in range(E)],
                          "promoted_values": rng.random((E, 10)).tolist(),
                          "suppressed": [[vocab[i] for i in rng.integers(0, V, 10)] for _ in range(E)],
                          "suppressed_values": (-rng.random((E, 10))).tolist()},
        "attention_rows": {"neurons": list(range(E)), "tokens": [tokens[e][0] for e in range(E)],
                           "values": rng.random((E, w)).tolist()},
    }
    data = neuron_data({"model": {"name": "big", "arch": "mamba"}, "layers": {"0": layer}})
    per_neuron = len(json.dumps(data["layers"]["0"], separators=(",", ":"))) / E
    assert per_neuron < 900, per_neuron  # 24 layers x 1536 neurons: < 35 MB in all (measured ~640 B)
    assert data["layers"]["0"]["attn"]["t"][0] == 0


# ------------------------------------------------------------------------------------------- schema

@pytest.mark.parametrize("make", [mamba_results, gpt2_results, census_results], ids=["mamba", "gpt2", "census"])
def test_results_validate_against_the_schema(make) -> None:
    schema = results_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(make())


def test_schema_rejects_wrong_types() -> None:
    validator = jsonschema.Draft202012Validator(results_schema())
    results = mamba_results()
    results["layers"]["0"]["pct_dead"] = "none"
    results["errors"] = {"census": 3}
    results["ablation"]["groups"]["dead"]["neurons"] = -1
    paths = {tuple(e.absolute_path) for e in validator.iter_errors(results)}
    assert ("layers", "0", "pct_dead") in paths
    assert ("errors", "census") in paths
    assert ("ablation", "groups", "dead", "neurons") in paths
    assert not validator.is_valid({"corpus": {}})  # model and errors are required


def test_docs_cover_every_schema_key() -> None:
    doc = (Path(__file__).parents[1] / "docs" / "results.md").read_text()
    missing = []

    def walk(node: dict) -> None:
        for key, sub in (node.get("properties") or {}).items():
            if f"`{key}`" not in doc:
                missing.append(key)
            walk(sub)
        for sub in (node.get("$defs") or {}).values():
            walk(sub)
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key])
        for sub in (node.get("patternProperties") or {}).values():
            walk(sub)
        for sub in node.get("anyOf") or []:
            walk(sub)

    walk(results_schema())
    assert not missing, f"docs/results.md does not document: {sorted(set(missing))}"


def test_failed_census_renders_and_validates(tmp_path: Path) -> None:
    results = mamba_results()
    results.update(layers={}, census=None, ablation=None, pruning=None,
                   errors={"census": "RuntimeError: CUDA error", "interventions": "RuntimeError: needs the census"})
    jsonschema.Draft202012Validator(results_schema()).validate(results)
    figs = create_comprehensive_report(results, tmp_path / "figures")
    assert "no neuron census: failed (census): RuntimeError: CUDA error" in figs.skipped["dead_neurons"]
    page = render_report(results, tmp_path, figs).read_text()
    assert page.count("Neuron census: failed (census): RuntimeError: CUDA error") >= 6  # every census section
    assert "Ablation: failed (interventions): RuntimeError: needs the census" in page
    assert "attention_weighted" in page  # the attention analysis that did run is still shown
    assert _neuron_json(page)["layers"] == {}


# ------------------------------------------------------------------------------ large models: partial embed

def test_report_above_the_threshold_embeds_the_top_neurons_and_says_how_to_open_the_rest(tmp_path: Path) -> None:
    from mambascope.report.neuron_payload import top_neurons

    results = mamba_results()
    page = render_report(results, tmp_path, figures=[], max_embedded_neurons=100, top_per_layer=5).read_text()
    data = _neuron_json(page)
    full = neuron_data(mamba_results())
    assert data["partial"]["total"] == 128 and data["partial"]["per_layer"] == 5
    assert "mambascope serve DIR" in data["partial"]["message"]
    assert '<p class="note" id="partial-note">This report embeds the full pages' in page
    chosen = top_neurons(results, None, 5)
    for layer, d in data["layers"].items():
        keep = chosen[int(layer)]
        assert d["embedded"] == keep and len(keep) == 5
        assert d["freq"] == full["layers"][layer]["freq"]  # statistics of every neuron
        for e in range(d["E"]):
            if e in keep:
                assert d["ctx"]["a"][e] == full["layers"][layer]["ctx"]["a"][e]
                assert d["logit"]["v"][e] == full["layers"][layer]["logit"]["v"][e]
            else:
                assert d["ctx"]["v"][e] is None and d["ctx"]["a"][e] is None and d["logit"]["p"][e] is None
        assert sorted(map(int, d["attn"]["index"])) == keep
    embedded = len(json.dumps(data["layers"]))
    assert embedded < 0.5 * len(json.dumps(_neuron_json(render_report(results, tmp_path / "all", figures=[])
                                                        .read_text())["layers"]))


def test_report_default_threshold(tmp_path: Path) -> None:
    """The default EMBED_ALL_MAX applies: 16,384 neurons embed whole, 16,385 do not."""
    from mambascope.report.html import EMBED_ALL_MAX

    assert EMBED_ALL_MAX == 16_384
    assert "partial" not in _neuron_json(render_report(mamba_results(), tmp_path, figures=[]).read_text())
    for E, partial in ((EMBED_ALL_MAX, False), (EMBED_ALL_MAX + 1, True)):
        rng = np.random.default_rng(E)
        layer = {"n_neurons": E, "tokens": 1000, "activation_frequency": rng.random(E).tolist(),
                 "positional_mi": rng.random(E).tolist(), "dead_neurons": [], "rarely_active": [],
                 "positional_neurons": [], "token_detectors": [],
                 "top_contexts": {"k": 1, "width": 2, "values": rng.normal(size=(E, 1)).tolist(),
                                  "tokens": [[["a", "b"]]] * E, "activations": rng.normal(size=(E, 1, 2)).tolist()}}
        results = {"model": {"name": "big", "arch": "mamba"}, "layers": {"0": layer}}
        data = _neuron_json(render_report(results, tmp_path / str(E), figures=[]).read_text())
        assert ("partial" in data) is partial
        d = data["layers"]["0"]
        assert sum(v is not None for v in d["ctx"]["v"]) == (100 if partial else E)


# ----------------------------------------------------------------------- strongest candidates, dead panel

def _layer(mi, p, positional, freq, dead, rare, needed, active, detectors, delta):
    return {"tokens": 1000, "positional_mi": mi, "positional_neurons": positional, "activation_frequency": freq,
            "dead_neurons": dead, "rarely_active": rare, "token_detectors": [{"neuron": e} for e in detectors],
            "delta_sensitive": [{"index": i, "selectivity": s} for i, s in delta],
            "positional": {"positional_threshold": 0.05, "positional_alpha": 0.001, "positional_p_value": p},
            "activity": {"rare_threshold": 0.01, "active_count": active},
            "detectors": {"criteria": {"max_types": 5, "coverage": 0.95, "min_occurrences": 5},
                          "ngram_coverage": {"1": {"needed": needed}}}}


def test_strongest_candidates_by_hand() -> None:
    from mambascope.pipeline import strongest_candidates

    layers = {
        "0": _layer([0.01, 0.2, 0.06, -0.01], [0.5, 1e-5, 0.01, 0.9], [1], [0.3, 0.0, 0.005, 0.5], [1], [2],
                    [40, None, 3, 7], [300, 0, 5, 500], [], [(0, 0.4), (2, 0.9)]),
        "1": _layer([0.04, 0.07, 0.0, 0.02], None, [], [0.2, 0.02, 0.6, 0.4], [], [],
                    [2, 1, 9, 5], [200, 8, 600, 4], [0], [(3, 0.5)]),
    }
    layers["1"]["positional"]["positional_p_value"] = None  # no null in layer 1: untested
    got = strongest_candidates(layers, n=3)
    pos = [(x["layer"], x["neuron"], x["status"]) for x in got["positional"]["neurons"]]
    assert pos == [(0, 1, "positional"), (1, 1, "untested (no null)"), (0, 2, "not significant (p >= alpha)")]
    assert got["positional"]["neurons"][2]["p_value"] == 0.01 and got["positional"]["threshold"] == 0.05
    # fewest types first among neurons with >= 5 activations (L1 N1: 1 type but 8 activations counts;
    # L1 N3 has 4 activations: too few); ties by layer then neuron
    sel = [(x["layer"], x["neuron"], x["types_needed"], x["status"]) for x in got["token_selective"]["neurons"]]
    assert sel == [(1, 1, 1, "below threshold (precision)"), (1, 0, 2, "token detector"),
                   (0, 2, 3, "below threshold (precision)")]
    least = [(x["layer"], x["neuron"], x["status"]) for x in got["least_active"]["neurons"]]
    assert least == [(0, 1, "dead"), (0, 2, "rarely active"), (1, 1, "above the rare threshold")]
    assert [(x["layer"], x["unit"]) for x in got["delta_sensitive"]["units"]] == [(0, 2), (1, 3), (0, 0)]
    assert strongest_candidates({}) == {}


def test_report_first_screen_shows_the_strongest_candidates(mamba_html: str) -> None:
    results = mamba_results()
    cand = results["census"]["candidates"]
    assert set(cand) == {"per_kind", "positional", "token_selective", "least_active", "delta_sensitive"}
    assert all(len(cand[k]["neurons"]) == 5 for k in ("positional", "token_selective", "least_active"))
    summary = mamba_html.split('<section id="summary">')[1].split("</section>")[0]
    assert "Strongest candidates" in summary and "Most positional" in summary and "Least active" in summary
    for x in cand["positional"]["neurons"]:  # every verdict shown, below-threshold ones so labelled
        assert f'href="#neuron-{x["layer"]}-{x["neuron"]}"' in summary and x["status"] in summary


def _captured_dead_figure(results: dict, monkeypatch, tmp_path: Path):
    from mambascope.report import figures

    seen = []
    monkeypatch.setattr(figures, "_save", lambda fig, out_dir, name: seen.append(fig) or tmp_path / "x.png")
    figures.plot_dead_neurons(results, tmp_path)
    return seen[0].axes[0]


def test_dead_panel_without_dead_neurons_says_so(monkeypatch, tmp_path: Path) -> None:
    results = mamba_results()
    for r in results["layers"].values():
        r.update(pct_dead=0.0, n_dead=0, dead_neurons=[], rarely_active=[])
    ax = _captured_dead_figure(results, monkeypatch, tmp_path)
    texts = " ".join(t.get_text() for t in ax.texts)
    assert "no dead neurons (active on 0 of" in texts and "no rarely active neurons (frequency < " in texts
    assert not ax.patches and not ax.axison  # no empty bars, no axes with a negative y range
    results["layers"]["1"]["rarely_active"] = [0, 1]  # something to draw: bars from 0 up
    ax = _captured_dead_figure(results, monkeypatch, tmp_path)
    assert ax.patches and ax.get_ylim()[0] == 0 and not ax.texts


def test_a_layer_without_a_positional_null_is_shown_untested() -> None:
    from mambascope.report.html import report_context

    results = mamba_results()
    pos = results["layers"]["1"]["positional"]
    pos.update(positional_tested=False, positional_p_value=None)
    results["layers"]["1"]["positional_neurons"] = []
    sections = report_context(results, [], {}, str)["sections"]

    def cells(table, layer_row):
        return ["".join(f.text for f in c.parts) for c in table.rows[layer_row]]

    for table, column in ((sections["summary"]["layers"], 7), (sections["census-positional"]["table"], 2)):
        assert table.headers[column] == "positional"
        assert cells(table, 1)[column] == "untested (no null)" and cells(table, 0)[column] != "untested (no null)"
