"""Synthetic tasks with known answers: multi-query associative recall (MQAR) and copying.

Both are token sequences in which some positions (the *queries*) can only be predicted by recalling one
earlier position; that position is recorded, so attributions can be scored against ground truth.

MQAR (Arora et al. 2023, "Zoology", §3 and App. E): position 0 is ``<|endoftext|>`` (BOS); then
``num_pairs`` key–value pairs ``k_1 v_1 … k_D v_D`` (keys distinct, values drawn with replacement); then
a query region of filler ``_`` in which every key appears once, in random order, at random
non-overlapping places (two positions apart at least).  A query is the position of a key in the query
region; its answer, the value that followed the same key in the pairs, is the label of the next position,
whose input token stays filler: answers never appear in the query region, so a model cannot find them by
elimination (with the answers shown, the last query's value is the only pair value not yet repeated,
and a 2-layer GPT-2 learned exactly that shortcut: 86 % right on the last queries, 17 % on the first).
Ground truth per query: ``key_pos`` (the key's position in the pairs) and ``value_pos`` = key_pos + 1
(the token to recall).

Copy: BOS, ``n`` distinct symbols ``x_1 … x_n``, the separator ``|``, then ``x_1 … x_n`` again.  The
query is the copy of x_i (i < n), its answer x_{i+1}; ``key_pos`` is x_i's first occurrence and
``value_pos`` that of x_{i+1} (induction: "find the earlier x_i, read the token after it").

Both tasks share one word-level vocabulary (:func:`task_tokenizer`): specials, ``k0…k{K-1}`` (keys) and
``v0…v{V-1}`` (values); copy draws its symbols from all keys and values.  Everything random comes from
the ``seed`` of :func:`generate`, so the same seed gives the same examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mambascope.models.tokenizer import ENDOFTEXT

TASKS = ("mqar", "copy")
FILLER, SEPARATOR = "_", "|"
# 16 keys and 16 values: every key recurs often enough in a few hundred thousand examples to be learned on a CPU.
NUM_KEYS = NUM_VALUES = 16
IGNORE = -100  # labels ignored by the Hugging Face causal-LM loss

__all__ = ["IGNORE", "TASKS", "TaskBatch", "generate", "query_correct", "task_tokenizer", "task_vocab"]


def task_vocab(num_keys: int = NUM_KEYS, num_values: int = NUM_VALUES) -> list[str]:
    """The tokens, in id order: BOS/EOS ``<|endoftext|>`` (id 0), filler, separator, keys, values."""
    return [ENDOFTEXT, FILLER, SEPARATOR, *(f"k{i}" for i in range(num_keys)), *(f"v{i}" for i in range(num_values))]


def task_tokenizer(num_keys: int = NUM_KEYS, num_values: int = NUM_VALUES):
    """A ``transformers`` fast tokenizer over :func:`task_vocab` (whitespace-separated words, no merges).

    Saved with ``save_pretrained`` beside a model, it loads with ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from mambascope.models.tokenizer import wrap_tokenizer

    vocab = {t: i for i, t in enumerate(task_vocab(num_keys, num_values))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=ENDOFTEXT))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return wrap_tokenizer(tok)


@dataclass(frozen=True)
class TaskBatch:
    """``n`` examples of ``T`` tokens with ``Q`` queries each.

    input_ids [n, T]; labels [n, T]: the answer at each answer position (query + 1), ``IGNORE`` elsewhere
    (the Hugging Face loss shifts them, so only the queries are trained); query [n, Q] the positions whose
    prediction is the answer; answer [n, Q] = input_ids at value_pos (copy: also at query + 1; MQAR: the
    input there is filler); key_pos, value_pos [n, Q] the ground-truth source positions (module docstring).
    """

    task: str
    input_ids: Tensor
    labels: Tensor
    query: Tensor
    answer: Tensor
    key_pos: Tensor
    value_pos: Tensor

    @property
    def num_queries(self) -> int:
        return int(self.query.numel())

    def rows(self, sl: slice | Tensor) -> TaskBatch:
        """The examples ``sl`` (a slice or an index tensor) of this batch."""
        return TaskBatch(self.task, self.input_ids[sl], self.labels[sl], self.query[sl], self.answer[sl],
                         self.key_pos[sl], self.value_pos[sl])


def _ids(num_keys: int, num_values: int) -> dict[str, int]:
    vocab = task_vocab(num_keys, num_values)
    return {"bos": 0, "filler": vocab.index(FILLER), "sep": vocab.index(SEPARATOR), "key0": 3,
            "value0": 3 + num_keys}


