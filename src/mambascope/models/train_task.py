"""Train tiny models on the synthetic tasks of :mod:`mambascope.data.tasks` (MQAR, copy).

Each step draws a fresh batch from one seeded generator stream (example seeds ``seed·10⁶ + step``), so
the model never sees an example twice; the held-out set is drawn from seed ``seed·10⁶ − 1 − i`` streams, disjoint
from every training seed.  Only the query positions are trained (labels elsewhere are ignored), the loss
is Hugging Face's causal-LM cross-entropy.  Query accuracy: the share of held-out queries whose argmax
prediction is the answer.  Optimiser, schedule, parameter groups and the Mamba-1 training scan are those
of :func:`mambascope.models.train.train_tiny`.  The task's word-level tokenizer is saved with the model,
so the checkpoint loads with ``load_model(path)`` like any other.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mambascope.data.tasks import TaskBatch, generate, query_correct, task_tokenizer
from mambascope.models.loading import resolve_device
from mambascope.models.train import ARCHS, _lr_factor, _param_groups, _training_scan, build_config, optimizer_step

# d_model 64, 2 layers: enough for MQAR at 8 pairs / 64 tokens, each model far under 2 MB.
TASK_SHAPES: dict[str, dict[str, Any]] = {
    "mamba": {"hidden_size": 64, "num_hidden_layers": 2, "expand": 2, "state_size": 16, "conv_kernel": 4},
    "mamba2": {"hidden_size": 64, "num_hidden_layers": 2, "expand": 2, "head_dim": 16, "num_heads": 8,
               "state_size": 16, "n_groups": 1, "chunk_size": 64, "conv_kernel": 4},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 128},
}

__all__ = ["TASK_SHAPES", "PairCurriculum", "heldout_task_batch", "reference_mixer_init",
           "sinusoidal_position_init", "task_accuracy", "train_task", "training_batch",
           "unit_decay_init"]


def heldout_task_batch(task: str, n: int, seq_len: int, num_pairs: int, seed: int) -> TaskBatch:
    """The held-out examples for a model trained with ``seed`` (a seed no training step uses)."""
    return generate(task, n, seq_len, num_pairs=num_pairs, seed=seed * 1_000_000 - 1)


@torch.no_grad()
def task_accuracy(model: nn.Module, batch: TaskBatch, batch_size: int = 256) -> float:
    """Share of ``batch``'s queries whose argmax next-token prediction is the answer (model's own forward)."""
    was_training = model.training
    model.eval()
    dev = model.get_input_embeddings().weight.device
    correct = 0
    for start in range(0, batch.input_ids.shape[0], batch_size):
        part = batch.rows(slice(start, start + batch_size))
        correct += int(query_correct(model(input_ids=part.input_ids.to(dev)).logits, part).sum())
    model.train(was_training)
    return correct / batch.num_queries


def training_batch(task: str, batch_size: int, seq_len: int, num_pairs: int, seed: int, step: int,
                   min_pairs: int | None = None, num_queries: int | None = None) -> TaskBatch:
    """Training step ``step``'s examples (seed ``seed·10⁶ + step``).

    ``min_pairs`` (MQAR only, a curriculum by mixing): the batch is split into equal groups with
    ``min_pairs … num_pairs`` pairs (the first groups one example larger when it does not divide), group
    ``g`` drawn from seed ``(seed·10⁶ + step)·64 + g``; with ``None`` every example has ``num_pairs``.
    Fewer pairs give the recall circuit an easier signal early on (Zoology trains on mixed sizes too);
    the held-out set keeps ``num_pairs``.  ``num_queries`` (MQAR): queries per training example
    (``generate``; default one per pair).
    """
    step_seed = seed * 1_000_000 + step
    if min_pairs is None or min_pairs == num_pairs:
        return generate(task, batch_size, seq_len, num_pairs=num_pairs, seed=step_seed, num_queries=num_queries)
    sizes = range(min_pairs, num_pairs + 1)
    counts = [batch_size // len(sizes) + (g < batch_size % len(sizes)) for g in range(len(sizes))]
    parts = [generate(task, n, seq_len, num_pairs=d, seed=step_seed * 64 + g, num_queries=num_queries)
             for g, (d, n) in enumerate(zip(sizes, counts, strict=True)) if n]
    # Queries differ in number across groups; training needs only inputs and labels (the rest stays empty).
    empty = torch.empty(0, 0, dtype=torch.long)
    return TaskBatch(task, torch.cat([p.input_ids for p in parts]), torch.cat([p.labels for p in parts]),
                     empty, empty, empty, empty)


GROW_WINDOW, GROW_LOSS = 50, 0.15  # "grow": one pair more once the last 50 steps' mean loss is under 0.15 nats


class PairCurriculum:
    """The pair counts of each training step (MQAR).

    ``"mix"``: every batch mixes ``min_pairs … num_pairs`` pairs (:func:`training_batch`).  ``"grow"``: every
    example has the current count, which starts at ``min_pairs`` and rises by one once the mean training
    loss of the last ``GROW_WINDOW`` steps at that count is below ``GROW_LOSS`` nats, up to ``num_pairs``
    (the count only depends on the losses, so a run is as reproducible as its losses).
    """

    def __init__(self, kind: str | None, num_pairs: int, min_pairs: int | None) -> None:
        if kind not in (None, "mix", "grow"):
            raise ValueError(f"unknown curriculum {kind!r}: choose mix or grow")
        self.kind = kind if min_pairs is not None and min_pairs < num_pairs else None
        self.num_pairs = num_pairs
        self.current = min_pairs if self.kind == "grow" else num_pairs
        self.reached: dict[int, int] = {self.current: 0}  # pair count -> first step trained at it
        self._losses: list[float] = []

    def batch(self, task: str, batch_size: int, seq_len: int, seed: int, step: int, min_pairs: int | None,
              num_queries: int | None = None) -> TaskBatch:
        mix = min_pairs if self.kind == "mix" else None
        return training_batch(task, batch_size, seq_len, self.current, seed, step, mix, num_queries)

    def update(self, step: int, loss: float) -> None:
        """Record step ``step``'s loss; raise the pair count when the stage is learnt (``"grow"``)."""
        if self.kind != "grow" or self.current == self.num_pairs:
            return
        self._losses.append(loss)
        if len(self._losses) >= GROW_WINDOW and sum(self._losses[-GROW_WINDOW:]) / GROW_WINDOW < GROW_LOSS:
            self.current += 1
            self.reached[self.current] = step + 1
            self._losses = []


