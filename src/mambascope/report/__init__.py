"""The report layer: matplotlib figures and the single-file HTML report of a results dict.

It only reads results (``results.json``, docs/design.md §8) and never runs a model::

    from mambascope.results import load_results
    from mambascope.report import create_comprehensive_report, render_report
    results = load_results("mambascope-out")
    figures = create_comprehensive_report(results, "mambascope-out/figures")   # list[Path], .skipped
    render_report(results, "mambascope-out", figures)                          # report.html

``results_schema()`` returns the JSON Schema that ``results.json`` validates against (docs/results.md).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from mambascope.report.figures import FIGURES, FigureSet, FigureSkipped, create_comprehensive_report
from mambascope.report.html import render_report
from mambascope.report.neuron_payload import neuron_data

__all__ = ["FIGURES", "FigureSet", "FigureSkipped", "create_comprehensive_report", "neuron_data",
           "plot_attention_neurons_analysis", "plot_comparison", "render_report", "results_schema"]


@cache
def _schema_text() -> str:
    return resources.files("mambascope.report").joinpath("results_schema.json").read_text(encoding="utf-8")


def results_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``results.json`` (a fresh copy each call)."""
    return json.loads(_schema_text())


def __getattr__(name: str) -> Any:
    # the seed's other figures live in sibling modules; imported on first use
    if name == "plot_attention_neurons_analysis":
        from mambascope.report.attention_plots import plot_attention_neurons_analysis

        return plot_attention_neurons_analysis
    if name == "plot_comparison":
        from mambascope.report.compare_plots import plot_comparison

        return plot_comparison
    raise AttributeError(f"module 'mambascope.report' has no attribute {name!r}")
