"""Model loading, the shared tokenizer, the bundled models, and the tiny-model trainer."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from mambascope.data import load_corpus, tokenize_windows
from mambascope.models import BUNDLED, bundled_path, load_model, resolve_device, resolve_dtype, train_tokenizer
from mambascope.models.train import build_config, train_tiny, unigram_loss

ARCH_CLASS = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM", "gpt2": "GPT2LMHeadModel",
              "bamba": "BambaForCausalLM"}
BUNDLED_ARCH = {"tiny-mamba": "mamba", "tiny-mamba2": "mamba2", "tiny-gpt": "gpt2", "tiny-hybrid": "bamba"}
# The bundled task models (docs/models.md, "Task models"); each must reach 95 % held-out query accuracy.
TASK_ARCH = {"tiny-mamba-mqar": "mamba", "tiny-mamba-copy": "mamba",
             "tiny-mamba2-mqar": "mamba2", "tiny-gpt-mqar": "gpt2", "tiny-gpt-copy": "gpt2",
             "tiny-mamba2-copy": "mamba2"}
# Smallest shapes that still exercise every code path (Mamba-2: 2 heads, 1 group, chunking).
TINY = {
    "mamba": {"hidden_size": 16, "num_hidden_layers": 2, "state_size": 4},
    "mamba2": {"hidden_size": 16, "num_hidden_layers": 2, "head_dim": 16, "num_heads": 2, "state_size": 8,
               "chunk_size": 8},
    "gpt2": {"n_embd": 16, "n_layer": 2, "n_head": 2, "n_inner": 32},
    "bamba": {"hidden_size": 16, "num_hidden_layers": 2, "attn_layer_indices": [1], "mamba_n_heads": 2,
              "mamba_d_state": 8, "mamba_chunk_size": 8, "num_attention_heads": 2, "num_key_value_heads": 2,
              "intermediate_size": 16},
}


@pytest.fixture(scope="module")
def small_tokenizer() -> Any:
    return train_tokenizer(load_corpus("builtin", "validation").texts[:100], vocab_size=300)


@pytest.fixture(scope="module")
def offline(request: pytest.FixtureRequest) -> None:
    """Hub offline for the whole module, so no test waits on network retries."""
    import huggingface_hub.constants

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    request.addfinalizer(mp.undo)


# --- tokenizer -------------------------------------------------------------------------------------


def test_tokenizer_is_deterministic_byte_level_and_round_trips(small_tokenizer: Any, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    again = train_tokenizer(load_corpus("builtin", "validation").texts[:100], vocab_size=300)
    assert again.backend_tokenizer.to_str() == small_tokenizer.backend_tokenizer.to_str()
    assert len(small_tokenizer) == 300
    assert small_tokenizer.bos_token == small_tokenizer.eos_token == "<|endoftext|>"
    text = "naïve café → ✓ def f(x):\n    return x ** 2"
    ids = small_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert small_tokenizer.unk_token_id not in ids  # byte-level: nothing is unknown
    assert small_tokenizer.decode(ids) == text
    small_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert loaded.bos_token_id == small_tokenizer.bos_token_id == 0


# --- load_model ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mamba", "mamba2", "gpt2", "bamba"])
def test_load_local_checkpoint(arch: str, small_tokenizer: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config(arch, len(small_tokenizer), 0, 32, **TINY[arch]))
    model.save_pretrained(tmp_path)
    small_tokenizer.save_pretrained(tmp_path)
    loaded, tok = load_model(str(tmp_path), device="cpu")
    assert type(loaded).__name__ == ARCH_CLASS[arch]
    assert not loaded.training and next(loaded.parameters()).dtype == torch.float32
    assert tok("hello world")["input_ids"] == small_tokenizer("hello world")["input_ids"]
    x = torch.randint(0, len(small_tokenizer), (2, 12))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits)
    half, _ = load_model(str(tmp_path), device="auto", dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_unsupported_architecture_names_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"unsupported architecture 'bert'.*MambaForCausalLM.*"
                                         r"Mamba2ForCausalLM.*GPT2LMHeadModel"):
        load_model(str(tmp_path))


def test_missing_paths_and_unknown_names(tmp_path: Path, offline: None) -> None:
    bundled = "bundled models: tiny-mamba, tiny-mamba2, tiny-gpt"
    with pytest.raises(FileNotFoundError, match=f"no such directory.*{bundled}"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=f"has no config.json.*{bundled}"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match=f"did you mean 'tiny-mamba'.*{bundled}"):
        load_model("tiny-mamb")
    with pytest.raises(ValueError, match=f"Hub is offline.*{bundled}"):
        load_model("someone/not-a-local-dir")


def test_device_and_dtype_resolution() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype(None) is torch.float32
    assert resolve_dtype("float16") is torch.float16 and resolve_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8")
    with pytest.raises(ValueError, match="floating-point"):
        resolve_dtype(torch.int64)
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu0")


# --- bundled models --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUNDLED_ARCH))
def test_bundled_model_is_small_trained_and_beats_unigram(name: str) -> None:
    path = bundled_path(name)
    if not (path / "model.safetensors").is_file():
        pytest.fail(f"bundled model {name} is missing: train it with the command in docs/models.md")
    assert (path / "model.safetensors").stat().st_size <= 8 * 2**20
    stats = json.loads((path / "training.json").read_text(encoding="utf-8"))
    assert stats["arch"] == BUNDLED_ARCH[name] and stats["layers"] >= 4
    assert stats["val_loss"] <= 0.75 * stats["unigram_loss"]

    model, tok = load_model(name, device="cpu")
    assert type(model).__name__ == ARCH_CLASS[BUNDLED_ARCH[name]]
    assert sum(p.numel() for p in model.parameters()) == stats["parameters"] <= 2_000_000
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    # All three share one tokenizer.
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shared = (bundled_path("tiny-mamba") / file).read_text(encoding="utf-8")
        assert (path / file).read_text(encoding="utf-8") == shared
    # Independent check of the recorded loss on a few validation windows with the loaded weights:
    # a random model scores about ln(4096) = 8.3 nats, worse than the unigram baseline.
    val = load_corpus("builtin", "validation").texts
    windows = tokenize_windows(val, tok, 64, max_tokens=64 * 8).ids
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    train_ids = torch.tensor([i for t in load_corpus("builtin", "train").texts[:300]
                              for i in tok(t, add_special_tokens=False)["input_ids"]])
    assert float(loss) < 0.85 * unigram_loss(train_ids, windows, len(tok))


def test_every_bundled_task_model_is_checked() -> None:
    assert {n for n in BUNDLED if n.endswith(("-mqar", "-copy"))} == set(TASK_ARCH)


@pytest.mark.parametrize("name", list(TASK_ARCH))
def test_bundled_task_model_reaches_the_accuracy_bar(name: str) -> None:
    from mambascope.data.tasks import query_correct
    from mambascope.models.train_task import heldout_task_batch

    path = bundled_path(name)
    assert (path / "model.safetensors").stat().st_size < 2 * 2**20
    stats = json.loads((path / "training.json").read_text(encoding="utf-8"))
    task = name.rsplit("-", 1)[1]  # tiny-<arch>-mqar / tiny-<arch>-copy
    assert stats["arch"] == TASK_ARCH[name] and stats["task"] == task
    assert stats["seq_len"] >= 64 and stats["heldout_queries"] >= 512
    assert task == "copy" or stats["num_pairs"] >= 8
    assert stats["heldout_query_accuracy"] >= 0.95
    # Independent re-check with the loaded weights and the model's own forward on the same held-out examples.
    model, _ = load_model(name, device="cpu")
    batch = heldout_task_batch(task, stats["heldout_examples"], stats["seq_len"], stats["num_pairs"] or 8,
                               stats["seed"])
    parts = [batch.rows(slice(i, i + 128)) for i in range(0, batch.input_ids.shape[0], 128)]
    with torch.no_grad():
        correct = torch.cat([query_correct(model(input_ids=part.input_ids).logits, part) for part in parts])
    assert float(correct.double().mean()) == pytest.approx(stats["heldout_query_accuracy"], abs=1e-4)
    assert float(correct.double().mean()) >= 0.95


# --- training --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A .txt corpus of 80 built-in documents: big enough for both splits, quick to tokenize."""
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text("\n\n".join(t.replace("\n\n", "\n") for t in load_corpus("builtin", "train").texts[:80]),
                    encoding="utf-8")
    return str(path)


