"""Interventions on the neuron unit: held-out loss, zero/mean ablation, pruning."""

from mambascope.interventions.ablation import (
    LossResult,
    ablation_edits,
    ablation_study,
    heldout_loss,
    pruning_study,
    random_groups,
)

__all__ = ["LossResult", "ablation_edits", "ablation_study", "heldout_loss", "pruning_study", "random_groups"]
