"""Train a sparse dictionary on activations streamed from the tracer (``mambascope sae``).

Why not sparsify's ``Trainer``: it hooks ``nn.Module`` outputs of a Hugging Face model over a tokenized
``datasets.Dataset``, while our units (``mixer.hook_post``, …) are emitted by the tracer's recomputation
(docs/design.md §3) and our corpora stream.  So this module drives sparsify's ``SparseCoder`` from its own
loop with the trainer's tricks, as in sparsify 1.3.3 ``trainer.py``:

- b_dec starts at the mean target of the first batch (a transcoder's b_enc at −W·mean input);
- an SAE's decoder rows are renormalised to unit norm before every step and the gradient component
  parallel to them is removed before the optimizer step;
- AuxK (Gao et al. 2024, App. B.1): latents silent for more than ``dead_after`` tokens reconstruct the
  residual through the top d/2 of them, weighted ``auxk_alpha``;
- Adam with linear warmup then linear decay (sparsify's lr 2e-4/√(d_sae/2¹⁴) is for runs of millions of
  tokens; the default here is larger for the short runs on 2 cores).

Checkpoints (``--resume``): tensors in safetensors, counters in JSON — never pickle.  The checkpoint holds the
weights, Adam's moments, the shuffle buffer, the generator state and the position in the corpus, so a resumed
run continues the very same sequence of batches.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from mambascope.features.activations import ShuffleBuffer, unit_rows, window_batches
from mambascope.features.dictionary import DictionarySpec, new_coder
from mambascope.results.outputs import fsync_dir, signals_deferred, write_atomic


@dataclass(frozen=True)
class TrainConfig:
    """Training flags; a checkpoint is resumed only under the same ones."""

    tokens: int = 131_072
    batch_tokens: int = 512
    buffer_tokens: int = 16_384
    lr: float = 2e-3
    warmup: float = 0.05
    auxk_alpha: float = 1 / 32
    dead_after: int = 16_384
    window_batch: int = 8
    seed: int = 0

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_tokens


def check_config(cfg: TrainConfig, spec: DictionarySpec | None = None) -> None:
    """Flags that need no model (``spec``: also against the dictionary's width)."""
    for name in ("tokens", "batch_tokens", "buffer_tokens", "dead_after", "window_batch"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.lr <= 0 or cfg.auxk_alpha < 0 or not 0 <= cfg.warmup < 1:
        raise ValueError(f"--lr must be positive, --auxk-alpha non-negative, warmup in [0, 1): got {cfg.lr}, "
                         f"{cfg.auxk_alpha}, {cfg.warmup}")
    if cfg.tokens < cfg.batch_tokens:
        raise ValueError(f"--tokens {cfg.tokens} is less than one batch (--batch-tokens {cfg.batch_tokens})")
    if cfg.buffer_tokens < cfg.batch_tokens:
        raise ValueError(f"--buffer-tokens {cfg.buffer_tokens} must hold at least one batch "
                         f"(--batch-tokens {cfg.batch_tokens})")


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over ``warmup``·steps, then linear decay to 0 (sparsify: get_linear_schedule_with_warmup)."""
    warm = max(1, round(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))


@dataclass
class TrainState:
    coder: nn.Module
    optimizer: torch.optim.Optimizer
    buffer: ShuffleBuffer
    generator: torch.Generator
    since_fired: torch.Tensor  # [d_sae] tokens since each latent was last in a top k
    step: int = 0
    epoch: int = 0
    window: int = 0  # training windows of this epoch already in the buffer
    fvu: float = float("nan")


def new_state(spec: DictionarySpec, cfg: TrainConfig) -> TrainState:
    torch.manual_seed(cfg.seed)  # sparsify's initialisation draws from the global generator
    coder = new_coder(spec)
    generator = torch.Generator().manual_seed(cfg.seed)
    return TrainState(coder, torch.optim.Adam(coder.parameters(), lr=cfg.lr),
                      ShuffleBuffer(cfg.buffer_tokens, spec.d_in + spec.d_out, generator), generator,
                      torch.zeros(spec.d_sae, dtype=torch.long))


# -- checkpoints ----------------------------------------------------------------------------------------
def checkpoint_dir(out: str | Path) -> Path:
    out = Path(os.path.abspath(Path(out).expanduser()))
    return out.parent / f".{out.name}.sae-checkpoint"


def save_checkpoint(directory: Path, state: TrainState, spec: DictionarySpec, cfg: TrainConfig) -> None:
    """``state-STEP.safetensors`` (weights, Adam moments, buffer, generator, dead counters), then
    ``state.json`` naming it (atomic); the previous tensor file is removed only afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{n}": p.detach() for n, p in state.coder.named_parameters()}
    names = [n for n, _ in state.coder.named_parameters()]
    opt = state.optimizer.state_dict()
    for i, slots in opt["state"].items():
        tensors.update({f"adam.{names[i]}.{k}": torch.as_tensor(v) for k, v in slots.items()})
    tensors.update({"buffer": state.buffer.rows, "generator": state.generator.get_state(),
                    "since_fired": state.since_fired})
    tensor_file = f"state-{state.step}.safetensors"
    tmp = directory / f".{tensor_file}.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, directory / tensor_file)
    fsync_dir(directory)
    counters = {"tensors": tensor_file, "step": state.step, "epoch": state.epoch, "window": state.window,
                "fvu": state.fvu, "param_groups": opt["param_groups"], "spec": asdict(spec), "config": asdict(cfg)}
    write_atomic(directory / "state.json", json.dumps(counters, indent=1))
    for old in directory.glob("state-*.safetensors"):
        if old.name != tensor_file:
            old.unlink()


def load_checkpoint(directory: Path, spec: DictionarySpec, cfg: TrainConfig) -> TrainState:
    """The state saved by ``save_checkpoint``; refused (ValueError) if it was made with another dictionary or
    other training flags."""
    counters = json.loads((directory / "state.json").read_text())
    if counters["spec"] != asdict(spec) or counters["config"] != asdict(cfg):
        raise ValueError(f"--resume: the checkpoint {directory} was made with other flags "
                         f"({counters['spec']}, {counters['config']}); rerun with those or pass --overwrite")
    tensors = load_file(str(directory / counters["tensors"]))
    state = new_state(spec, cfg)
    names = [n for n, _ in state.coder.named_parameters()]
    with torch.no_grad():
        for n, p in state.coder.named_parameters():
            p.copy_(tensors[f"param.{n}"])
    slots = {}
    for i, n in enumerate(names):
        keys = [k.rsplit(".", 1)[1] for k in tensors if k.startswith(f"adam.{n}.")]
        if keys:
            slots[i] = {k: tensors[f"adam.{n}.{k}"] for k in keys}
    state.optimizer.load_state_dict({"state": slots, "param_groups": counters["param_groups"]})
    state.buffer.rows = tensors["buffer"]
    state.generator.set_state(tensors["generator"])
    state.since_fired = tensors["since_fired"]
    state.step, state.epoch, state.window, state.fvu = (counters["step"], counters["epoch"], counters["window"],
                                                        counters["fvu"])
    return state


# -- the loop -------------------------------------------------------------------------------------------
def _initialise_biases(coder: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """sparsify's first-step initialisation: centred pre-activations and b_dec at the mean target."""
    with torch.no_grad():
        if coder.cfg.transcode:
            coder.encoder.bias.copy_(-x.mean(0) @ coder.encoder.weight.T)
        coder.b_dec.copy_(y.mean(0))


def train_step(state: TrainState, spec: DictionarySpec, cfg: TrainConfig, rows: torch.Tensor) -> float:
    """One optimizer step on buffer rows [n, d_in + d_out]; returns the batch FVU."""
    coder = state.coder
    x, y = rows[:, :spec.d_in], rows[:, spec.d_in:]
    if state.step == 0:
        _initialise_biases(coder, x, y)
    if coder.cfg.normalize_decoder:
        coder.set_decoder_norm_to_unit_norm()
    dead = state.since_fired > cfg.dead_after if cfg.auxk_alpha > 0 else None
    out = coder(x, y, dead_mask=dead)
    loss = out.fvu + cfg.auxk_alpha * out.auxk_loss
    loss.backward()
    if coder.cfg.normalize_decoder:
        coder.remove_gradient_parallel_to_decoder_directions()
    for group in state.optimizer.param_groups:
        group["lr"] = lr_at(cfg, state.step)
    state.optimizer.step()
    state.optimizer.zero_grad()
    fired = torch.zeros(spec.d_sae, dtype=torch.bool)
    fired[out.latent_indices.flatten()] = True
    state.since_fired += rows.shape[0]
    state.since_fired[fired] = 0
    state.step += 1
    return float(out.fvu.detach())


def _fill(state: TrainState, model: nn.Module, spec: DictionarySpec, cfg: TrainConfig,
          windows: Callable[[], Iterable[list[int]]], batches: Iterator[torch.Tensor] | None) -> Iterator[torch.Tensor]:
    """Top the buffer up to at least its capacity from the training windows (a new pass when they run out).

    ``batches``: the open pass (None: open one at ``state.window``, as after a resume); returned to continue
    from, so that the corpus is read once per pass."""
    while True:
        if batches is None:
            batches = window_batches(_skip(windows(), state.window), cfg.window_batch)
        for ids in batches:
            x, y = unit_rows(model, ids, spec)
            with signals_deferred():  # the rows and the corpus position move together, for the checkpoint
                state.buffer.add(torch.cat([x, y], dim=1))
                state.window += ids.shape[0]
            if len(state.buffer) >= cfg.buffer_tokens:
                return batches
        if state.window == 0:
            raise ValueError("the corpus has no training windows")
        state.epoch, state.window, batches = state.epoch + 1, 0, None


def _skip(windows: Iterable[list[int]], n: int) -> Iterable[list[int]]:
    for i, ids in enumerate(windows):
        if i >= n:
            yield ids


def train_dictionary(model: nn.Module, spec: DictionarySpec, cfg: TrainConfig,
                     windows: Callable[[], Iterable[list[int]]], *, checkpoint: Path | None = None,
                     state: TrainState | None = None, checkpoint_every: int = 50, progress: bool = True,
                     on_step: Callable[[TrainState], None] | None = None) -> TrainState:
    """Train (or, given ``state``, continue) a dictionary for ``cfg.steps`` steps of ``cfg.batch_tokens`` rows.

    ``windows()`` opens the training windows anew (a pass over them; lists of T token ids).  The buffer is
    topped up to ``cfg.buffer_tokens`` rows before every step.  With ``checkpoint``, the state is saved every
    ``checkpoint_every`` steps and when interrupted (then the interrupt propagates).  ``on_step`` is called
    after each step (tests interrupt there).
    """
    state = state or new_state(spec, cfg)
    batches = None
    bar = tqdm(total=cfg.steps, initial=state.step, unit="step", desc=f"sae {spec.hook_out}", disable=not progress)
    try:
        while state.step < cfg.steps:
            if len(state.buffer) < cfg.buffer_tokens:
                batches = _fill(state, model, spec, cfg, windows, batches)
            with signals_deferred():  # a step is whole or not taken, for the checkpoint written on interrupt
                state.fvu = train_step(state, spec, cfg, state.buffer.take(cfg.batch_tokens))
            bar.update(1)
            bar.set_postfix(fvu=f"{state.fvu:.3f}", dead=int((state.since_fired > cfg.dead_after).sum()))
            if checkpoint is not None and state.step % checkpoint_every == 0:
                save_checkpoint(checkpoint, state, spec, cfg)
            if on_step is not None:
                on_step(state)
    except KeyboardInterrupt:
        if checkpoint is not None:
            save_checkpoint(checkpoint, state, spec, cfg)
        raise
    finally:
        bar.close()
    if state.coder.cfg.normalize_decoder:
        state.coder.set_decoder_norm_to_unit_norm()
    return state


__all__ = ["TrainConfig", "TrainState", "check_config", "checkpoint_dir", "load_checkpoint", "lr_at", "new_state",
           "save_checkpoint", "train_dictionary", "train_step"]
