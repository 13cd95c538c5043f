"""Model loading (bundled name | local dir | hub id), the shared tokenizer, and tiny-model training."""

from mambascope.models.loading import (
    BUNDLED,
    SUPPORTED,
    bundled_path,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from mambascope.models.tokenizer import ENDOFTEXT, train_tokenizer

__all__ = ["BUNDLED", "ENDOFTEXT", "SUPPORTED", "bundled_path", "load_model", "load_tokenizer", "resolve_device",
           "resolve_dtype", "train_tiny", "train_tokenizer"]


def __getattr__(name: str):
    # train.py pulls in the training loop and configs; import it only when asked for.
    if name == "train_tiny":
        from mambascope.models.train import train_tiny

        return train_tiny
    raise AttributeError(name)