def _train(arch: str, out: Path, seed: int, tok: Any, corpus: str, lr: float = 1e-3) -> dict[str, Any]:
    return train_tiny(arch, out, steps=3, batch_size=2, seq_len=16, lr=lr, seed=seed, device="cpu",
                      tokenizer=tok, log=lambda _: None, max_eval_windows=4, config_overrides=TINY[arch],
                      corpus=corpus)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("arch", ["mamba", "mamba2", "gpt2", "bamba"])
def test_train_tiny_runs_saves_and_is_deterministic(
    arch: str, small_tokenizer: Any, small_corpus: str, tmp_path: Path
) -> None:
    stats = _train(arch, tmp_path / "a", 0, small_tokenizer, small_corpus)
    _train(arch, tmp_path / "b", 0, small_tokenizer, small_corpus)
    _train(arch, tmp_path / "c", 1, small_tokenizer, small_corpus)
    _train(arch, tmp_path / "z", 0, small_tokenizer, small_corpus, lr=0.0)  # the seed-0 initialisation
    a, b, c, z = (_weights(tmp_path / k) for k in "abcz")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # Training moved the weights away from the initialisation the same seed starts from.
    assert any(not torch.equal(a[k], z[k]) for k in a)

    assert {"config.json", "model.safetensors", "tokenizer.json", "training.json"} <= {
        p.name for p in (tmp_path / "a").iterdir()}
    recorded = json.loads((tmp_path / "a" / "training.json").read_text(encoding="utf-8"))
    assert recorded["val_loss"] == stats["val_loss"] > 0 and recorded["steps"] == 3 and recorded["seed"] == 0
    assert recorded["parameters"] == sum(t.numel() for t in a.values())
    model, _ = load_model(str(tmp_path / "a"), device="cpu")
    assert type(model).__name__ == ARCH_CLASS[arch]


