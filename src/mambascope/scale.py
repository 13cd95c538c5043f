"""The census pass at corpus scale: resumable (checkpoints) and data-parallel (``torch.distributed``).

docs/design.md §9.  One scan visits the windows in global batches of ``batch_size``; batch ``b`` belongs to
rank ``b mod K`` of K processes (1 without ``torchrun``).  Each rank feeds its batches to its own accumulators
and checkpoints them, with the number of global batches passed and its loss sums, every ``every_batches``
batches or ``every_seconds`` seconds and once more when its scan is done.  A checkpoint is the state saved
with ``torch.save`` and read back with ``torch.load(weights_only=True)``, which builds nothing but tensors,
plain containers and the accumulator classes of ``CHECKPOINT_CLASSES``: a file planted at the checkpoint's
path cannot run code.  It is written atomically (temp file, fsync, rename: ``outputs.write_atomic``), so a
run killed at any moment, even during a write, leaves the previous checkpoint whole; resuming restores the
accumulators exactly and continues with the next batch, so no batch is counted twice or lost.

The memory plan (exact or summarized n-gram tables, ``plan_memory``) is made once, by rank 0, and shared
with the other ranks (``agreed_memory_plan``); it is saved in every checkpoint and a resume continues with
the checkpoint's plan, whatever the process's memory or the default budget is then.

Checkpoints are per rank, ``.DIR.checkpoint-R-of-K`` beside the output ``DIR``: ranks never wait for each
other to checkpoint, and each resumes its own share.  A resume must use the same K.  At the end the ranks'
accumulator states go to rank 0 (``gather_object``) and are merged there in rank order with their own
``merge``; the accumulators are exact and batching-independent, so K processes give the counts of one.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mambascope.results.outputs import write_atomic
from mambascope.runner import LayerConsumer, LossResult, next_token_loss_sum
from mambascope.trace import trace_stream

CHECKPOINT_FORMAT = 3  # 2: accumulator state of the row tables (KeyedRows) and max |post|; 3: the memory plan
DEFAULT_EVERY = "10m"


# -- processes ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ranks:
    """This process's place among ``world`` processes (``world`` = 1 without ``torch.distributed``)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_ranks() -> Ranks:
    """The ranks ``torchrun`` announces in the environment (RANK, WORLD_SIZE); one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Ranks(int(os.environ.get("RANK", "0")), world) if world > 1 else Ranks()


def init_distributed(device: str) -> tuple[Ranks, str]:
    """Join the ``torchrun`` process group: NCCL with one GPU per rank (``LOCAL_RANK``) when ``device`` is CUDA,
    Gloo on CPU.  Returns the ranks and the device this rank must use."""
    import torch.distributed as dist

    ranks = launched_ranks()
    if ranks.world == 1:
        return ranks, device
    from mambascope.models.loading import resolve_device

    if resolve_device(device).type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device, backend = f"cuda:{local}", "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Ranks(dist.get_rank(), dist.get_world_size()), device


def close_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -- checkpoints ----------------------------------------------------------------------------------------
def parse_every(text: str) -> tuple[int | None, float | None]:
    """``--checkpoint-every``: ``N`` batches, or a time ``Ns`` / ``Nm`` / ``Nh``; ``0`` = never.

    Returns (batches, seconds), one of them None (both None for never)."""
    text = str(text).strip().lower()
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text and text[-1] in units:
            seconds = float(text[:-1]) * units[text[-1]]
            if not 0 < seconds < float("inf"):  # nan too
                raise ValueError
            return None, seconds
        batches = int(text)
        if batches < 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"--checkpoint-every {text!r}: give a number of batches (e.g. 500), a time "
                         "(e.g. 90s, 10m, 1h) or 0 for never") from None
    return (batches or None), None


def checkpoint_paths(out: str | Path) -> list[Path]:
    """Every census checkpoint beside the output directory ``out``, of any rank and process count."""
    out = Path(os.path.abspath(Path(out).expanduser()))
    return sorted(out.parent.glob(f".{out.name}.checkpoint-*-of-*"))


def checkpoint_path(out: str | Path, ranks: Ranks) -> Path:
    out = Path(os.path.abspath(Path(out).expanduser()))
    return out.parent / f".{out.name}.checkpoint-{ranks.rank}-of-{ranks.world}"


def remove_checkpoints(out: str | Path) -> None:
    """After a committed output: its checkpoints (and temp files of killed writes) are no longer needed."""
    out = Path(os.path.abspath(Path(out).expanduser()))
    for path in [*checkpoint_paths(out), *out.parent.glob(f"..{out.name}.checkpoint-*.tmp-*")]:
        path.unlink(missing_ok=True)


def windows_digest(windows: torch.Tensor) -> str:
    """SHA-256 of the token ids [n, T] (int64, row-major): the corpus a checkpoint was made on."""
    return hashlib.sha256(windows.to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter's name, shape and float64 sum: a different checkpoint of the same
    architecture (another training step) differs here.  One reduction per parameter, on its device."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}{tuple(p.shape)}{float(p.detach().sum(dtype=torch.float64))!r}".encode())
    return h.hexdigest()


def checkpoint_classes() -> list[type]:
    """The classes a checkpoint may hold besides tensors and plain containers: the census's accumulators."""
    from mambascope.neurons._common import KeyedRows
    from mambascope.neurons.activity import ActivityAccumulator
    from mambascope.neurons.attention_rows import TopAttentionRows
    from mambascope.neurons.census import LayerCensus
    from mambascope.neurons.delta import DeltaAccumulator
    from mambascope.neurons.detectors import CountTable, TokenDetectorAccumulator
    from mambascope.neurons.heavy_hitters import BoundedTokenDetectorAccumulator, HeavyHitterTable, Summaries
    from mambascope.neurons.positional import PositionalAccumulator
    from mambascope.neurons.top_contexts import TopContextAccumulator
    from mambascope.ssm.params import MixerParams

    return [KeyedRows, ActivityAccumulator, TopAttentionRows, LayerCensus, DeltaAccumulator, CountTable,
            TokenDetectorAccumulator, BoundedTokenDetectorAccumulator, HeavyHitterTable, Summaries,
            PositionalAccumulator, TopContextAccumulator, MixerParams]


