"""Streamed corpora (docs/design.md §9): the same windows as the in-memory path, held-out windows by the
documented rule, and a census over a stream equal to the census over the same windows in memory."""

import itertools
import json
import math

import pytest
import torch

from mambascope.data import load_corpus, tokenize_windows
from mambascope.data.stream import HELDOUT_WINDOWS, HeldoutRule, WindowStream, stream_documents


@pytest.fixture(scope="module")
def texts():
    return load_corpus("builtin", "all").texts[:150]  # both splits


@pytest.fixture(scope="module")
def files(tmp_path_factory, texts):
    root = tmp_path_factory.mktemp("stream")
    (root / "docs.txt").write_text("\n\n".join(texts), encoding="utf-8")
    (root / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts), encoding="utf-8")
    return root


@pytest.mark.parametrize("suffix", ["txt", "jsonl"])
@pytest.mark.parametrize(("split", "max_tokens"), [("all", None), ("train", 2048), ("validation", None)])
def test_a_stream_yields_the_windows_of_the_in_memory_path(files, small_tokenizer, suffix, split, max_tokens):
    path = files / f"docs.{suffix}"
    expected = tokenize_windows(load_corpus(str(path), split).texts, small_tokenizer, 32, max_tokens=max_tokens)
    stream = WindowStream(stream_documents(str(path), split), small_tokenizer, 32, max_tokens=max_tokens)
    assert torch.equal(torch.tensor(list(stream)), expected.ids)
    assert (stream.n_windows, stream.n_texts, stream.n_short, stream.n_skipped) == (
        expected.n_windows, expected.n_texts, expected.n_short, expected.n_skipped)


def test_the_heldout_rule_takes_every_fourth_window_up_to_its_limit():
    rule = HeldoutRule(0.25, limit=3)
    assert [i for i in range(20) if rule.held_out(i)] == [3, 7, 11]
    third = HeldoutRule(1 / 3)
    held = [i for i in range(300) if third.held_out(i)]
    assert len(held) == 100 and all(b - a == 3 for a, b in itertools.pairwise(held))


def test_a_census_over_a_stream_equals_the_census_over_the_same_windows(files, small_checkpoints):
    """The reference selection is cut by hand from tokenize_windows: every 4th window (i = 3, 7, ...) out."""
    from mambascope.models import load_model
    from mambascope.pipeline import census_pass, split_windows
    from mambascope.scale import ScanPlan, scan_function

    model, tokenizer = load_model(small_checkpoints["mamba"], device="cpu")
    path = str(files / "docs.txt")
    ids = tokenize_windows(load_corpus(path, "all").texts, tokenizer, 32).ids
    held = [i for i in range(ids.shape[0]) if (i + 1) % 4 == 0][:HELDOUT_WINDOWS]
    select = ids[sorted(set(range(ids.shape[0])) - set(held))]
    assert ids.shape[0] > 4 * HELDOUT_WINDOWS  # the limit is reached: later windows all go to the selection
    stream_select, stream_held = split_windows(WindowStream(stream_documents(path, "all"), tokenizer, 32), 0.25)
    assert torch.equal(stream_held, ids[held])
    expected = census_pass(model, tokenizer, select, batch_size=4, progress=False)
    streamed = census_pass(model, tokenizer, stream_select, batch_size=4, progress=False,
                           scan=scan_function(ScanPlan()))
    assert json.dumps(streamed, sort_keys=True, default=str) == json.dumps(expected, sort_keys=True, default=str)
    assert streamed["tokens"] == select.numel() and not math.isnan(streamed["loss"])