def test_mamba1_training_forward_matches_transformers_fallback(small_tokenizer: Any) -> None:
    """The swapped scan changes speed only: the HF training-mode loss and gradients agree to fp32 rounding.

    The swapped scan sums in a different order than transformers' loop, so the last bits may differ: each
    gradient is a float32 sum over b·L = 32 positions of products along ≤ L + N + 8 rounded operations per
    layer, so its rounding is below (b·L + 2·(L + N + 8))·ε₃₂ of its magnitude (max |·|; seen: ≤ 5 ε).
    """
    from transformers import AutoModelForCausalLM

    from mambascope.models.train import _training_scan

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config("mamba", 300, 0, 16, **TINY["mamba"])).train()
    x = torch.randint(0, 300, (2, 16))
    losses, grads = [], []
    for patched in (False, True):
        model.zero_grad()
        if patched:
            with _training_scan("mamba"):
                loss = model(input_ids=x, labels=x).loss
        else:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    eps = torch.finfo(torch.float32).eps
    b, L, N = 2, 16, TINY["mamba"]["state_size"]
    assert float((losses[0] - losses[1]).abs()) <= (L + N + 8) * eps * float(losses[0])
    for a, c in zip(grads[1], grads[0], strict=True):
        assert float((a - c).abs().max()) <= (b * L + 2 * (L + N + 8)) * eps * float(c.abs().max())


def test_train_tiny_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown architecture 'rwkv'.*mamba, mamba2, gpt2"):
        train_tiny("rwkv", tmp_path, steps=1)
    with pytest.raises(ValueError, match="steps must be positive"):
        train_tiny("gpt2", tmp_path, steps=0)


