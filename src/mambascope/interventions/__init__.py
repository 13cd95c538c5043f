"""Interventions: held-out loss, zero/mean ablation and pruning of the neuron unit; activation patching,
causal tracing and attribution patching (docs/patching.md)."""

from mambascope.interventions.ablation import (
    ablation_edits,
    ablation_study,
    check_draws,
    heldout_loss,
    pruning_study,
    random_groups,
)
from mambascope.interventions.attribution_patching import agreement, attribution_patching, correlation
from mambascope.interventions.patching import (
    UNIT_TYPES,
    Metric,
    Patch,
    PatchGrid,
    PatchingResult,
    activation_patching,
    gaussian_noise,
    run_patched,
    unit_rows,
)
from mambascope.runner import LossResult, next_token_loss_sum

__all__ = ["UNIT_TYPES", "LossResult", "Metric", "Patch", "PatchGrid", "PatchingResult", "ablation_edits",
           "ablation_study", "activation_patching", "agreement", "attribution_patching", "check_draws",
           "correlation", "gaussian_noise", "heldout_loss", "next_token_loss_sum", "pruning_study", "random_groups",
           "run_patched", "unit_rows"]
