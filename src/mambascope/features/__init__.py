"""Sparse dictionary features (analyze stage): TopK SAEs and transcoders on traced units, trained on streamed
activations with eai-sparsify's ``SparseCoder``, saved in the SAELens format, evaluated on held-out windows
(docs/features.md)."""

from mambascope.features.dictionary import (
    DictionarySpec,
    codes,
    load_dictionary,
    reconstruct,
    resolve_hook,
    save_dictionary,
)
from mambascope.features.evaluate import evaluate_dictionary, reconstruction_stats, splice_losses
from mambascope.features.train import TrainConfig, train_dictionary

__all__ = ["DictionarySpec", "TrainConfig", "codes", "evaluate_dictionary", "load_dictionary", "reconstruct",
           "reconstruction_stats", "resolve_hook", "save_dictionary", "splice_losses", "train_dictionary"]
