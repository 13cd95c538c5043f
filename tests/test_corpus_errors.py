"""A user's corpus file that cannot be read is one ValueError naming the file (and the line, and the encoding
expected); a whole file is read with split "all"; split names are checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mambascope.data import in_validation, load_corpus


def _error(path: Path, split: str = "all") -> str:
    with pytest.raises(ValueError) as exc:
        load_corpus(str(path), split)
    message = str(exc.value)
    assert "\n" not in message and str(path) in message, message
    return message


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_latin1_file_names_the_file_the_line_and_utf8(tmp_path: Path, suffix: str) -> None:
    lines = ["first document", "", "caf\u00e9 au lait"] if suffix == ".txt" else [
        json.dumps({"text": "first"}), json.dumps({"text": "second"}), '{"text": "caf\u00e9"}']
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes("\n".join(lines).encode("latin-1"))
    message = _error(path)
    assert "line 3" in message and "0xe9" in message and "expected UTF-8" in message


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_binary_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"binary{suffix}"
    path.write_bytes(bytes(range(256)) * 4)  # a NUL first, undecodable bytes later
    message = _error(path)
    assert "binary file" in message and "expected UTF-8" in message and "line 1" in message
    zeros = tmp_path / f"zeros{suffix}"
    zeros.write_bytes(b"\x00" * 64)  # valid UTF-8, but no text
    assert "binary file" in _error(zeros)


def test_utf16_file(tmp_path: Path) -> None:
    path = tmp_path / "notepad.txt"
    path.write_text("a document\n\nanother one\n", encoding="utf-16")
    message = _error(path)
    assert "UTF-16" in message and "expected UTF-8" in message


def test_utf8_with_bom_is_read(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n", encoding="utf-8-sig")
    assert load_corpus(str(path), "all").texts == ["one", "two"]


def test_jsonl_text_with_a_line_separator_stays_one_document(tmp_path: Path) -> None:
    path = tmp_path / "sep.jsonl"
    path.write_text('{"text": "a\u2028b"}\n{"text": "c"}\n', encoding="utf-8")  # raw U+2028 is valid JSON
    assert load_corpus(str(path), "all").texts == ["a\u2028b", "c"]


@pytest.mark.parametrize(("name", "content"), [("empty.txt", b""), ("empty.jsonl", b""),
                                               ("blank.txt", b"\n  \n\t\n"),
                                               ("blank.jsonl", b'{"text": ""}\n\n{"text": "   "}\n')])
def test_empty_file_or_no_text(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    message = _error(path)
    assert ("is empty" in message) if not content else ("has no text" in message)


def test_split_all_returns_the_whole_file_and_an_empty_split_says_so(tmp_path: Path) -> None:
    docs = ["def f(x):\n    return x", "A second document.", "Third, the last one."]
    assert not any(in_validation(d) for d in docs)  # so the validation split of this file is empty
    path = tmp_path / "three.txt"
    path.write_text("\n\n".join(docs), encoding="utf-8")
    whole = load_corpus(str(path), split="all")
    assert whole.texts == docs and whole.split == "all"
    message = _error(path, "validation")
    assert "3 document(s), none in split 'validation'" in message and "--split all" in message


@pytest.mark.parametrize("split", ["test", "ALL", "", "valid"])
def test_split_names_are_checked(tmp_path: Path, split: str) -> None:
    path = tmp_path / "c.txt"
    path.write_text("some text", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"unknown split {split!r}: choose one of train, validation, all"):
        load_corpus(str(path), split)
