"""Streamed corpora: documents read, tokenized and cut into windows lazily (docs/design.md §9).

A ``.txt`` file is read line by line (documents separated by blank lines, as ``load_corpus`` reads it), a
``.jsonl`` file line by line (a ``text`` field per line), a ``datasets`` name with ``streaming=True``;
the split rule is ``load_corpus``'s (the text's SHA-256 for files and the built-in corpus, the dataset's
own splits otherwise).  Documents are tokenized in chunks of ``CHUNK_DOCS`` and cut exactly as
``tokenize_windows`` cuts them, so a stream yields the same windows, in the same order, as the in-memory
path; only ``CHUNK_DOCS`` documents and one batch of windows are held at a time.

Held-out windows (ablation, pruning, faithfulness) are chosen as the stream goes, without knowing its
length: with fraction f, window i (0-based, corpus order) is held out when ⌊(i+1)·f⌋ > ⌊i·f⌋ (every
(1/f)-th window, spread evenly: i = 3, 7, 11, ... for f = 1/4) until ``HELDOUT_WINDOWS`` are held out;
every other window is a selection window.  (In memory, the held-out part is the tail of the windows
instead; the two paths therefore select different windows.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from mambascope.data.corpus import (
    _check_split,
    _download_failure,
    builtin_texts,
    in_validation,
    jsonl_documents,
    txt_documents,
)

CHUNK_DOCS = 256
HELDOUT_WINDOWS = 512  # held-out windows kept in memory for the interventions, at most


def _lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 file (a leading BOM dropped), read lazily; undecodable bytes are a ValueError."""
    lineno = 0
    try:
        with path.open(encoding="utf-8-sig", newline="\n") as fh:  # JSON strings may hold \r
            for line in fh:
                lineno += 1
                yield line.rstrip("\r\n")
    except UnicodeDecodeError:
        raise ValueError(f"corpus file {path}, line {lineno + 1}: not UTF-8; expected UTF-8 text: convert the file "
                         "(e.g. iconv -f latin1 -t UTF-8)") from None


def _dataset_documents(spec: str, split: str) -> Iterator[str]:
    """A ``datasets`` name (``name`` or ``name:config``) read with ``streaming=True``; ``validation`` falls
    back to ``test`` as in ``load_corpus``."""
    import datasets

    name, _, config = spec.partition(":")
    try:
        parts = datasets.load_dataset(name, config or None, streaming=True)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        raise ValueError(_download_failure(spec, exc)) from None
    if split == "all":
        keys = sorted(parts)
    else:
        key = split if split in parts else ("test" if split == "validation" and "test" in parts else None)
        if key is None:
            raise ValueError(f"dataset {spec!r} has no split {split!r} (it has: {', '.join(sorted(parts))})")
        keys = [key]
    for key in keys:
        for record in parts[key]:
            text = record.get("text")
            if isinstance(text, str) and text.strip():
                yield text


def stream_documents(spec: str = "builtin", split: str = "train") -> Callable[[], Iterator[str]]:
    """A function that opens ``spec`` anew and yields its documents of ``split`` lazily, in corpus order.

    Raises at once (not on first read) for a missing or unsupported file or a bad split."""
    _check_split(split)
    if spec == "builtin":
        return lambda: _of_split(iter(builtin_texts()), split)
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if suffix in (".txt", ".jsonl"):
        if path.is_dir():
            raise IsADirectoryError(f"corpus {path} is a directory, not a .txt or .jsonl file")
        if not path.is_file():
            raise FileNotFoundError(f"corpus file not found: {path}")
        if suffix == ".txt":
            return lambda: _of_split(txt_documents(_lines(path)), split)
        return lambda: _of_split(jsonl_documents(_lines(path), path), split)
    if path.exists():
        raise ValueError(f"unsupported corpus file {path}: use a .txt or .jsonl file")
    return lambda: _dataset_documents(spec, split)


def _of_split(documents: Iterator[str], split: str) -> Iterator[str]:
    if split == "all":
        return documents
    return (t for t in documents if in_validation(t) == (split == "validation"))


