"""Every checkpoint loading failure is one ValueError / FileNotFoundError naming the file and the fix.

Each case saves a real checkpoint (save_pretrained of a tiny random model and the small tokenizer) in
tmp_path and then corrupts it the way users' checkpoints break.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, MambaConfig, MambaForCausalLM

from mambascope.models import load_model, load_tokenizer
from mambascope.models.train import train_tiny


def _save(path: Path, tokenizer, kind: str = "mamba") -> Path:
    torch.manual_seed(0)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if kind == "mamba":
        model = MambaForCausalLM(MambaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2,
                                             state_size=4, **special))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=2, n_head=2,
                                           n_positions=64, **special))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def ckpt(tmp_path, small_tokenizer) -> Path:
    return _save(tmp_path / "ckpt", small_tokenizer)


def _one_line(exc: pytest.ExceptionInfo, *names: str | Path) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    for name in names:
        assert str(name) in message, message
    return message


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | changes))


def test_a_valid_checkpoint_loads(ckpt, small_tokenizer):
    model, tok = load_model(str(ckpt), device="cpu")
    assert len(tok) == len(small_tokenizer) and type(model).__name__ == "MambaForCausalLM"


def test_no_tokenizer_files(ckpt):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (ckpt / name).unlink()
    with pytest.raises(ValueError, match="no tokenizer files") as exc:
        load_model(str(ckpt), device="cpu")
    assert "tokenizer.save_pretrained" in _one_line(exc, ckpt)


def test_corrupt_tokenizer_file(ckpt):
    (ckpt / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ValueError, match="no usable tokenizer") as exc:
        load_model(str(ckpt), device="cpu")
    assert "tokenizer.save_pretrained" in _one_line(exc, ckpt)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_unreadable_safetensors(ckpt, damage):
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                         "garbage": random.Random(0).randbytes(4096)}[damage])
    with pytest.raises(ValueError, match=r"is not a readable safetensors file.*truncated or corrupt") as exc:
        load_model(str(ckpt), device="cpu")
    assert "save_pretrained" in _one_line(exc, weights)


def test_corrupt_pytorch_bin(ckpt):
    state = MambaForCausalLM.from_pretrained(ckpt).state_dict()
    (ckpt / "model.safetensors").unlink()
    torch.save(state, ckpt / "pytorch_model.bin")
    load_model(str(ckpt), device="cpu")  # the .bin route works ...
    data = (ckpt / "pytorch_model.bin").read_bytes()
    (ckpt / "pytorch_model.bin").write_bytes(data[: len(data) // 3])  # ... until the file is cut short
    with pytest.raises(ValueError, match="cannot load the weights") as exc:
        load_model(str(ckpt), device="cpu")
    assert "save_pretrained" in _one_line(exc, ckpt / "pytorch_model.bin")


def test_missing_weights_file(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights file in") as exc:
        load_model(str(ckpt), device="cpu")
    assert "model.safetensors" in _one_line(exc, ckpt)


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "mamba",')
    with pytest.raises(ValueError, match=r"restore the config\.json saved with the weights") as exc:
        load_model(str(ckpt), device="cpu")
    _one_line(exc, ckpt / "config.json")


def test_config_not_utf8(ckpt):
    (ckpt / "config.json").write_bytes(b"\xff\xfe{\x00")
    with pytest.raises(ValueError, match=r"cannot read .*config\.json") as exc:
        load_model(str(ckpt), device="cpu")
    assert "restore the config.json saved with the weights" in _one_line(exc, ckpt / "config.json")


@pytest.mark.parametrize(("content", "kind"), [("[1, 2]", "array"), ("null", "null"), ('"mamba"', "string")])
def test_config_not_an_object(ckpt, content, kind):
    (ckpt / "config.json").write_text(content)
    with pytest.raises(ValueError, match=f"must be a JSON object with a \"model_type\" key, got a JSON {kind}") as exc:
        load_model(str(ckpt), device="cpu")
    _one_line(exc, ckpt / "config.json")


@pytest.mark.parametrize("kind", ["mamba", "gpt2"])
def test_config_shapes_do_not_match_the_weights(tmp_path, small_tokenizer, kind):
    ckpt = _save(tmp_path / kind, small_tokenizer, kind)
    _edit_config(ckpt, vocab_size=len(small_tokenizer) + 8)
    with pytest.raises(ValueError, match="do not match") as exc:
        load_model(str(ckpt), device="cpu")
    message = _one_line(exc, ckpt / "model.safetensors", ckpt / "config.json")
    want = [len(small_tokenizer), 16], [len(small_tokenizer) + 8, 16]
    assert re.search(rf"has shape {re.escape(str(want[0]))} in the weights but {re.escape(str(want[1]))}", message)


def test_config_needs_weights_the_checkpoint_lacks(ckpt):
    _edit_config(ckpt, num_hidden_layers=3)  # layer 2 would be left randomly initialised
    with pytest.raises(ValueError, match=r"weight\(s\) the config needs are missing \(backbone\.layers\.2\.") as exc:
        load_model(str(ckpt), device="cpu")
    assert "use the config.json saved with these weights" in _one_line(exc, ckpt / "config.json")


def test_unused_weights_are_named_in_a_warning(ckpt):
    _edit_config(ckpt, num_hidden_layers=1)
    with pytest.warns(UserWarning, match=r"does not use, ignored \(backbone\.layers\.1\."):
        model, _ = load_model(str(ckpt), device="cpu")
    assert len(model.backbone.layers) == 1


def test_bad_tokenizer_directory(tmp_path, ckpt):
    with pytest.raises(FileNotFoundError, match=r"tokenizer directory .* does not exist") as exc:
        load_tokenizer(tmp_path / "nowhere")
    _one_line(exc, tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no tokenizer files in tokenizer directory") as exc:
        load_tokenizer(empty)
    _one_line(exc, empty)
    (ckpt / "tokenizer.json").write_bytes(random.Random(1).randbytes(64))
    with pytest.raises(ValueError, match="no usable tokenizer in tokenizer directory") as exc:
        load_tokenizer(ckpt)
    _one_line(exc, ckpt)
    assert len(load_tokenizer("tiny-mamba")) == 4096


def test_train_tiny_refuses_a_bad_tokenizer_directory(tmp_path):
    (tmp_path / "tok").mkdir()
    with pytest.raises(ValueError, match="no tokenizer files in tokenizer directory") as exc:
        train_tiny("mamba", tmp_path / "out", steps=1, tokenizer=str(tmp_path / "tok"))
    _one_line(exc, tmp_path / "tok")
