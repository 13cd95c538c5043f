"""Results dicts for the report tests, from real runs of the pipeline on small random models.

Built once per test session (``functools.cache``) and shared by tests/test_report.py and
tests/test_browser.py.  Everything is computed by the package itself: a small tokenizer trained on the
built-in corpus, a random 2-layer Mamba-1 (and GPT-2), ``run_analysis`` (census, interventions,
attention neurons with faithfulness).  One thing is test-specific: the census thresholds are loosened
(``CENSUS_OPTIONS``) so that every neuron group of a *random* model is non-empty and each table and
figure of the report has rows to show, and so is the token-faithfulness query margin (a random model's
context never raises log p(next token) by the default margin).
"""

from __future__ import annotations

import atexit
import copy
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import torch

CENSUS_OPTIONS = {"rare_threshold": 0.45, "mi_threshold": 0.04, "min_precision": 0.6, "coverage": 0.3,
                  "min_occurrences": 2, "max_types": 5}
WINDOW = 32
N_WINDOWS = 16  # 12 selection + 4 held-out windows
ATTENTION_METHODS = ["attention_weighted", "rollout"]


@functools.cache
def _corpus() -> tuple[Any, torch.Tensor]:
    from mambascope.data import load_corpus, tokenize_windows
    from mambascope.models.tokenizer import train_tokenizer

    texts = load_corpus("builtin", "validation").texts[:200]
    tok = train_tokenizer(texts, vocab_size=512)
    windows = tokenize_windows(texts, tok, WINDOW, max_tokens=WINDOW * N_WINDOWS).ids
    return tok, windows


def _roundtrip(results: dict) -> dict:
    """As ``results.json`` stores it: to_jsonable (NaN → null) and back."""
    from mambascope.results import to_jsonable

    return json.loads(json.dumps(to_jsonable(results), allow_nan=False))


def _run(model: torch.nn.Module, name: str, stages: tuple[str, ...]) -> dict:
    from mambascope import attention_neurons, pipeline

    tok, windows = _corpus()
    info = {"model": pipeline.model_info(model, name),
            "corpus": {"name": "builtin", "split": "validation", "tokens": int(windows.numel()),
                       "windows": int(windows.shape[0]), "window": WINDOW}}
    census_pass = functools.partial(pipeline.census_pass, census_options=CENSUS_OPTIONS)
    # A random model's context barely moves its predictions: any query position qualifies (test-only).
    faithfulness = functools.partial(attention_neurons.evaluate_faithfulness, query_margin=-100.0)
    with mock.patch.object(pipeline, "census_pass", census_pass), \
            mock.patch.object(attention_neurons, "evaluate_faithfulness", faithfulness):  # test-only: loosened
        results = pipeline.run_analysis(model, tok, windows, info=info, stages=stages, attention_layers=[1],
                                        methods=ATTENTION_METHODS, attention_windows=4, batch_size=8, draws=3,
                                        progress=False)
    return results


def mamba_model() -> tuple[torch.nn.Module, Any]:
    """The random 2-layer Mamba-1 of ``mamba_results()`` (the same weights on every call) and its tokenizer."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, state_size=8)).eval()
    return model, _corpus()[0]


@functools.cache
def _mamba() -> dict:
    results = _run(mamba_model()[0], "tiny-random-mamba", ("census", "interventions", "attention_neurons"))
    return _roundtrip(results)


def mamba_results(with_attention_rows: bool = True) -> dict:
    """A fresh copy of the Mamba-1 results (without the pipeline's ``attention_rows`` if told so)."""
    results = copy.deepcopy(_mamba())
    if not with_attention_rows:
        for r in results["layers"].values():
            del r["attention_rows"]
    return results


@functools.cache
def _gpt2() -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)).eval()
    return _roundtrip(_run(model, "tiny-random-gpt2", ("census", "interventions")))


def gpt2_results() -> dict:
    """A fresh copy of GPT-2 results: census and interventions, no attention-neuron stage."""
    return copy.deepcopy(_gpt2())


@functools.cache
def _census_only() -> tuple[dict, dict]:
    from transformers import MambaConfig, MambaForCausalLM

    from mambascope.pipeline import model_info, run_census

    tok, windows = _corpus()
    torch.manual_seed(1)
    model = MambaForCausalLM(MambaConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, state_size=8)).eval()
    census = _roundtrip(run_census(model, tok, windows, progress=False, draws=3))
    return model_info(model, "tiny-random-mamba"), census


def census_results() -> dict:
    """The brief's layout: ``run_census``'s dict nested under ``census`` (layers, ablation, pruning inside)."""
    info, census = _census_only()
    return {"model": copy.deepcopy(info), "corpus": {"name": "builtin", "split": "validation"},
            "census": copy.deepcopy(census), "errors": {}, "timings": {}}


def _report(results: dict, prefix: str) -> tuple[list[Path], Path]:
    from mambascope.report import create_comprehensive_report, render_report

    out = Path(tempfile.mkdtemp(prefix=f"mambascope-report-test-{prefix}-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    figures = create_comprehensive_report(results, out / "figures")
    return figures, render_report(results, out, figures)


@functools.cache
def mamba_report() -> tuple[list[Path], Path]:
    """(figures, report.html) of ``mamba_results()``, drawn once per session into a temporary directory
    (removed at exit).  ``figures`` is the FigureSet of ``create_comprehensive_report``."""
    return _report(mamba_results(), "mamba")


@functools.cache
def gpt2_report() -> tuple[list[Path], Path]:
    """(figures, report.html) of ``gpt2_results()``, drawn once per session."""
    return _report(gpt2_results(), "gpt2")
