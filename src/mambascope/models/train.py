"""Train the bundled tiny models (docs/design.md §7) with the models' own Hugging Face forward.

Data: the built-in corpus (``load_corpus("builtin")``). Each split becomes one token stream, every
document preceded by ``<|endoftext|>``; the train stream is cut into non-overlapping windows of
``seq_len`` tokens, shuffled each epoch, with a fresh random start offset in ``[0, seq_len)`` each epoch
so that a small corpus is not seen in the same windows every time. Everything random comes from
``seed`` (model init via ``torch.manual_seed``, data order via a separate seeded generator), so the
same seed on the same machine and thread count gives the same weights.

Mamba-1 on CPU: without ``mamba_ssm`` the Hugging Face training path calls ``mamba_inner_fn``, which
returns None, and falls back to the reference scan ``mamba_selective_scan``. That fallback is correct,
but its loop reads ``discrete_A[:, :, i]``: the gradient of each such slice is a full-size tensor, so the
backward pass moves O(L^2) memory (about 50 s per step at batch 8 x 256 tokens on a laptop-class CPU),
and even read with ``unbind`` it is one autograd node per position.  For the training loop only,
``train_tiny`` and ``train_task`` swap in ``hf_selective_scan``: the same signature, computed by the
project's scan (``ssm/s6_scan.py``: one sequential loop forward, one backward, gradients in closed form),
equal to the reference to fp32 rounding (``tests/test_scan_fast.py``) and several times faster
(``benchmarks/bench_train.py``).  Evaluation and everything after training use the unmodified Hugging
Face code.

Evaluation: the validation stream is cut into windows of ``seq_len`` from offset 0 (the last partial
window is dropped). The held-out loss is the mean next-token cross-entropy in nats over every
predicted position (positions 1..seq_len-1 of every window). The unigram baseline is scored on exactly
the same target tokens, with probabilities fitted on the train stream's token counts with add-one
(Laplace) smoothing over the whole vocabulary: ``p(w) = (count(w) + 1) / (N + V)``.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mambascope.data.corpus import load_corpus
from mambascope.models.loading import load_tokenizer, resolve_device
from mambascope.models.tokenizer import train_tokenizer
from mambascope.ssm.scan import selective_scan

ARCHS = ("mamba", "mamba2", "gpt2", "bamba")

# The bundled models' shapes: d_model 128, 4 layers, ~1M parameters each with tied 4096 x 128 embeddings.
DEFAULT_SHAPES: dict[str, dict[str, Any]] = {
    "mamba": {"hidden_size": 128, "num_hidden_layers": 4, "expand": 2, "state_size": 16, "conv_kernel": 4},
    "mamba2": {"hidden_size": 128, "num_hidden_layers": 4, "expand": 2, "head_dim": 32, "num_heads": 8,
               "state_size": 32, "n_groups": 1, "chunk_size": 64, "conv_kernel": 4},
    # n_inner 256 (2 x d_model, not the usual 4x) keeps the parameter count near the Mamba models'.
    "gpt2": {"n_embd": 128, "n_layer": 4, "n_head": 4, "n_inner": 256},
    # A Bamba hybrid: Mamba-2 mixers as tiny-mamba2's and one attention layer (layer 2), each followed
    # by a SwiGLU MLP of width d_model (kept narrow so the parameter count stays near the others').
    "bamba": {"hidden_size": 128, "num_hidden_layers": 4, "attn_layer_indices": [2], "mamba_expand": 2,
              "mamba_n_heads": 8, "mamba_d_state": 32, "mamba_n_groups": 1, "mamba_chunk_size": 64,
              "mamba_d_conv": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 128},
}


def build_config(arch: str, vocab_size: int, special_id: int, seq_len: int, **overrides: Any) -> Any:
    """A ``transformers`` config for ``arch`` with the default tiny shape, updated by ``overrides``."""
    from transformers import BambaConfig, GPT2Config, Mamba2Config, MambaConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHS)}")
    # initializer_range (std of the N(0, σ) weight init) may be overridden like any shape field.
    shape = {"initializer_range": 0.02, **DEFAULT_SHAPES[arch], **overrides}
    ids = {"bos_token_id": special_id, "eos_token_id": special_id, "pad_token_id": special_id}
    if arch == "mamba":
        return MambaConfig(vocab_size=vocab_size, tie_word_embeddings=True, **ids, **shape)
    if arch == "mamba2":
        return Mamba2Config(vocab_size=vocab_size, tie_word_embeddings=True, **ids, **shape)
    if arch == "bamba":
        return BambaConfig(vocab_size=vocab_size, tie_word_embeddings=True, **ids, **shape)
    # GPT-2 has learned absolute positions: the context is the training length, so longer inputs fail
    # loudly (index error) rather than running on untrained position embeddings.
    shape.setdefault("n_positions", seq_len)
    return GPT2Config(vocab_size=vocab_size, tie_word_embeddings=True,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids, **shape)


def hf_selective_scan(
    hidden_states: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    **kwargs: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``transformers``' Mamba-1 ``mamba_selective_scan``, computed by :func:`mambascope.ssm.selective_scan`.

    Same signature and result as the reference (equal to fp32 rounding, ``tests/test_scan_fast.py``); the
    scan itself is the sequential recurrence with a hand-written O(L) backward (``ssm/s6_scan.py``).
    Shapes as in ``transformers``: hidden_states, dt, z ``[b, E, L]``; A ``[E, N]``; B, C ``[b, N, L]``.
    """
    input_dtype = hidden_states.dtype
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = nn.functional.softplus(dt)
    u = hidden_states.float()
    y, last = selective_scan(u.transpose(1, 2), dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
                             return_state=True)
    scan_output = y.transpose(1, 2).to(input_dtype)
    if D is not None:
        scan_output = scan_output + hidden_states * D[None, :, None]
    if z is not None:
        scan_output = scan_output * nn.functional.silu(z)
    if return_last_state:
        return scan_output, last
    return scan_output