def _mqar(n: int, seq_len: int, num_pairs: int, num_keys: int, num_values: int,
          gen: torch.Generator, num_queries: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ids = _ids(num_keys, num_values)
    region = seq_len - 1 - 2 * num_pairs
    n_q = num_pairs if num_queries is None else num_queries
    if num_pairs < 1 or num_pairs > num_keys:
        raise ValueError(f"num_pairs must be in 1..{num_keys} (distinct keys), got {num_pairs}")
    if n_q < num_pairs:
        raise ValueError(f"num_queries must be at least num_pairs ({num_pairs}): every key is queried, got {n_q}")
    if region < 2 * n_q:
        raise ValueError(f"seq_len {seq_len} is too short for {num_pairs} pairs and {n_q} queries: "
                         f"need at least {1 + 2 * num_pairs + 2 * n_q}")
    D = num_pairs
    keys = torch.rand(n, num_keys, generator=gen).argsort(1)[:, :D] + ids["key0"]  # distinct per row
    values = torch.randint(0, num_values, (n, D), generator=gen) + ids["value0"]
    x = torch.full((n, seq_len), ids["filler"], dtype=torch.long)
    x[:, 0] = ids["bos"]
    pair_key_pos = 1 + 2 * torch.arange(D)
    x[:, pair_key_pos] = keys
    x[:, pair_key_pos + 1] = values
    # Query i asks for pair which[:, i]: a random order of Q slots, pair j taking the slots ≡ j (mod D), so
    # every key is asked ⌊Q/D⌋ or ⌈Q/D⌉ times (once each when Q = D).
    which = torch.rand(n, n_q, generator=gen).argsort(1) % D
    # Q non-overlapping 2-token slots in a region of R: sorted distinct c_i in [0, R-Q), start_i = c_i + i.
    c = torch.rand(n, region - n_q, generator=gen).argsort(1)[:, :n_q].sort(1).values
    query = 1 + 2 * D + c + torch.arange(n_q)
    rows = torch.arange(n)[:, None]
    x[rows, query] = keys.gather(1, which)  # the token after a query stays filler: answers never leak
    key_pos = pair_key_pos[which]
    return x, query, key_pos, key_pos + 1


def _copy(n: int, seq_len: int, num_keys: int, num_values: int,
          gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ids = _ids(num_keys, num_values)
    if seq_len < 6 or seq_len % 2:
        raise ValueError(f"copy needs an even seq_len >= 6 (BOS, n symbols, '|', n symbols), got {seq_len}")
    length = (seq_len - 2) // 2
    if length > num_keys + num_values:
        raise ValueError(f"copy of {length} distinct symbols needs at least that many in the vocabulary "
                         f"({num_keys + num_values})")
    symbols = torch.rand(n, num_keys + num_values, generator=gen).argsort(1)[:, :length] + ids["key0"]
    x = torch.cat([torch.full((n, 1), ids["bos"]), symbols, torch.full((n, 1), ids["sep"]), symbols], 1)
    first = torch.arange(1, length)  # x_i at positions 1..n; the queries are the copies of x_1..x_{n-1}
    query = (first + length + 1).expand(n, -1).clone()
    key_pos = first.expand(n, -1).clone()
    return x, query, key_pos, key_pos + 1


def generate(task: str, n: int, seq_len: int = 64, *, num_pairs: int = 8, seed: int = 0,
             num_keys: int = NUM_KEYS, num_values: int = NUM_VALUES, num_queries: int | None = None) -> TaskBatch:
    """``n`` seeded examples of ``task`` ("mqar" or "copy") of ``seq_len`` tokens (module docstring).

    ``num_pairs`` (MQAR only): key–value pairs per example, each queried once.  ``num_queries`` (MQAR only,
    default ``num_pairs``): more queries per example, every key asked ⌊Q/D⌋ or ⌈Q/D⌉ times (a denser
    training signal; ``None`` gives exactly the examples of earlier versions for the same seed).  Copy
    repeats (seq_len − 2)/2 distinct symbols.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    gen = torch.Generator().manual_seed(seed)
    if task == "mqar":
        x, query, key_pos, value_pos = _mqar(n, seq_len, num_pairs, num_keys, num_values, gen, num_queries)
    else:
        x, query, key_pos, value_pos = _copy(n, seq_len, num_keys, num_values, gen)
    rows = torch.arange(n)[:, None]
    answer = x[rows, value_pos]
    labels = torch.full_like(x, IGNORE)
    labels[rows, query + 1] = answer
    return TaskBatch(task, x, labels, query, answer, key_pos, value_pos)


def query_correct(logits: Tensor, batch: TaskBatch) -> Tensor:
    """[n, Q] bool: the model's argmax at each query position is the answer (logits [n, T, V])."""
    rows = torch.arange(batch.query.shape[0], device=logits.device)[:, None]
    return logits[rows, batch.query.to(logits.device)].argmax(-1).cpu() == batch.answer
