"""Corpora (built-in, .txt, .jsonl, datasets names) and fixed-length windows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mambascope.data import Corpus, in_validation, load_corpus, tokenize_windows
from mambascope.data.corpus import MIN_DOC_CHARS


class WordTokenizer:
    """Deterministic test tokenizer: the text "w3 w10" encodes to [3, 10]; BOS is 0."""

    bos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [int(w[1:]) for w in text.split()]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


class NoBosTokenizer(WordTokenizer):
    bos_token_id = None  # type: ignore[assignment]


def words(start: int, n: int) -> str:
    return " ".join(f"w{i}" for i in range(start, start + n))


# --- built-in corpus -------------------------------------------------------------------------------


def test_builtin_splits_are_deterministic_disjoint_and_roughly_ninety_ten() -> None:
    train = load_corpus("builtin", "train")
    val = load_corpus("builtin", "validation")
    assert isinstance(train, Corpus) and train.name == "builtin" and train.split == "train"
    assert load_corpus("builtin", "train").texts == train.texts  # same order every call
    assert not set(train.texts) & set(val.texts)
    everything = load_corpus("builtin", "all").texts
    assert len(everything) == len(set(everything)) == len(train) + len(val)  # deduplicated partition
    assert 0.06 < len(val) / len(everything) < 0.14
    assert all(in_validation(t) for t in val.texts) and not any(in_validation(t) for t in train.texts)
    assert min(len(t) for t in everything) >= MIN_DOC_CHARS
    # It really is the standard library's documentation: a pydoc topic and a known docstring.
    import pydoc_data.topics

    assert any(t.startswith(pydoc_data.topics.topics["for"].strip()[:40]) for t in everything)
    import textwrap

    assert any(t.startswith("Wrap a single paragraph of text") for t in everything), textwrap.wrap.__doc__


def test_bad_split_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown split 'test'.*train, validation, all"):
        load_corpus("builtin", "test")


# --- files -----------------------------------------------------------------------------------------


def test_txt_documents_are_separated_by_blank_lines(tmp_path: Path) -> None:
    docs = [f"document {i}\nsecond line of {i}" for i in range(40)]
    path = tmp_path / "c.txt"
    path.write_text("\n\n  \n".join(docs) + "\n\n\n", encoding="utf-8")
    allc = load_corpus(str(path), "all")
    assert allc.texts == docs and allc.name == str(path)
    train, val = load_corpus(str(path), "train").texts, load_corpus(str(path), "validation").texts
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert val == [d for d in docs if in_validation(d)]


def test_jsonl_reads_the_text_field(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"doc {i}", "id": i}) for i in range(5)) + "\n\n",
                    encoding="utf-8")
    assert load_corpus(str(path), "all").texts == [f"doc {i}" for i in range(5)]


def test_jsonl_line_without_text_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"c\.jsonl:2: .*'text' field"):
        load_corpus(str(path), "all")
    path.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"c\.jsonl:2: not valid JSON"):
        load_corpus(str(path), "all")


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="corpus file not found"):
        load_corpus(str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no non-empty documents"):
        load_corpus(str(empty), "all")
    other = tmp_path / "c.csv"
    other.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"use a \.txt or \.jsonl"):
        load_corpus(str(other))


def test_dataset_name_offline_gives_one_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config
    import huggingface_hub.constants

    # Force offline mode whatever the environment, so the test never waits on network retries.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as info:
        load_corpus("mambascope-no-such-dataset:cfg", "train")
    msg = str(info.value)
    assert "could not download dataset 'mambascope-no-such-dataset:cfg'" in msg
    assert "offline" in msg and ".txt or .jsonl" in msg and "\n" not in msg


# --- windows ---------------------------------------------------------------------------------------


def test_windows_are_per_document_without_padding() -> None:
    texts = [words(100, 10), words(200, 3), "w7", "   ", words(300, 5)]
    win = tokenize_windows(texts, WordTokenizer(), 4, bos=True)
    # doc 1: [0,100..109] -> 11 tokens -> 2 windows; doc 2: 4 tokens -> 1; "w7" and "   " skipped;
    # doc 5: 6 tokens -> 1 window.
    expected = [[0, 100, 101, 102], [103, 104, 105, 106], [0, 200, 201, 202], [0, 300, 301, 302]]
    assert win.ids.dtype == torch.long and win.ids.tolist() == expected
    assert (win.n_texts, win.n_skipped, win.n_short, win.n_tokens, win.longest) == (5, 2, 0, 16, 11)
    assert win.n_windows == 4


def test_windows_without_bos_and_short_documents() -> None:
    win = tokenize_windows([words(10, 3), words(20, 6)], WordTokenizer(), 3, bos=False)
    assert win.ids.tolist() == [[10, 11, 12], [20, 21, 22], [23, 24, 25]]
    win = tokenize_windows([words(10, 3), words(20, 6)], WordTokenizer(), 5, bos=False)
    assert win.ids.tolist() == [[20, 21, 22, 23, 24]] and win.n_short == 1


def test_max_tokens_caps_the_windows() -> None:
    texts = [words(i * 100, 50) for i in range(1, 5)]
    win = tokenize_windows(texts, WordTokenizer(), 8, max_tokens=30, bos=False)
    assert win.ids.shape == (3, 8) and win.n_texts == 1
    assert win.ids[2].tolist() == list(range(116, 124))


def test_window_errors() -> None:
    tok = WordTokenizer()
    with pytest.raises(ValueError, match="empty or whitespace only"):
        tokenize_windows([], tok, 4)
    with pytest.raises(ValueError, match="empty or whitespace only"):
        tokenize_windows(["  ", "\n"], tok, 4)
    with pytest.raises(ValueError, match=r"no window of 16 tokens: 0 of 3 documents.*longest has 6 including BOS"):
        tokenize_windows([words(1, 5), words(10, 2), "w3"], tok, 16)
    with pytest.raises(ValueError, match="positive"):
        tokenize_windows(["w1 w2"], tok, 0)
    with pytest.raises(ValueError, match="no BOS token"):
        tokenize_windows(["w1 w2"], NoBosTokenizer(), 2, bos=True)


def test_windows_with_a_real_tokenizer() -> None:
    from mambascope.models import train_tokenizer

    texts = load_corpus("builtin", "validation").texts[:200]
    tok = train_tokenizer(texts, vocab_size=400)
    win = tokenize_windows(texts, tok, 32)
    assert win.ids.shape[1] == 32 and win.n_windows > 10
    assert int(win.ids.max()) < len(tok)
    # The first window of the first long-enough document begins with BOS and then its first tokens.
    first = next(t for t in texts if len(tok(t, add_special_tokens=False)["input_ids"]) >= 31)
    assert win.ids[0].tolist() == [tok.bos_token_id, *tok(first, add_special_tokens=False)["input_ids"][:31]]
