"""Corpora, tokenization and fixed-length windows (docs/design.md §5, §7)."""

from mambascope.data.corpus import BUILTIN_MODULES, Corpus, builtin_texts, in_validation, load_corpus, split_texts
from mambascope.data.windows import Windows, tokenize_windows

__all__ = ["BUILTIN_MODULES", "Corpus", "Windows", "builtin_texts", "in_validation", "load_corpus",
           "split_texts", "tokenize_windows"]