class _RecordingModel(nn.Module):
    """Stands in for a causal LM in ``_train_loop``: records every batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        self.seen.append(input_ids.clone())
        return SimpleNamespace(loss=(self.w ** 2).sum() + 1.0)


def test_train_loop_uses_every_full_batch_of_an_epoch() -> None:
    """21 windows of 8 tokens, batch 4: 5 full batches per epoch (whatever the start offset), all of them
    used before the next epoch starts, each window once (the old loop restarted with 3 batches left)."""
    from mambascope.models.train import _train_loop

    seq_len, batch_size = 8, 4
    stream = torch.arange(21 * seq_len)
    model = _RecordingModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    curve: list[dict[str, float]] = []
    _train_loop(model, opt, sched, stream, torch.Generator().manual_seed(0), torch.device("cpu"), steps=5,
                batch_size=batch_size, seq_len=seq_len, arch="gpt2", log=lambda _: None, curve=curve)
    assert curve[-1]["epoch"] == 1
    starts = torch.cat([b[:, 0] for b in model.seen])
    assert starts.numel() == 20 and starts.unique().numel() == 20  # 20 distinct windows, none repeated
    assert bool(((starts - starts[0]) % seq_len == 0).all())  # one epoch: one offset
    _train_loop(model, opt, sched, stream, torch.Generator().manual_seed(0), torch.device("cpu"), steps=6,
                batch_size=batch_size, seq_len=seq_len, arch="gpt2", log=lambda _: None, curve=curve)
    assert curve[-1]["epoch"] == 2  # the sixth batch starts the second epoch


# --- task-model training curricula ----------------------------------------------------------------


def test_mixed_pair_batches_hold_every_pair_count_and_keep_the_plain_stream() -> None:
    from mambascope.data.tasks import IGNORE, generate
    from mambascope.models.train_task import training_batch

    plain = training_batch("mqar", 6, 64, 8, seed=3, step=5)
    assert torch.equal(plain.input_ids, generate("mqar", 6, 64, num_pairs=8, seed=3_000_005).input_ids)
    mixed = training_batch("mqar", 10, 64, 8, seed=3, step=5, min_pairs=5)  # groups of 3, 3, 2, 2 rows
    # Each example's trained positions are its queries: one per pair.
    per_row = (mixed.labels != IGNORE).sum(1).tolist()
    assert per_row == [5, 5, 5, 6, 6, 6, 7, 7, 8, 8]
    # The 8-pair group is its own seeded draw (not a slice of the plain batch), and the same call repeats.
    assert torch.equal(mixed.input_ids[8:], generate("mqar", 2, 64, num_pairs=8, seed=3_000_005 * 64 + 3).input_ids)
    assert torch.equal(mixed.labels, training_batch("mqar", 10, 64, 8, seed=3, step=5, min_pairs=5).labels)


def test_growing_curriculum_adds_a_pair_only_after_a_learnt_window() -> None:
    from mambascope.data.tasks import IGNORE
    from mambascope.models.train_task import GROW_LOSS, GROW_WINDOW, PairCurriculum

    pairs = PairCurriculum("grow", num_pairs=4, min_pairs=2)
    for step in range(GROW_WINDOW):
        pairs.update(step, 10.0)  # not learnt: stays at 2 (and 10 nats keeps any window holding it above)
    assert pairs.current == 2
    for step in range(GROW_WINDOW, 3 * GROW_WINDOW):
        pairs.update(step, GROW_LOSS / 2)
    assert pairs.current == 4 and pairs.reached == {2: 0, 3: 2 * GROW_WINDOW, 4: 3 * GROW_WINDOW}
    batch = pairs.batch("mqar", 3, 64, seed=0, step=0, min_pairs=2)
    assert (batch.labels != IGNORE).sum(1).tolist() == [4, 4, 4]
    assert PairCurriculum("mix", num_pairs=8, min_pairs=8).kind is None  # nothing to mix
    with pytest.raises(ValueError, match="unknown curriculum"):
        PairCurriculum("shuffle", num_pairs=8, min_pairs=2)


def test_reference_mixer_init_redraws_only_the_input_projections() -> None:
    from transformers import AutoModelForCausalLM

    from mambascope.models.train_task import reference_mixer_init

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config("mamba", 35, 0, 64, hidden_size=64, num_hidden_layers=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = reference_mixer_init(model)
    assert names == [f"backbone.layers.{i}.mixer.{p}" for i in range(2) for p in ("in_proj", "x_proj")]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"{n}.weight" for n in names}
    in_proj = model.backbone.layers[0].mixer.in_proj.weight.detach()
    # nn.Linear's default: uniform on ±1/sqrt(fan_in) (std 1/sqrt(3·fan_in)), not N(0, 0.02).
    assert float(in_proj.abs().max()) <= 64 ** -0.5
    assert float(in_proj.std()) == pytest.approx((3 * 64) ** -0.5, rel=0.05)
    with pytest.raises(ValueError, match="no Mamba mixer"):
        reference_mixer_init(AutoModelForCausalLM.from_config(build_config("gpt2", 35, 0, 64, **TINY["gpt2"])))


def test_sinusoidal_position_init_makes_a_shift_one_linear_map() -> None:
    from transformers import AutoModelForCausalLM

    from mambascope.models.train_task import sinusoidal_position_init

    model = AutoModelForCausalLM.from_config(build_config("gpt2", 35, 0, 64, n_embd=32, n_layer=1, n_head=2))
    sinusoidal_position_init(model)
    wpe = model.transformer.wpe.weight.detach().double()
    assert torch.allclose(wpe.norm(dim=1), torch.full((64,), 0.02 * 32 ** 0.5, dtype=torch.float64), rtol=1e-5)
    # The defining property: one matrix maps every position's embedding to the previous position's.
    shift = torch.linalg.lstsq(wpe[1:], wpe[:-1]).solution
    assert torch.allclose(wpe[1:] @ shift, wpe[:-1], atol=1e-5)
    assert torch.allclose(wpe[1::2, 0] / wpe[1::2, 1], torch.tan(torch.arange(1, 64, 2, dtype=torch.float64)))


def test_mqar_with_more_queries_asks_every_key_evenly_and_keeps_the_default_stream() -> None:
    from mambascope.data.tasks import IGNORE, generate

    default = generate("mqar", 8, 64, num_pairs=8, seed=11)
    same = generate("mqar", 8, 64, num_pairs=8, seed=11, num_queries=8)
    assert all(torch.equal(getattr(default, f), getattr(same, f)) for f in ("input_ids", "labels", "query", "key_pos"))
    dense = generate("mqar", 8, 64, num_pairs=3, seed=11, num_queries=16)
    rows = torch.arange(8)[:, None]
    # Every answer is the value right after the queried key in the pairs; the input after a query is filler.
    assert torch.equal(dense.input_ids[rows, dense.query], dense.input_ids[rows, dense.key_pos])
    assert torch.equal(dense.labels[rows, dense.query + 1], dense.input_ids[rows, dense.key_pos + 1])
    assert bool((dense.input_ids[rows, dense.query + 1] == 1).all()) and int((dense.labels != IGNORE).sum()) == 8 * 16
    counts = torch.stack([(dense.key_pos == p).sum(1) for p in (1, 3, 5)], 1)
    assert bool(((counts == 5) | (counts == 6)).all()) and bool((counts.sum(1) == 16).all())
    with pytest.raises(ValueError, match="too short for 8 pairs and 24 queries"):
        generate("mqar", 1, 64, num_pairs=8, num_queries=24)
    with pytest.raises(ValueError, match="at least num_pairs"):
        generate("mqar", 1, 64, num_pairs=8, num_queries=4)


def test_unit_decay_init_sets_only_mamba1_decays() -> None:
    from transformers import AutoModelForCausalLM

    from mambascope.models.train_task import unit_decay_init

    model = AutoModelForCausalLM.from_config(build_config("mamba", 35, 0, 64, **TINY["mamba"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert unit_decay_init(model) == 2
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"backbone.layers.{i}.mixer.A_log" for i in range(2)}
    assert bool((-torch.exp(model.backbone.layers[0].mixer.A_log) == -1).all())
    with pytest.raises(ValueError, match="no Mamba-1 mixer"):
        unit_decay_init(AutoModelForCausalLM.from_config(build_config("mamba2", 35, 0, 64, **TINY["mamba2"])))


def test_train_tiny_shape_flag_and_unknown_config_fields(tmp_path: Path) -> None:
    from mambascope.cli import _shape_overrides
    from mambascope.models.train_task import train_task

    assert _shape_overrides(["n_embd=128", "initializer_range=0.06"]) == {"n_embd": 128, "initializer_range": 0.06}
    assert _shape_overrides(None) == {}
    for bad in ("n_embd", "n_embd=wide"):
        with pytest.raises(ValueError, match="expected KEY=NUMBER"):
            _shape_overrides([bad])
    with pytest.raises(ValueError, match=r"unknown GPT2Config fields \['n_embed'\]"):
        train_task("gpt2", "mqar", tmp_path, steps=1, config_overrides={"n_embed": 32}, log=lambda _: None)
    with pytest.raises(ValueError, match="train_queries applies to task mqar only"):
        train_task("gpt2", "copy", tmp_path, steps=1, train_queries=16, log=lambda _: None)


@pytest.mark.parametrize("name", list(TASK_ARCH))
def test_attention_task_runs_on_every_bundled_task_model(name: str, tmp_path: Path) -> None:
    """``mambascope attention --model NAME --task TASK`` scores the bundled model against its task's ground truth,
    the default whole-model methods (lrp, gradient × input) included."""
    from mambascope.cli import main

    task = name.rsplit("-", 1)[1]
    code = main(["attention", "--model", name, "--task", task, "--queries", "8", "--methods", "attention_weighted",
                 "--no-report", "--device", "cpu", "--out", str(tmp_path / "gt")])
    assert code == 0
    truth = json.loads((tmp_path / "gt" / "results.json").read_text())["ground_truth"]
    assert truth["task"] == task and truth["n_queries"] == 8 and not truth["errors"]
    # with the default whole-model methods, one row each (layer None)
    assert {r["method"] for r in truth["rows"]} == {"random", "recency", "attention_weighted", "lrp",
                                                    "gradient_x_input"}


def test_task_training_checkpoints_and_stops_at_the_bar(tmp_path: Path) -> None:
    """Each evaluation saves a loadable checkpoint (training.json: not complete, steps done); ``stop_at`` ends
    training at the first evaluation that reaches it, and the saved model is the one evaluated."""
    from mambascope.models import load_model
    from mambascope.models.train_task import heldout_task_batch, task_accuracy, train_task

    shape = {"n_embd": 16, "n_layer": 1, "n_head": 2, "n_inner": 32}
    seen: list[dict] = []

    def log(line: str) -> None:  # the checkpoint of each evaluation is on disk when the next step logs
        if (tmp_path / "m" / "training.json").is_file():
            seen.append(json.loads((tmp_path / "m" / "training.json").read_text()))

    stats = train_task("gpt2", "mqar", tmp_path / "m", steps=6, batch_size=4, eval_examples=8, eval_every=2,
                       device="cpu", config_overrides=shape, log=log)
    partial = [s for s in seen if not s["complete"]]
    assert [s["steps_done"] for s in partial][:1] == [2] and partial[-1]["steps_done"] == 4
    assert stats["complete"] and stats["steps_done"] == 6 and stats["stopped_at_step"] is None
    # the same run with the bar at its first evaluation's accuracy (above 0 for this seed) stops there
    bar = next(e["heldout_query_accuracy"] for e in stats["curve"] if "heldout_query_accuracy" in e)
    assert bar > 0
    stopped = train_task("gpt2", "mqar", tmp_path / "s", steps=6, batch_size=4, eval_examples=8, eval_every=2,
                         device="cpu", config_overrides=shape, stop_at=bar, log=lambda _: None)
    assert stopped["stopped_at_step"] == 2 and stopped["steps_done"] == 2 and stopped["complete"]
    model, _ = load_model(str(tmp_path / "s"), device="cpu")
    heldout = heldout_task_batch("mqar", 8, 64, 8, 0)
    assert round(task_accuracy(model, heldout), 4) == stopped["heldout_query_accuracy"]