@contextlib.contextmanager
def _training_scan(arch: str) -> Iterator[None]:
    """Use ``hf_selective_scan`` inside Mamba-1 mixers while training (see the module docstring)."""
    if arch != "mamba":
        yield
        return
    from transformers.models.mamba import modeling_mamba

    original = modeling_mamba.mamba_selective_scan
    modeling_mamba.mamba_selective_scan = hf_selective_scan
    try:
        yield
    finally:
        modeling_mamba.mamba_selective_scan = original


def _stream(texts: list[str], tokenizer: Any, sep_id: int) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids.append(sep_id)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No decay on biases, norms, and the SSM's A_log / D (decaying A_log would push A towards -1;
    # the Mamba reference code excludes them the same way).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.dim() < 2 or leaf in ("A_log", "D", "dt_bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def optimizer_step(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, input_ids: torch.Tensor,
                   labels: torch.Tensor) -> float:
    """One step of next-token training (gradients clipped to norm 1); the step's loss."""
    loss = model(input_ids=input_ids, labels=labels).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return loss.item()


def _lr_factor(step: int, steps: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token) over every predicted position of ``windows``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        total += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             reduction="sum").item()
        count += targets.numel()
    model.train(was_training)
    return total / count


def unigram_loss(train_stream: torch.Tensor, windows: torch.Tensor, vocab_size: int) -> float:
    """Add-one smoothed unigram cross-entropy (nats/token) on the targets that ``evaluate`` scores."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[windows[:, 1:].reshape(-1)].mean())


def _load_tokenizer(tokenizer: Any, train_texts: list[str], vocab_size: int, seed: int) -> Any:
    if tokenizer is None:
        return train_tokenizer(train_texts, vocab_size=vocab_size, seed=seed)
    if isinstance(tokenizer, (str, Path)):
        tok = load_tokenizer(tokenizer)  # a bad directory: one error naming it and the fix
        # from_pretrained records how it was loaded; saved again, these would pin the copy to local files.
        for key in ("is_local", "local_files_only"):
            tok.init_kwargs.pop(key, None)
        return tok
    return tokenizer


def _epoch_batches(stream: torch.Tensor, seq_len: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch's full batches [batch_size, seq_len]: a fresh offset and order, both from ``gen``."""
    offset = int(torch.randint(0, seq_len, (1,), generator=gen))
    n_win = (stream.numel() - offset) // seq_len
    windows = stream[offset: offset + n_win * seq_len].view(n_win, seq_len)
    perm = torch.randperm(n_win, generator=gen)
    return [b for b in windows[perm].split(batch_size) if b.shape[0] == batch_size]


