"""Attention-based attributions of Mamba (and GPT-2) models and their faithfulness (docs/methods.md).

``extract`` traces once and gathers what the methods need; ``compute_method`` turns it into per-unit
activation/importance and token relevance; ``evaluate_faithfulness`` tests the rankings by perturbation.
"""

from mambascope.attribution.extract import (
    GRADIENT_METHODS,
    MAMBA_ONLY,
    METHODS,
    AttentionData,
    check_layers,
    check_methods,
    extract,
    resolve_query,
)
from mambascope.attribution.faithfulness import (
    FRACTIONS_DEFAULT_STEPS,
    evaluate_faithfulness,
    faithfulness_table,
)
from mambascope.attribution.methods import METHOD_FUNCTIONS, compute_method

__all__ = [
    "FRACTIONS_DEFAULT_STEPS",
    "GRADIENT_METHODS",
    "MAMBA_ONLY",
    "METHODS",
    "METHOD_FUNCTIONS",
    "AttentionData",
    "check_layers",
    "check_methods",
    "compute_method",
    "evaluate_faithfulness",
    "extract",
    "faithfulness_table",
    "resolve_query",
]