def reference_mixer_init(model: nn.Module) -> list[str]:
    """Give the Mamba mixers' input projections PyTorch's default ``nn.Linear`` init, as the reference code does.

    ``transformers`` draws every ``nn.Linear`` of a Mamba model from N(0, initializer_range = 0.02); the
    reference implementation (``mamba_ssm``'s ``Mamba``/``Mamba2`` and ``MambaLMHeadModel._init_weights``)
    keeps ``nn.Linear``'s default (Kaiming-uniform, std ≈ 1/√(3·fan_in)) for ``in_proj`` and ``x_proj`` and
    uses N(0, 0.02) only for the embedding.  At d_model 64 the 0.02 init makes B and C (and so the state
    read-out C·h) a few times smaller; with this init a Mamba-1 left chance sooner on MQAR (docs/models.md,
    runs m2 and m3).  ``dt_proj``, ``A_log``,
    ``D``, ``conv1d`` and ``out_proj`` keep their (reference-like) ``transformers`` init.
    Returns the re-initialised parameter names (the random draws come from the global torch generator).
    """
    names = []
    for name, module in model.named_modules():
        for attr in ("in_proj", "x_proj"):
            linear = getattr(module, attr, None)
            if isinstance(linear, nn.Linear) and hasattr(module, "A_log"):
                linear.reset_parameters()
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
                names.append(f"{name}.{attr}")
    if not names:
        raise ValueError(f"{type(model).__name__} has no Mamba mixer to re-initialise")
    return names


def unit_decay_init(model: nn.Module) -> int:
    """Start every Mamba-1 state dimension at A = −1 (``A_log`` = 0) instead of S4D-real A_n = −n.

    The hypothesis it tests: with S4D-real (n = 1…16) and Δ ≈ 0.01, state dimension n keeps exp(−0.01·n·t)
    of a write after t tokens, so over the ~50 tokens between a pair and its query only the first few
    dimensions remember, perhaps too few for B·C to tell the keys apart.  A = −1 everywhere gives every
    dimension the slowest S4D-real decay (Mamba-2 has one scalar A per head); A stays trainable.  In the
    runs of docs/models.md ("Task models", m8 and m9) it did not get Mamba-1 past the MQAR plateau.
    Returns the number of mixers changed.
    """
    mixers = [m for m in model.modules() if hasattr(m, "A_log") and hasattr(m, "x_proj")]
    if not mixers:
        raise ValueError(f"{type(model).__name__} has no Mamba-1 mixer (A_log and x_proj)")
    with torch.no_grad():
        for mixer in mixers:
            mixer.A_log.zero_()
    return len(mixers)