def _train_loop(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, train_stream: torch.Tensor,
                gen: torch.Generator, dev: torch.device, *, steps: int, batch_size: int, seq_len: int,
                arch: str, log: Callable[[str], None], curve: list[dict[str, float]]) -> None:
    order: list[torch.Tensor] = []
    epoch = 0
    log_every = max(1, steps // 40)
    running = 0.0
    t_train = time.perf_counter()
    for step in range(steps):
        if not order:  # every full batch of the epoch has been used
            order = _epoch_batches(train_stream, seq_len, batch_size, gen)
            epoch += 1
        batch = order.pop(0).to(dev)
        running += optimizer_step(model, opt, sched, batch, batch)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            curve.append({"step": step + 1, "epoch": epoch, "train_loss": round(running / n, 4)})
            log(f"[{arch}] step {step + 1}/{steps} epoch {epoch} loss {running / n:.3f} "
                f"lr {sched.get_last_lr()[0]:.2e} {time.perf_counter() - t_train:.0f}s")
            running = 0.0


def train_tiny(
    arch: str,
    out_dir: str | Path,
    *,
    steps: int = 700,
    batch_size: int = 8,
    seq_len: int = 128,
    lr: float = 4e-3,
    seed: int = 0,
    device: str = "auto",
    tokenizer: Any = None,
    log: Callable[[str], None] = print,
    vocab_size: int = 4096,
    warmup: int | None = None,
    weight_decay: float = 0.1,
    max_eval_windows: int | None = None,
    config_overrides: dict[str, Any] | None = None,
    corpus: str = "builtin",
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Train a tiny ``arch`` model ("mamba", "mamba2" or "gpt2") on the built-in corpus; save it to ``out_dir``.

    ``tokenizer``: ``None`` trains the shared byte-level BPE (``vocab_size``) on the train split; a
    path or tokenizer object reuses one (the bundled models share the tokenizer of the first).
    ``warmup`` defaults to 5 % of ``steps``. ``config_overrides`` change the default shape
    (``DEFAULT_SHAPES``), e.g. ``{"hidden_size": 32, "num_hidden_layers": 1}`` for tests.
    ``max_eval_windows`` caps the validation windows (tests); ``None`` scores the whole split.
    ``num_threads`` sets ``torch.set_num_threads`` for the run (``None`` keeps torch's default). On a CPU
    shared with other jobs, 1 thread trained the bundled Mamba-1 about 4x faster than 2: with more
    threads than free cores each parallel region waits for a preempted thread.
    ``corpus`` is any ``load_corpus`` spec with train and validation splits (default: the built-in one).
    Writes the HF model, the tokenizer and ``training.json`` into ``out_dir`` and returns the stats.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHS)}")
    for label, value in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len)):
        if value < 1:
            raise ValueError(f"{label} must be positive, got {value}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 to predict anything, got {seq_len}")
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train_tiny(arch, Path(out_dir), steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                           seed=seed, device=device, tokenizer=tokenizer, log=log, vocab_size=vocab_size,
                           warmup=warmup, weight_decay=weight_decay, max_eval_windows=max_eval_windows,
                           config_overrides=config_overrides, corpus=corpus)
    finally:
        torch.set_num_threads(previous_threads)