def _to_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes, device: torch.device | str) -> Any:
    """``torch.load(weights_only=True)``: only tensors, plain containers and ``checkpoint_classes()`` are built
    (instances made with ``__new__`` and given their saved ``__dict__``: no constructor, no other code runs);
    anything else raises ``pickle.UnpicklingError`` before it is made."""
    with torch.serialization.safe_globals(checkpoint_classes()):
        return torch.load(io.BytesIO(data), map_location=device, weights_only=True)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A census checkpoint file, read as ``_from_bytes`` reads it (no code in it runs)."""
    return _from_bytes(Path(path).read_bytes(), device)


def _differs(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """The first differing field of two fingerprints, as 'group field: saved vs now', or None."""
    for group in now:
        for key in sorted(set(now[group]) | set(saved.get(group, {}))):
            a, b = saved.get(group, {}).get(key), now[group].get(key)
            if a != b:
                return f"different {group}: {key} {a!r} then, {b!r} now"
    return None


@dataclass
class Checkpointer:
    """Where and how often one rank checkpoints, and what the checkpoint must match to be resumed.

    ``fingerprint``: {"model": {...}, "corpus": {...}, "settings": {...}}; the scan adds the corpus digest.
    """

    path: Path
    fingerprint: dict[str, dict[str, Any]]
    every_batches: int | None = None
    every_seconds: float | None = None
    resume: bool = False
    memory: dict[str, Any] | None = None  # MemoryPlan.to_json() of the census, saved for its resume
    saved: dict[str, Any] | None = field(default=None, init=False)
    prepared: bool = field(default=False, init=False)
    writes: int = field(default=0, init=False)
    seconds_writing: float = field(default=0.0, init=False)

    def prepare(self, windows: Any, batch_size: int, ranks: Ranks, device: torch.device | str) -> None:
        """Complete the fingerprint with the scan's inputs and, when resuming, load and check the checkpoint:
        called before any work so that a mismatch is a bad input (exit 2), not a failed stage."""
        if self.prepared:
            return
        if isinstance(windows, torch.Tensor):  # a stream is checked batch by batch as the resume re-reads it
            self.fingerprint["corpus"]["windows_sha256"] = windows_digest(windows)
        self.fingerprint["settings"].update(batch_size=batch_size, processes=ranks.world, rank=ranks.rank)
        self.saved = self._load(device) if self.resume and self.path.is_file() else None
        self.prepared = True

    def _load(self, device: torch.device | str) -> dict[str, Any]:
        try:
            saved = load_checkpoint(self.path, device)
        except pickle.UnpicklingError:  # a type outside checkpoint_classes(): refused before it was built
            raise ValueError(f"--resume: refused {self.path}: it holds objects other than a census checkpoint's "
                             "(it was not run); delete it or pass --overwrite to start over") from None
        except Exception as exc:  # only a file not of ours can fail here: ours are replaced atomically
            raise ValueError(f"--resume: cannot read the checkpoint {self.path} ({type(exc).__name__}); delete "
                             "it or pass --overwrite to start over") from None
        if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"--resume: {self.path} is not a checkpoint of this mambascope version; "
                             "delete it or pass --overwrite to start over")
        reason = _differs(saved["fingerprint"], self.fingerprint)
        if reason is not None:
            raise ValueError(f"--resume: the checkpoint {self.path.name} was made with {reason}; pass the same "
                             "flags, or --overwrite to start over")
        return saved

    def save(self, scan_state: dict[str, Any]) -> None:
        start = time.perf_counter()
        data = _to_bytes({"format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint, "memory": self.memory,
                          **scan_state})
        write_atomic(self.path, data)
        self.writes += 1
        self.seconds_writing += time.perf_counter() - start


# -- the scan -------------------------------------------------------------------------------------------
@dataclass
class ScanPlan:
    """How ``scaled_scan`` runs: this rank among the processes, and its checkpoints (None = none)."""

    ranks: Ranks = field(default_factory=Ranks)
    checkpoint: Checkpointer | None = None
    ngram_counters: Any = None  # the memory plan's heavy_hitters.Summaries, the same on every rank (merge needs it)


def _restore(state: dict[str, dict], saved: dict[str, dict]) -> None:
    """Replace the accumulators in place: the consumer closes over these very dicts."""
    for key, accumulators in state.items():
        accumulators.clear()
        accumulators.update(saved[key])


def _batches(windows: Any, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row index, [b, T] windows) of an [n, T] tensor or a ``data.stream.StreamSelection``."""
    if isinstance(windows, torch.Tensor):
        for start in range(0, windows.shape[0], batch_size):
            yield start, windows[start:start + batch_size]
    else:
        yield from windows.batches(batch_size)