def sinusoidal_position_init(model: nn.Module) -> None:
    """Initialise GPT-2's learned position embeddings (``transformer.wpe`` [P, d]) with sinusoids.

    Row t is [sin(t·ω_i), cos(t·ω_i)]_i with ω_i = 10000^(−2i/d) (Vaswani et al. 2017, §3.5), scaled so its
    norm equals the expected norm of a N(0, initializer_range) token embedding.  A fixed offset (t → t−1)
    is then one linear map for every t, which a previous-token head (the first half of an induction
    circuit) can learn from any position; the embeddings stay trainable.
    """
    wpe = getattr(getattr(model, "transformer", None), "wpe", None)
    if not isinstance(wpe, nn.Embedding):
        raise ValueError(f"{type(model).__name__} has no learned position embedding (transformer.wpe)")
    positions, dim = wpe.weight.shape
    t = torch.arange(positions, dtype=torch.float64)[:, None]
    omega = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(t * omega)
    table[:, 1::2] = torch.cos(t * omega)
    scale = model.config.initializer_range * dim ** 0.5 / table.norm(dim=1, keepdim=True)
    with torch.no_grad():
        wpe.weight.copy_((table * scale).to(wpe.weight.dtype))


def _train_seeds(seed: int, steps: int, num_pairs: int, min_pairs: int | None) -> str:
    first, last = seed * 1_000_000, seed * 1_000_000 + steps - 1
    if min_pairs is None or min_pairs == num_pairs:
        return f"{first}..{last}"
    return f"s*64+g for s in {first}..{last}, g in 0..{num_pairs - min_pairs}"