def _train_tiny(arch: str, out: Path, *, steps: int, batch_size: int, seq_len: int, lr: float, seed: int,
                device: str, tokenizer: Any, log: Callable[[str], None], vocab_size: int, warmup: int | None,
                weight_decay: float, max_eval_windows: int | None, config_overrides: dict[str, Any] | None,
                corpus: str) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    t_start = time.perf_counter()

    train_texts = load_corpus(corpus, "train").texts
    val_texts = load_corpus(corpus, "validation").texts
    tok = _load_tokenizer(tokenizer, train_texts, vocab_size, seed)
    sep = tok.eos_token_id
    if sep is None:
        raise ValueError("the tokenizer has no EOS token to separate documents")
    train_stream = _stream(train_texts, tok, sep)
    val_stream = _stream(val_texts, tok, sep)
    n_val = val_stream.numel() // seq_len
    # One window more than a batch, so that a batch still fits after any epoch's start offset.
    if train_stream.numel() < (batch_size + 1) * seq_len or n_val < 1:
        raise ValueError(f"corpus {corpus!r} is too small for batch_size {batch_size} x seq_len {seq_len}: "
                         f"it has {train_stream.numel()} train and {val_stream.numel()} validation tokens")
    val_windows = val_stream[: n_val * seq_len].view(n_val, seq_len)
    if max_eval_windows is not None:
        val_windows = val_windows[:max_eval_windows]

    config = build_config(arch, len(tok), sep, seq_len, **(config_overrides or {}))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dev)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    warmup = max(1, steps // 20) if warmup is None else max(1, warmup)
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, warmup))
    log(f"[{arch}] {n_params:,} parameters; train {train_stream.numel():,} tokens, "
        f"validation {val_windows.numel():,} tokens; device {dev}")

    gen = torch.Generator().manual_seed(seed)
    curve: list[dict[str, float]] = []
    t_train = time.perf_counter()
    with _training_scan(arch):
        _train_loop(model, opt, sched, train_stream, gen, dev, steps=steps, batch_size=batch_size,
                    seq_len=seq_len, arch=arch, log=log, curve=curve)
    train_time = time.perf_counter() - t_train
    epoch = curve[-1]["epoch"] if curve else 0

    val = evaluate(model, val_windows, dev)
    uni = unigram_loss(train_stream, val_windows, len(tok))
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    import tokenizers
    import transformers

    stats: dict[str, Any] = {
        "arch": arch,
        "model_class": type(model).__name__,
        "parameters": n_params,
        "layers": config.num_hidden_layers if arch != "gpt2" else config.n_layer,
        "d_model": config.hidden_size if arch != "gpt2" else config.n_embd,
        "vocab_size": len(tok),
        "steps": steps,
        "epochs_started": epoch,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lr": lr,
        "warmup": warmup,
        "weight_decay": weight_decay,
        "seed": seed,
        "device": str(dev) if dev.type != "cuda" else f"cuda ({torch.cuda.get_device_name(dev)})",
        "torch_threads": torch.get_num_threads(),
        "train_time_s": round(train_time, 1),
        "wall_time_s": round(time.perf_counter() - t_start, 1),
        "corpus": corpus,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "train_tokens": int(train_stream.numel()),
        "val_tokens_scored": int(val_windows[:, 1:].numel()),
        "val_loss": round(val, 4),
        "unigram_loss": round(uni, 4),
        "ratio": round(val / uni, 4),
        "loss_definition": "mean next-token cross-entropy, nats/token, validation split",
        "unigram_definition": "train-split token counts, add-one smoothing over the vocabulary",
        "curve": curve,
    }
    (out / "training.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    log(f"[{arch}] val loss {val:.4f} nats/token, unigram {uni:.4f}, ratio {val / uni:.3f}")  # the CLI says where
    return stats
