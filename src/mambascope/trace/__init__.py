"""The instrumented forward: one pass yields every internal unit (docs/design.md §3)."""

from mambascope.trace.forward import Trace, check_inputs, trace, trace_stream
from mambascope.trace.names import NEURON_UNIT, UNITS, all_names, resolve_names
from mambascope.trace.params import (
    MixerParams,
    architecture,
    head_write_weights,
    mixer_params,
    n_layers,
    neuron_write_weights,
    unembedding,
)

__all__ = ["NEURON_UNIT", "UNITS", "MixerParams", "Trace", "all_names", "architecture", "check_inputs",
           "head_write_weights", "mixer_params", "n_layers", "neuron_write_weights", "resolve_names", "trace",
           "trace_stream", "unembedding"]
