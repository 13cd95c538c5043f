"""Per-layer parameters that analyses need besides traced activations (A, D, conv, out_proj, norms).

Only the architecture adapters (``mambascope.arch``) read module internals; these functions hand
everything downstream plain tensors.
"""

from mambascope.arch import (
    architecture,
    head_write_weights,
    mixer_params,
    n_layers,
    neuron_write_weights,
    unembedding,
)
from mambascope.ssm.params import MixerParams

__all__ = ["MixerParams", "architecture", "head_write_weights", "mixer_params", "n_layers", "neuron_write_weights",
           "unembedding"]