class WindowStream:
    """The windows of a corpus, tokenized lazily each time they are iterated (re-reading the corpus).

    ``documents()`` opens the corpus; windows are cut per document like ``tokenize_windows`` (BOS first,
    exactly ``window`` tokens, the tail dropped) and at most ``max_tokens // window`` are taken.  After a
    complete pass, ``n_texts``, ``n_skipped``, ``n_short``, ``n_windows`` and ``longest`` describe it.
    """

    def __init__(self, documents: Callable[[], Iterable[str]], tokenizer: Any, window: int, *,
                 max_tokens: int | None = None, bos: bool = True) -> None:
        if window < 2:
            raise ValueError(f"window must be at least 2 tokens, got {window}")
        self.documents, self.tokenizer, self.window = documents, tokenizer, window
        self.max_windows = None if max_tokens is None else max_tokens // window
        self.bos_id = tokenizer.bos_token_id if bos else None
        if bos and self.bos_id is None:
            raise ValueError("bos=True but the tokenizer has no BOS token; pass bos=False")
        self.n_texts = self.n_skipped = self.n_short = self.longest = 0
        self.n_windows: int | None = None

    def __iter__(self) -> Iterator[list[int]]:
        """Every window [window] token ids, in corpus order."""
        counts = {"texts": 0, "skipped": 0, "short": 0, "longest": 0, "windows": 0}
        documents = iter(self.documents())
        while self.max_windows is None or counts["windows"] < self.max_windows:
            chunk = list(islice(documents, CHUNK_DOCS))
            if not chunk:
                break
            for ids in self.tokenizer(chunk, add_special_tokens=False)["input_ids"]:
                counts["texts"] += 1
                if len(ids) < 2:  # one token predicts nothing (as in tokenize_windows)
                    counts["skipped"] += 1
                    continue
                ids = ids if self.bos_id is None else [self.bos_id, *ids]
                counts["longest"] = max(counts["longest"], len(ids))
                if len(ids) < self.window:
                    counts["short"] += 1
                for k in range(len(ids) // self.window):
                    if self.max_windows is not None and counts["windows"] >= self.max_windows:
                        break
                    counts["windows"] += 1
                    yield ids[k * self.window:(k + 1) * self.window]
                if self.max_windows is not None and counts["windows"] >= self.max_windows:
                    break
        self.n_texts, self.n_skipped, self.n_short = counts["texts"], counts["skipped"], counts["short"]
        self.longest, self.n_windows = counts["longest"], counts["windows"]
        if not counts["windows"]:
            raise ValueError(f"no window of {self.window} tokens: 0 of {counts['texts']} documents have "
                             f"{self.window} tokens or more (the longest has {counts['longest']}); use a smaller "
                             "window or longer texts")

    def split(self, heldout_fraction: float) -> tuple[StreamSelection, torch.Tensor]:
        """(selection windows, held-out windows [≤ HELDOUT_WINDOWS, T]) by the rule of the module docstring.

        Reads the corpus until the held-out windows are complete (or it ends)."""
        rule = HeldoutRule(heldout_fraction)
        rows = []
        for i, ids in enumerate(self):
            if rule.held_out(i):
                rows.append(ids)
            if rule.complete(i):
                break
        if not rows:
            raise ValueError("the corpus has too few windows for a held-out part; give more text or a smaller "
                             "--window")
        return StreamSelection(self, rule), torch.tensor(rows, dtype=torch.long)


class HeldoutRule:
    """Window i is held out when ⌊(i+1)·f⌋ > ⌊i·f⌋ and ⌊(i+1)·f⌋ ≤ ``HELDOUT_WINDOWS`` (exact rationals)."""

    def __init__(self, fraction: float, limit: int = HELDOUT_WINDOWS) -> None:
        if not 0 < fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {fraction}")
        self.f, self.limit = Fraction(fraction).limit_denominator(10_000), limit  # 1/3, not 0.333...

    def held_out(self, i: int) -> bool:
        after = math.floor((i + 1) * self.f)
        return after > math.floor(i * self.f) and after <= self.limit

    def complete(self, i: int) -> bool:
        return math.floor((i + 1) * self.f) >= self.limit


class StreamSelection:
    """The selection windows of a ``WindowStream``: what the census reads, where it would read an [n, T] tensor.

    Iterating gives (row index among the selection windows, ids); ``batches`` [b, T] tensors; indexing with
    a list or slice of row indices re-reads the corpus once; ``shape`` and ``numel()`` are known after one
    complete pass (the census's).
    """

    def __init__(self, stream: WindowStream, rule: HeldoutRule) -> None:
        self.stream, self.rule = stream, rule
        self.n_rows: int | None = None

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        row = 0
        for i, ids in enumerate(self.stream):
            if not self.rule.held_out(i):
                yield row, ids
                row += 1
        self.n_rows = row

    def batches(self, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row index, windows [≤ batch_size, T]) in order."""
        rows = iter(self)
        while chunk := list(islice(rows, batch_size)):
            yield chunk[0][0], torch.tensor([ids for _, ids in chunk], dtype=torch.long)

    @property
    def shape(self) -> tuple[int, int]:
        if self.n_rows is None:
            raise RuntimeError("the number of selection windows is known only after a complete pass")
        return self.n_rows, self.stream.window

    def numel(self) -> int:
        n, window = self.shape
        return n * window

    def __getitem__(self, index: list[int] | slice) -> torch.Tensor:
        if isinstance(index, slice):
            rows = islice(iter(self), index.start, index.stop, index.step)
            return torch.tensor([ids for _, ids in rows], dtype=torch.long)
        wanted: dict[int, list[int] | None] = {int(i): None for i in index}
        found = 0
        for row, ids in self:
            if row in wanted:
                wanted[row], found = ids, found + 1
                if found == len(wanted):
                    break
        missing = [row for row, ids in wanted.items() if ids is None]
        if missing:
            raise IndexError(f"selection window {missing[0]} does not exist")
        return torch.tensor([wanted[int(i)] for i in index], dtype=torch.long)
