"""mambascope: neuron-level interpretability of Mamba state-space language models.

load → trace → accumulate → analyze → report:
``load_model`` / ``load_corpus`` (models/, data/), ``trace`` (trace/; TransformerLens-style
``run_with_cache`` / ``run_with_hooks`` in hooks.py), the accumulators (neurons/),
hidden attention (ssm/, attention_neurons.py, attribution/), interventions/, report/.
"""

from mambascope.data import load_corpus, tokenize_windows
from mambascope.hooks import HookPoint, run_with_cache, run_with_hooks
from mambascope.models import load_model
from mambascope.ssm import block_bias, hidden_attention
from mambascope.trace import Trace, mixer_params, trace, trace_stream
from mambascope.trace.generate import Steer, generate

__version__ = "0.1.0"

__all__ = ["HookPoint", "Steer", "Trace", "block_bias", "generate", "hidden_attention", "load_corpus", "load_model",
           "mixer_params", "run_with_cache", "run_with_hooks", "tokenize_windows", "trace", "trace_stream"]