def _chain(digest: str, batch: torch.Tensor) -> str:
    """The running digest of the windows scanned so far: a resume checks that it reads the same corpus."""
    return hashlib.sha256(digest.encode() + batch.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def scaled_scan(model: nn.Module, windows: Any, consume: LayerConsumer, state: dict[str, dict], *,
                plan: ScanPlan, names: str | Iterable[str] | None = None, batch_size: int = 8,
                progress: bool = True, description: str = "census") -> LossResult:
    """``runner.scan_corpus`` for this rank's batches of ``windows`` (an [n, T] tensor or a streamed
    ``StreamSelection``), checkpointed, then merged across ranks.

    ``state``: {name: {key: accumulator or nested dict}}, every accumulator ``consume`` feeds (checkpointed,
    restored in place and merged across ranks with ``merge``).  ``window_ids`` stay global row indices of ``windows``.
    On rank 0 returns the loss over all ranks' windows and leaves the merged accumulators in ``state``;
    other ranks return their own share's loss (their ``state`` is then of no use).
    """
    if isinstance(windows, torch.Tensor) and (windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2):
        raise ValueError(f"windows must be a non-empty [n, T] tensor with T >= 2, got {tuple(windows.shape)}")
    device = model.get_input_embeddings().weight.device
    ranks, ckpt = plan.ranks, plan.checkpoint
    position, total, count, chain, saved_chain = 0, 0.0, 0, "", None
    if ckpt is not None:
        ckpt.prepare(windows, batch_size, ranks, device)
        if ckpt.saved is not None:
            saved, ckpt.saved = ckpt.saved, None  # restored once; the state lives on in the accumulators
            _restore(state, saved["state"])
            position, total, count, saved_chain = (saved["position"], saved["loss_sum"], saved["loss_count"],
                                                   saved["chain"])
    mine = None
    if isinstance(windows, torch.Tensor):  # a stream's length is unknown until it ends
        n = windows.shape[0]
        mine = sum(min(batch_size, n - b * batch_size) for b in range(ranks.rank, -(-n // batch_size), ranks.world))
    bar = tqdm(total=None if mine is None else mine * windows.shape[1], unit="tok", unit_scale=True,
               desc=description, disable=not progress)
    if position and progress:
        print(f"mambascope: resuming the census after batch {position}", file=sys.stderr)
    last_save, since_save, n_batches = time.monotonic(), 0, 0
    for b, (start, batch) in enumerate(_batches(windows, batch_size)):
        chain, n_batches = _chain(chain, batch), b + 1
        if b + 1 == position and chain != saved_chain:
            raise ValueError(f"--resume: the checkpoint {ckpt.path.name} was made on other windows (the first "
                             f"{position} batches differ); pass the same corpus, or --overwrite to start over")
        if b % ranks.world != ranks.rank:
            continue
        if b < position:  # counted before the checkpoint
            bar.update(batch.numel())
            continue
        rows = torch.arange(start, start + batch.shape[0])
        logits = trace_stream(model, batch, lambda layer, units, batch=batch, rows=rows:
                              consume(layer, units, batch, rows), names=names)
        loss, n = next_token_loss_sum(logits, batch)
        total, count, since_save = total + loss, count + n, since_save + 1
        bar.update(batch.numel())
        if ckpt is not None and _due(ckpt, since_save, last_save):
            ckpt.save({"position": b + 1, "chain": chain, "loss_sum": total, "loss_count": count, "state": state})
            last_save, since_save = time.monotonic(), 0
    bar.close()
    if position > n_batches:
        raise ValueError(f"--resume: the checkpoint {ckpt.path.name} was made on a longer corpus ({position} "
                         f"batches done, {n_batches} now); pass the same corpus, or --overwrite to start over")
    if ckpt is not None and ckpt.writes and since_save:
        # the finished share, when the run was long enough to checkpoint at all: a kill during the stages
        # that follow then redoes no batch
        ckpt.save({"position": n_batches, "chain": chain, "loss_sum": total, "loss_count": count, "state": state})
    if ranks.world > 1:
        total, count = _gather_merge(state, total, count, ranks, device)
    return LossResult(total / count, count)


def _due(ckpt: Checkpointer, since_save: int, last_save: float) -> bool:
    if ckpt.every_batches is not None:
        return since_save >= ckpt.every_batches
    return ckpt.every_seconds is not None and time.monotonic() - last_save >= ckpt.every_seconds


def _gather_merge(state: dict[str, dict], total: float, count: int, ranks: Ranks,
                  device: torch.device) -> tuple[float, int]:
    """Send every rank's accumulators and loss sums to rank 0 and merge them there in rank order."""
    import torch.distributed as dist

    mine = _to_bytes({"state": state, "loss_sum": total, "loss_count": count})
    gathered: list[bytes] | None = [b""] * ranks.world if ranks.main else None
    dist.gather_object(mine, gathered, dst=0)
    if not ranks.main:
        return total, count
    assert gathered is not None
    for data in gathered[1:]:
        other = _from_bytes(data, device)
        _merge_into(state, other["state"])
        total, count = total + other["loss_sum"], count + other["loss_count"]
    return total, count


def _merge_into(mine: dict, theirs: dict) -> None:
    """Merge nested {key: accumulator | {key: ...}} dicts; an accumulator only the other rank has (a MoE expert
    only its tokens reached) is adopted as it is."""
    for key, value in theirs.items():
        if key not in mine:
            mine[key] = value
        elif isinstance(value, dict):
            _merge_into(mine[key], value)
        else:
            mine[key].merge(value)


def scan_function(plan: ScanPlan) -> Callable[..., LossResult]:
    """``scaled_scan`` bound to ``plan``, in the form ``pipeline.census_pass(scan=...)`` calls."""

    def scan(model: nn.Module, windows: torch.Tensor, consume: LayerConsumer, state: dict[str, dict],
             **options: Any) -> LossResult:
        return scaled_scan(model, windows, consume, state, plan=plan, **options)

    return scan


# -- memory ---------------------------------------------------------------------------------------------
MIN_COUNTERS = 16  # fewer counters per neuron than this would bound the n-gram coverage too loosely to use
HH_BYTES = 16 * 3  # a Misra-Gries counter (key, count), ×3 for the update buffer and the reduction's temporaries
UNIT_BYTES = 96  # per token and neuron in one batch: the traced units, the mixer's own activations, the
#                   accumulators' float64 and float32 copies (valid post, activity, Δ and ln Δ, |post|)


@dataclass(frozen=True)
class MemoryPlan:
    """The census's estimated peak memory (bytes, by part) and its tables: all exact (``summaries`` None), or
    the ``summaries.orders`` in Misra–Gries summaries of ``summaries.counters`` counters per neuron and, where
    even that does not fit, no per-token Δ table (``neurons.heavy_hitters.Summaries``).  ``budget_note``: how
    a default budget was chosen ("" for a given one)."""

    parts: dict[str, float]
    summaries: Any  # heavy_hitters.Summaries | None
    budget: float
    budget_note: str = ""

    @property
    def counters(self) -> int | None:
        return None if self.summaries is None else self.summaries.counters

    @property
    def peak(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        gib = {k: f"{v / 2**30:.2f}" for k, v in self.parts.items()}
        s = self.summaries
        tables = ("exact" if s is None else f"Misra-Gries summaries of {s.counters} counters per neuron for n in "
                  f"{', '.join(map(str, s.orders))}" + ("" if s.delta_tokens else "; no per-token Δ table"))
        note = f" ({self.budget_note})" if self.budget_note else ""
        return (f"estimated peak memory {self.peak / 2**30:.2f} GiB (process now, model included, "
                f"{gib['process']}, one batch "
                f"{gib['batch']}, fixed accumulators {gib['accumulators']}, per-token Δ {gib['delta_tokens']}, "
                f"n-gram tables {gib['ngram_tables']}: {tables}) within --memory-budget {self.budget / 2**30:g} GiB"
                f"{note}")

    def to_json(self) -> dict[str, Any]:
        """Plain data (a checkpoint holds it; ranks exchange it): ``from_json`` gives this plan back."""
        s = self.summaries
        return {"parts": dict(self.parts), "budget": self.budget, "budget_note": self.budget_note,
                "summaries": None if s is None else {"counters": s.counters, "orders": list(s.orders),
                                                     "delta_tokens": s.delta_tokens}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MemoryPlan:
        from mambascope.neurons.heavy_hitters import Summaries

        s = data["summaries"]
        return cls(dict(data["parts"]), None if s is None else Summaries(s["counters"], tuple(s["orders"]),
                                                                         s["delta_tokens"]),
                   data["budget"], data["budget_note"])


DEFAULT_BUDGET_CAP = 16 * 2**30  # the default --memory-budget: the process now plus half the memory available,
DEFAULT_BUDGET_SHARE = 0.5        # at most this


def available_bytes() -> float | None:
    """The memory available to a new allocation without swapping: MemAvailable of /proc/meminfo (Linux), else
    psutil's ``available`` when psutil is installed, else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return float(psutil.virtual_memory().available)


def default_budget(resident: float) -> tuple[float, str]:
    """The default ``--memory-budget`` in bytes and the note that says how it was chosen: what the process holds
    now (``resident`` bytes: the budget covers it, and the kernel no longer counts it as available) plus half of
    the memory available now, at most 16 GiB; 16 GiB when the available memory cannot be read."""
    available = available_bytes()
    if available is None:
        return float(DEFAULT_BUDGET_CAP), (f"default: {DEFAULT_BUDGET_CAP / 2**30:g} GiB, since this machine's "
                                           "available memory could not be read")
    budget = min(DEFAULT_BUDGET_CAP, resident + DEFAULT_BUDGET_SHARE * available)
    return budget, (f"default: this process's {resident / 2**30:.2f} GiB and {DEFAULT_BUDGET_SHARE:g} of the "
                    f"{available / 2**30:.1f} GiB available now, at most {DEFAULT_BUDGET_CAP / 2**30:g} GiB")


def agreed_memory_plan(ranks: Ranks, saved: Mapping[str, Any] | None,
                       plan: Callable[[], MemoryPlan]) -> tuple[MemoryPlan, bool]:
    """The one memory plan of a census on every rank, and whether it is a checkpoint's.

    ``saved``: this rank's checkpoint's plan (``MemoryPlan.to_json``) when it resumes one, else None.  The plan
    of the first rank with a checkpoint is kept (the tables the checkpoints hold); without any, rank 0 calls
    ``plan`` and its plan is sent to every rank.  Summaries of one size on every rank are what lets the ranks'
    accumulators merge, and the same tables before and after a resume what makes it exact: a plan measured
    from each process's own resident memory would differ."""
    mine = saved if saved is not None else plan().to_json() if ranks.main else None
    everyone = [(mine, saved is not None)]
    if ranks.world > 1:
        import torch.distributed as dist

        everyone = [None] * ranks.world
        dist.all_gather_object(everyone, (json.dumps(mine), saved is not None))
        everyone = [(json.loads(text), resumed) for text, resumed in everyone]
    kept = [p for p, resumed in everyone if resumed]
    if any(p["summaries"] != kept[0]["summaries"] for p in kept):
        raise ValueError("--resume: the ranks' checkpoints were made with different n-gram tables; pass "
                         "--overwrite to start over")
    return MemoryPlan.from_json(kept[0] if kept else everyone[0][0]), bool(kept)


def resident_bytes(model: nn.Module) -> float:
    """What this process holds now (the interpreter, torch, the loaded model): its resident set on Linux
    (/proc/self/statm), else the model's parameters alone."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return float(pages * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return float(sum(p.numel() * p.element_size() for p in model.parameters()))


def plan_memory(model: nn.Module, layers: int, n_neurons: int, delta_units: int, *, tokens: float, window: int,
                batch_size: int, budget: float, orders: tuple[int, ...] = (1, 2, 3), top_k: int = 5,
                width: int = 16, resident: float | None = None, budget_note: str = "") -> MemoryPlan:
    """Size the census of ``layers`` layers of ``n_neurons`` neurons over ``tokens`` tokens (``math.inf`` when
    unknown) against ``budget`` bytes, and choose its tables (docs/census.md, "Memory").

    The process's resident memory now (interpreter, libraries, the loaded model; or ``resident`` bytes) is the
    base: the plan depends on it, so a census makes it once and keeps it (``agreed_memory_plan``).  An exact
    n-gram table holds a row of E float32 counts per distinct n-gram seen, at most min(Vⁿ, tokens) of them, in rows
    allocated by doubling (the next power of two) and a key index; the per-token Δ table a row
    of Δ-units float64 sums per token type seen; finalize holds about three more copies of the largest table.
    What does not fit is dropped in this order: exact n >= 2 tables (to summaries), the per-token Δ table, the
    exact unigram table (to summaries: the token detectors become certain-only)."""
    from mambascope.neurons._common import DIRECT_KEYS
    from mambascope.neurons.heavy_hitters import Summaries

    vocab = model.get_input_embeddings().num_embeddings

    def rows(n: int) -> float:  # the rows a table of order n may allocate: doubled from 64 past its n-grams
        return min(2 ** math.ceil(math.log2(max(min(vocab**n, tokens), 64))), vocab**n + 1)

    def index(n: int) -> float:
        return 8 * vocab**n if vocab**n <= DIRECT_KEYS else 16 * 2 * min(vocab**n, tokens)

    def table(n: int) -> float:  # the exact tables of order n of every layer
        return layers * (rows(n) * 4 * n_neurons + index(n))

    # per neuron: positional counts (8·window) and the shift null's lag tables of two window shapes (full
    # windows and a shorter last one, 4·window each), activity, top contexts
    per_layer = (n_neurons * (16 * window + 8 * 8 + top_k * width * 16 + 8 * 3)
                 + 8 * 2 * vocab + delta_units * 8 * 4)  # token occurrences (census and Δ), Δ moments
    parts = {"process": resident_bytes(model) if resident is None else float(resident),
             "batch": float(batch_size * window * (8 * vocab + UNIT_BYTES * n_neurons)),
             "accumulators": float(layers * per_layer),
             "delta_tokens": float(layers * (rows(1) * 8 * delta_units + index(1)))}
    fixed = parts["process"] + parts["batch"] + parts["accumulators"]
    exact = sum(table(n) for n in orders) + 3 * max(table(n) for n in orders) / layers  # + finalize's copies
    if fixed + parts["delta_tokens"] + exact <= budget:
        return MemoryPlan({**parts, "ngram_tables": exact}, None, budget, budget_note)
    summarized = tuple(n for n in orders if n >= 2)
    unigrams = table(1) + 3 * table(1) / layers if 1 in orders else 0.0
    for delta, unigram_exact in ((True, True), (False, True), (False, False)):
        keep = (parts["delta_tokens"] if delta else 0.0) + (unigrams if unigram_exact else 0.0)
        kinds = summarized if unigram_exact else tuple(sorted({1, *summarized}))
        room = budget - fixed - keep
        counters = math.floor(room / (layers * len(kinds) * n_neurons * HH_BYTES)) if room > 0 and kinds else 0
        if counters >= MIN_COUNTERS:
            plan = Summaries(counters, kinds, delta_tokens=delta)
            return MemoryPlan({**parts, "delta_tokens": parts["delta_tokens"] if delta else 0.0,
                               "ngram_tables": keep - (parts["delta_tokens"] if delta else 0.0)
                               + layers * len(kinds) * n_neurons * HH_BYTES * counters}, plan, budget,
                              budget_note)
    need = fixed + layers * len(orders) * n_neurons * HH_BYTES * MIN_COUNTERS
    raise ValueError(f"--memory-budget {budget / 2**30:g} GiB is too small for this census (the model, a batch, "
                     f"the accumulators and the smallest n-gram summaries alone need about {need / 2**30:.1f} GiB); "
                     "raise it, or pass fewer --layers")