def train_task(arch: str, task: str, out_dir: str | Path, *, seq_len: int = 64, num_pairs: int = 8,
               steps: int = 3000, batch_size: int = 64, lr: float = 3e-3, seed: int = 0, device: str = "auto",
               weight_decay: float = 0.1, warmup: int | None = None, eval_examples: int = 512,
               min_pairs: int | None = None, curriculum: str = "mix", reference_init: bool = False,
               sinusoidal_positions: bool = False, train_queries: int | None = None, unit_decay: bool = False,
               config_overrides: dict[str, Any] | None = None, num_threads: int | None = None,
               eval_every: int | None = None, stop_at: float | None = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``arch`` on ``task`` ("mqar" or "copy") and save model, tokenizer and training.json to ``out_dir``.

    Shapes: ``TASK_SHAPES[arch]`` updated by ``config_overrides`` (the shape used is saved in the
    checkpoint's config.json and in training.json).  ``min_pairs`` with ``curriculum`` "mix" or
    "grow": train on fewer pairs too (:class:`PairCurriculum`).  ``reference_init``: Mamba mixers
    initialised as the reference code does (:func:`reference_mixer_init`).  ``sinusoidal_positions``:
    GPT-2's position embeddings start as sinusoids (:func:`sinusoidal_position_init`).
    ``train_queries`` (MQAR): queries per training example (default one per pair; the held-out examples
    keep one per pair).  ``unit_decay`` (Mamba-1): every state dimension starts at A = −1
    (:func:`unit_decay_init`).  Returns the recorded stats, including
    ``heldout_query_accuracy`` on ``eval_examples`` held-out examples (always at ``num_pairs``).

    Every ``eval_every`` steps (default ``steps // 6``) the held-out accuracy is measured and the model
    saved to ``out_dir`` as a checkpoint (training.json says ``"complete": false`` and the steps done), so
    a run stopped from outside keeps its last evaluated model.  ``stop_at``: end training at the first
    evaluation whose accuracy reaches it (a complete run that did fewer than ``steps`` steps).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHS)}")
    for label, value in (("steps", steps), ("batch_size", batch_size), ("eval_examples", eval_examples),
                         ("eval_every", 1 if eval_every is None else eval_every)):
        if value < 1:
            raise ValueError(f"{label} must be positive, got {value}")
    if stop_at is not None and not 0 < stop_at <= 1:
        raise ValueError(f"stop_at must be in (0, 1] (a held-out accuracy), got {stop_at}")
    if train_queries is not None and task != "mqar":
        raise ValueError(f"train_queries applies to task mqar only, got task {task!r}")
    if min_pairs is not None and (task != "mqar" or not 1 <= min_pairs <= num_pairs):
        raise ValueError(f"min_pairs must be in 1..num_pairs ({num_pairs}) and needs task mqar, got {min_pairs} "
                         f"with task {task!r}")
    heldout = heldout_task_batch(task, eval_examples, seq_len, num_pairs, seed)  # validates the task size
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train_task(arch, task, Path(out_dir), heldout, seq_len=seq_len, num_pairs=num_pairs,
                           steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device,
                           weight_decay=weight_decay, warmup=warmup, min_pairs=min_pairs,
                           curriculum=curriculum, reference_init=reference_init,
                           sinusoidal_positions=sinusoidal_positions, train_queries=train_queries,
                           unit_decay=unit_decay, config_overrides=config_overrides,
                           eval_every=eval_every or max(1, steps // 6), stop_at=stop_at, log=log)
    finally:
        torch.set_num_threads(previous_threads)


def _train_task(arch: str, task: str, out: Path, heldout: TaskBatch, *, seq_len: int, num_pairs: int, steps: int,
                batch_size: int, lr: float, seed: int, device: str, weight_decay: float, warmup: int | None,
                min_pairs: int | None, curriculum: str, reference_init: bool, sinusoidal_positions: bool,
                train_queries: int | None, unit_decay: bool, config_overrides: dict[str, Any] | None,
                eval_every: int, stop_at: float | None, log: Callable[[str], None]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    t_start = time.perf_counter()
    tok = task_tokenizer()
    shape = {**TASK_SHAPES[arch], **(config_overrides or {})}
    config = build_config(arch, len(tok), tok.eos_token_id, seq_len, **shape)
    # transformers configs keep any keyword: a misspelt key would be silently ignored.
    unknown = sorted(k for k in shape if not hasattr(type(config)(), k))
    if unknown:
        raise ValueError(f"unknown {type(config).__name__} fields {unknown}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if reference_init:
        reference_mixer_init(model)
    if sinusoidal_positions:
        sinusoidal_position_init(model)
    if unit_decay:
        unit_decay_init(model)
    model = model.to(dev)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    warmup = max(1, steps // 20) if warmup is None else max(1, warmup)
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, warmup))
    log(f"[{arch} {task}] {n_params:,} parameters; {steps} steps of {batch_size} x {seq_len} tokens; device {dev}")
    curve: list[dict[str, float]] = []
    pairs = PairCurriculum(curriculum if task == "mqar" else None, num_pairs, min_pairs)
    log_every = max(1, min(steps // 30, eval_every))
    running = 0.0
    stopped_at: int | None = None
    t_train = time.perf_counter()

    settings = {"seq_len": seq_len, "num_pairs": num_pairs, "min_pairs": min_pairs, "steps": steps,
                "batch_size": batch_size, "lr": lr, "warmup": warmup, "weight_decay": weight_decay, "seed": seed,
                "reference_init": reference_init, "sinusoidal_positions": sinusoidal_positions,
                "train_queries": train_queries, "unit_decay": unit_decay, "eval_every": eval_every,
                "stop_at": stop_at}

    def stats(step: int, accuracy: float, complete: bool) -> dict[str, Any]:
        return _stats(arch, task, model, config, tok, heldout, shape, pairs, settings, steps_done=step,
                      accuracy=accuracy, complete=complete, stopped_at=stopped_at, curve=curve, dev=dev,
                      train_time=time.perf_counter() - t_train, wall_time=time.perf_counter() - t_start)

    accuracy = float("nan")  # of the last evaluation; the last step always evaluates
    with _training_scan(arch):
        for step in range(steps):
            batch = pairs.batch(task, batch_size, seq_len, seed, step, min_pairs, train_queries)
            loss = optimizer_step(model, opt, sched, batch.input_ids.to(dev), batch.labels.to(dev))
            pairs.update(step, loss)
            running += loss
            evaluate = (step + 1) % eval_every == 0 or step + 1 == steps
            if (step + 1) % log_every == 0 or evaluate:
                n = (step % log_every) + 1
                entry: dict[str, float] = {"step": step + 1, "train_loss": round(running / n, 4)}
                if task == "mqar":
                    entry["train_pairs"] = pairs.current  # "mix": the largest count of the mix
                if evaluate:
                    accuracy = task_accuracy(model, heldout)
                    entry["heldout_query_accuracy"] = round(accuracy, 4)
                curve.append(entry)
                shown = f"pairs {pairs.current} " if task == "mqar" else ""
                log(f"[{arch} {task}] step {step + 1}/{steps} {shown}loss {running / n:.3f} "
                    f"acc {entry.get('heldout_query_accuracy', '-')} {time.perf_counter() - t_train:.0f}s")
                running = 0.0
                if evaluate and step + 1 < steps:
                    if stop_at is not None and entry["heldout_query_accuracy"] >= stop_at:
                        stopped_at = step + 1
                        break
                    _save(model, tok, out, stats(step + 1, entry["heldout_query_accuracy"], complete=False))
    model.eval()
    final = stats(stopped_at or steps, accuracy, complete=True)
    _save(model, tok, out, final)
    log(f"[{arch} {task}] held-out query accuracy {accuracy:.4f} on {heldout.num_queries} queries")
    return final


def _save(model: nn.Module, tok: Any, out: Path, stats: dict[str, Any]) -> None:
    """Model, tokenizer and training.json to ``out``, each file replaced whole (a checkpoint or the result)."""
    from mambascope.results.outputs import write_atomic

    scratch = out / ".checkpoint"
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(scratch, ignore_errors=True)
    model.save_pretrained(scratch)
    tok.save_pretrained(scratch)
    for item in scratch.iterdir():
        os.replace(item, out / item.name)
    scratch.rmdir()
    write_atomic(out / "training.json", json.dumps(stats, indent=2) + "\n")


def _stats(arch: str, task: str, model: nn.Module, config: Any, tok: Any, heldout: TaskBatch,
           shape: dict[str, Any], pairs: PairCurriculum, settings: dict[str, Any], *, steps_done: int,
           accuracy: float, complete: bool, stopped_at: int | None, curve: list[dict[str, float]], dev: Any,
           train_time: float, wall_time: float) -> dict[str, Any]:
    """training.json: the model, the settings it was trained with, the outcome and the learning curve."""
    import transformers

    seed, num_pairs = settings["seed"], settings["num_pairs"]
    return {
        "arch": arch, "model_class": type(model).__name__, "task": task,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": config.num_hidden_layers if arch != "gpt2" else config.n_layer,
        "d_model": config.hidden_size if arch != "gpt2" else config.n_embd, "vocab_size": len(tok),
        "seq_len": settings["seq_len"], "num_pairs": num_pairs if task == "mqar" else None,
        "queries_per_example": int(heldout.query.shape[1]), "shape": shape,
        "min_pairs": settings["min_pairs"], "curriculum": pairs.kind,
        "init": "reference (mixer in_proj/x_proj: nn.Linear default)" if settings["reference_init"]
        else "transformers",
        "position_init": "sinusoidal" if settings["sinusoidal_positions"] else None,
        "train_queries": settings["train_queries"],
        "a_init": "A = -1 (unit_decay_init)" if settings["unit_decay"] else None,
        "pairs_reached_at_step": pairs.reached if pairs.kind == "grow" else None,
        "complete": complete, "steps": settings["steps"], "steps_done": steps_done, "stopped_at_step": stopped_at,
        "stop_at": settings["stop_at"], "eval_every": settings["eval_every"], "batch_size": settings["batch_size"],
        "examples_seen": steps_done * settings["batch_size"], "lr": settings["lr"], "warmup": settings["warmup"],
        "weight_decay": settings["weight_decay"], "seed": seed,
        "train_seeds": _train_seeds(seed, steps_done, num_pairs,
                                    settings["min_pairs"] if pairs.kind == "mix" else None),
        "heldout_seed": seed * 1_000_000 - 1, "heldout_examples": int(heldout.input_ids.shape[0]),
        "heldout_queries": heldout.num_queries, "heldout_query_accuracy": round(accuracy, 4),
        "device": str(dev), "torch_threads": torch.get_num_threads(), "train_time_s": round(train_time, 1),
        "wall_time_s": round(wall_time, 1), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "accuracy_definition": "argmax next-token prediction at each query position equals the answer",
        "curve": curve,
    }
