"""Fixed-length token windows (docs/design.md §5: positional analysis uses windows of T tokens, no padding).

Windows are cut **per document** and never cross a document boundary. A document's tokens (after an
optional BOS) are cut into consecutive non-overlapping windows of exactly T tokens from its start;
the tail shorter than T is dropped. Why per document and not a concatenated stream with EOS
separators: position ``p`` inside a window then means "p tokens into a document" for every window
that starts a document, and no window mixes the end of one text with the start of an unrelated one,
which would plant spurious "new document" signals at arbitrary positions. The price is fewer windows
from corpora of short texts; the error raised when no window fits says how long the texts are.

With ``bos=True`` each document is prefixed by the tokenizer's BOS token (``<|endoftext|>`` for the
bundled models, which is how they saw document starts in training), so the first window of every
document starts at position 0 with BOS, as analyses that exclude BOS expect.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Windows:
    """Token windows and how they were obtained.

    ``ids``: LongTensor ``[n_windows, window]``. ``n_texts``: documents read (including skipped ones).
    ``n_skipped``: documents with fewer than 2 tokens, dropped. ``n_short``: documents of at least 2
    tokens that were shorter than one window, so contributed nothing. ``n_tokens``: tokens in ``ids``.
    ``longest``: token count of the longest document (BOS included when added).
    """

    ids: torch.Tensor
    n_texts: int
    n_skipped: int
    n_short: int
    n_tokens: int
    longest: int

    @property
    def n_windows(self) -> int:
        return int(self.ids.shape[0])


def _encode(tokenizer: Any, text: str) -> list[int]:
    # add_special_tokens=False: BOS placement is decided here, not by the tokenizer's post-processor
    # (GPT-2 style tokenizers add nothing, others add BOS/EOS; windows must not depend on which).
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_windows(
    texts: Iterable[str],
    tokenizer: Any,
    window: int,
    *,
    max_tokens: int | None = None,
    bos: bool = True,
) -> Windows:
    """Cut ``texts`` into per-document windows of exactly ``window`` tokens (see the module docstring).

    ``max_tokens`` caps the tokens returned: at most ``max_tokens // window`` windows, taken in corpus
    order (documents are tokenized lazily, so a cap also bounds the work). ``bos`` prefixes each
    document with ``tokenizer.bos_token_id`` (an error if the tokenizer has none).
    Raises ``ValueError`` for an empty or whitespace-only input, a non-positive window, or when no
    document is long enough for one window (the message gives the longest document's length).
    """
    if window < 1:
        raise ValueError(f"window must be a positive number of tokens, got {window}")
    if max_tokens is not None and max_tokens < window:
        raise ValueError(f"max_tokens ({max_tokens}) is smaller than one window ({window} tokens)")
    if isinstance(texts, str):
        # A lone string would otherwise be iterated character by character.
        texts = [texts]
    texts = list(texts)
    if not any(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError("no text to tokenize: the input is empty or whitespace only")
    bos_id = None
    if bos:
        bos_id = getattr(tokenizer, "bos_token_id", None)
        if bos_id is None:
            raise ValueError("bos=True but the tokenizer has no BOS token; pass bos=False")
    max_windows = None if max_tokens is None else max_tokens // window

    rows: list[list[int]] = []
    n_skipped = n_short = longest = n_read = 0
    for text in texts:
        if max_windows is not None and len(rows) >= max_windows:
            break
        n_read += 1
        ids = _encode(tokenizer, text) if text.strip() else []
        if len(ids) < 2:
            # One token predicts nothing and has no position structure; count it so callers can report it.
            n_skipped += 1
            continue
        if bos_id is not None:
            ids = [bos_id, *ids]
        longest = max(longest, len(ids))
        n_full = len(ids) // window
        if n_full == 0:
            n_short += 1
            continue
        for k in range(n_full):
            if max_windows is not None and len(rows) >= max_windows:
                break
            rows.append(ids[k * window:(k + 1) * window])
    if not rows:
        raise ValueError(
            f"no window of {window} tokens: 0 of {n_read} documents have {window} tokens or more "
            f"(the longest has {longest}{' including BOS' if bos else ''}; {n_skipped} had fewer than "
            f"2 tokens); use a smaller window or longer texts"
        )
    ids_t = torch.tensor(rows, dtype=torch.long)
    return Windows(ids=ids_t, n_texts=n_read, n_skipped=n_skipped, n_short=n_short,
                   n_tokens=int(ids_t.numel()), longest=longest)
