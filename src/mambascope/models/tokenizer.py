"""The byte-level BPE tokenizer shared by the bundled tiny models.

Byte-level (as GPT-2's) so that any text, including code and non-ASCII, tokenizes without an unknown
token. One special token, ``<|endoftext|>``, serves as BOS, EOS, UNK and PAD: the models are trained on
documents joined by it, so it marks "a new document starts here".
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

ENDOFTEXT = "<|endoftext|>"


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    *,
    min_frequency: int = 2,
    seed: int = 0,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for ``transformers``.

    Deterministic: the ``tokenizers`` BPE trainer counts pairs exactly and breaks ties by the pair
    itself, so the same texts give the same merges. ``seed`` is accepted for interface symmetry with
    the model trainer and recorded nowhere: BPE training has no randomness to seed.
    The result has ``bos_token == eos_token == unk_token == pad_token == "<|endoftext|>"`` and does
    not add special tokens by itself (callers decide where BOS goes).
    """
    del seed  # BPE training is deterministic; see the docstring.
    texts = list(texts)
    if not any(t.strip() for t in texts):
        raise ValueError("cannot train a tokenizer on an empty corpus")
    if vocab_size < 256 + 1:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + {ENDOFTEXT}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps the first word of a document as it is written.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a ``tokenizers.Tokenizer`` with ``<|endoftext|>`` as every special token."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        # Windows are fixed-length and never padded; this only matters for callers that pad batches.
        padding_side="right",
        model_max_length=1_000_000,
    )
