"""Neuron analyses as streaming accumulators: update per batch, merge across workers, finalize (docs/design.md §5).

Definitions follow Voita et al. 2023, "Neurons in Large Language Models: Dead, N-gram, Positional".
"""

from mambascope.neurons.activity import ActivityAccumulator, default_thresholds
from mambascope.neurons.attention_rows import UNITS as ATTENTION_ROW_UNITS
from mambascope.neurons.attention_rows import TopAttentionRows
from mambascope.neurons.batch import EmptyAccumulatorError, NeuronBatch, NonFiniteError
from mambascope.neurons.census import LayerCensus
from mambascope.neurons.delta import DeltaAccumulator
from mambascope.neurons.detectors import (
    CountTable,
    TokenDetectorAccumulator,
    cover_counts,
    detector_tokens_by_layer,
    ngram_ids,
)
from mambascope.neurons.overlap import group_overlap
from mambascope.neurons.positional import PositionalAccumulator, positional_bias, positional_information
from mambascope.neurons.suppression import detector_suppression, direct_logit_effects, top_logit_tokens
from mambascope.neurons.top_contexts import TopContextAccumulator

__all__ = [
    "ATTENTION_ROW_UNITS",
    "ActivityAccumulator",
    "CountTable",
    "DeltaAccumulator",
    "EmptyAccumulatorError",
    "LayerCensus",
    "NeuronBatch",
    "NonFiniteError",
    "PositionalAccumulator",
    "TokenDetectorAccumulator",
    "TopAttentionRows",
    "TopContextAccumulator",
    "cover_counts",
    "default_thresholds",
    "detector_suppression",
    "detector_tokens_by_layer",
    "direct_logit_effects",
    "group_overlap",
    "ngram_ids",
    "positional_bias",
    "positional_information",
    "top_logit_tokens",
]
