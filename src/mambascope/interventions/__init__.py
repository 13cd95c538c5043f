"""Interventions on the neuron unit: held-out loss, zero/mean ablation, pruning."""

from mambascope.interventions.ablation import (
    ablation_edits,
    ablation_study,
    check_draws,
    heldout_loss,
    pruning_study,
    random_groups,
)
from mambascope.runner import LossResult, next_token_loss_sum

__all__ = ["LossResult", "ablation_edits", "ablation_study", "check_draws", "heldout_loss", "next_token_loss_sum",
           "pruning_study", "random_groups"]
