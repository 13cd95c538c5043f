"""The ``mambascope`` command line: ``analyze``, ``census``, ``attention``, ``compare``, ``patch``, ``attribute``,
``report``, ``train-tiny``, ``sae``, ``steer``.

Every flag has a default and is checked before any work starts.  Exit codes, the same for every subcommand
(docs/design.md §13): 0 ok, 1 a stage failed, 2 bad input, 130 interrupted (Ctrl-C or SIGTERM).  A failure
prints one line naming the file or flag; ``--debug`` prints the traceback too.  Outputs go through
:class:`mambascope.results.outputs.OutputDir`: built beside the destination, swapped in only when complete.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

OK, FAILED, BAD_INPUT, INTERRUPTED = 0, 1, 2, 130
# Raised for what the user gave us (flags, files, models): exit 2.  Anything else reaching main() is a failure.
USER_ERRORS = (ValueError, KeyError, IndexError, FileNotFoundError, FileExistsError, PermissionError,
               NotADirectoryError, IsADirectoryError)
SPLITS = ("train", "validation", "all")
LONG_PATCH_RUN = 10_000  # patches from which `patch` prints its estimate even with --quiet


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (and exit 2), like every other mambascope error."""

    def error(self, message: str) -> NoReturn:
        self.exit(BAD_INPUT, f"mambascope: error: {message} (see {self.prog} --help)\n")


def _finite(text: str) -> float:
    """The argparse type of every float flag: a finite number.  ``float`` also reads nan and inf, which pass
    every range check after it (``nan <= 0`` is false) and come out as NaN results."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _common_args() -> argparse.ArgumentParser:
    p = _Parser(add_help=False)
    p.add_argument("--quiet", action="store_true", help="no progress bars or stage lines")
    p.add_argument("--debug", action="store_true", help="print the traceback of a failure")
    return p


def _add_model_args(p: argparse.ArgumentParser, model: str = "tiny-mamba") -> None:
    p.add_argument("--model", default=model, help="bundled name (tiny-mamba, tiny-mamba2, tiny-gpt), local "
                   "checkpoint directory or hub id (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _add_corpus_args(p: argparse.ArgumentParser, window: int = 128, max_tokens: int | None = 65536) -> None:
    p.add_argument("--corpus", default="builtin", help="builtin, a .txt or .jsonl file, or a datasets name "
                   "(default: %(default)s)")
    p.add_argument("--split", default=None, help="train, validation or all (default: validation for builtin and "
                   "datasets names, all for a file of your own)")
    p.add_argument("--window", type=int, default=window, help="tokens per window, T (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=max_tokens,
                   help="token budget; 0 = the whole split (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: %(default)s)")


def _add_run_args(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layer indices (default: all)")
    p.add_argument("--heldout-fraction", type=_finite, default=0.25,
                   help="share of the windows held out for ablation/pruning/faithfulness (default: %(default)s)")
    p.add_argument("--draws", type=int, default=3, help="random-control draws, at least 3 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    _add_out_args(p, out)
    p.add_argument("--no-report", dest="report", action="store_false", help="skip figures and report.html")


def _add_scale_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue the census of an interrupted run with the same "
                   "--out from its checkpoint (the same model, corpus and flags)")
    p.add_argument("--checkpoint-every", default="10m", metavar="N|TIME",
                   help="checkpoint the census every N batches or every TIME (90s, 10m, 1h); 0 = never "
                   "(default: %(default)s)")
    p.add_argument("--memory-budget", type=_finite, default=None, metavar="GIB",
                   help="memory the census may use; where exact (neuron, n-gram) tables would not fit, n >= 2 is "
                   "counted in bounded Misra-Gries summaries, marked approximate (default: what the process holds "
                   "plus half of the memory available when the census starts, at most 16 GiB)")
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="spread a model that does not fit one device over all of them: auto, balanced or "
                   "sequential (accelerate's device_map; replaces --device; one process, not with torchrun)")
    p.add_argument("--stream", action="store_true", help="read, tokenize and window the corpus lazily (constant "
                   "memory; with --max-tokens 0, all of it); held-out windows are every 1/f-th window, at most "
                   "512 (docs/census.md)")


def _add_out_args(p: argparse.ArgumentParser, out: str | None) -> None:
    p.add_argument("--out", default=out, required=out is None, help="output directory" +
                   ("" if out is None else " (default: %(default)s)"))
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing mambascope output (kept until the new one is complete)")


def _at_least(args: argparse.Namespace, flag: str, low: float) -> None:
    value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
    if value is not None and value < low:
        raise ValueError(f"{flag} must be at least {low:g}, got {value:g}")


def _check_flags(args: argparse.Namespace) -> None:
    """Every check that needs no model: fails in milliseconds rather than after minutes of work."""
    # --queries: --task's accuracy has a bootstrap interval, so two queries at least
    for flag, low in (("--window", 2), ("--batch-size", 1), ("--max-tokens", 0), ("--draws", 3), ("--steps", 1),
                      ("--seq-len", 2), ("--threads", 1), ("--num-pairs", 1), ("--warmup", 1),
                      ("--eval-every", 1), ("--queries", 2), ("--token-windows", 2)):
        _at_least(args, flag, low)
    if getattr(args, "max_tokens", 0) and args.max_tokens < args.window:
        raise ValueError(f"--max-tokens {args.max_tokens} is smaller than one window (--window {args.window}); "
                         "raise it, or pass 0 for the whole corpus")
    if hasattr(args, "heldout_fraction") and not 0 < args.heldout_fraction < 1:
        raise ValueError(f"--heldout-fraction must be between 0 and 1 (exclusive), got {args.heldout_fraction}")
    if getattr(args, "lr", 1.0) <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    for flag in ("layers", "attention_layers"):
        negative = [v for v in getattr(args, flag, None) or () if v < 0]
        if negative:
            raise ValueError(f"--{flag.replace('_', '-')} {negative[0]}: layer indices start at 0")
    if getattr(args, "methods", None):
        from mambascope.attribution import METHODS

        unknown = [m for m in args.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"--methods: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if getattr(args, "task", None) is not None and hasattr(args, "token_windows"):
        from mambascope.attribution.faithfulness import TOKEN_WINDOWS

        if args.token_windows != TOKEN_WINDOWS:
            raise ValueError("--token-windows sizes the token-level faithfulness test, which --task does not run")
    whole = getattr(args, "whole_model_methods", None)
    if whole and "none" in whole and len(whole) > 1:
        raise ValueError("--whole-model-methods none runs no whole-model method: give it alone, or only names")
    if whole and whole != ["none"]:
        from mambascope.attribution.ground_truth import check_whole_model

        try:
            check_whole_model(whole)
        except ValueError as exc:
            raise ValueError(f"--whole-model-methods: {exc} (or none)") from None
    if hasattr(args, "split"):
        if args.split is None:
            args.split = "all" if Path(args.corpus).suffix.lower() in (".txt", ".jsonl") else "validation"
        if args.split not in SPLITS:
            raise ValueError(f"--split {args.split!r}: choose train, validation or all")
    if getattr(args, "memory_budget", None) is not None and args.memory_budget <= 0:  # finite already (_finite)
        raise ValueError(f"--memory-budget must be a positive, finite number of GiB, got {args.memory_budget:g}")
    if hasattr(args, "checkpoint_every"):
        from mambascope.scale import parse_every

        parse_every(args.checkpoint_every)
    if getattr(args, "dictionary", None):
        _check_dictionary_flag(args)
    if not 0 < getattr(args, "detector_precision", 0.5) < 1:
        raise ValueError(f"--detector-precision must be between 0 and 1 (exclusive), got {args.detector_precision:g}")
    if hasattr(args, "noise_subject"):
        _check_patch_flags(args)
    if hasattr(args, "shape"):
        _check_train_flags(args)
    if getattr(args, "out", None):
        _check_out_parents(Path(args.out))
    if hasattr(args, "port") and not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    if getattr(args, "device", None):
        from mambascope.models.loading import resolve_device

        resolve_device(args.device)
    if getattr(args, "device_map", None):
        from mambascope.models.loading import check_device_map

        check_device_map(args.device_map)
        if args.device != "auto":
            raise ValueError(f"--device-map {args.device_map} places the model itself; drop --device {args.device}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("--device-map spreads one model over the devices of one process; under torchrun "
                             "each rank holds a whole model on its own GPU: drop --device-map")


def _check_dictionary_flag(args: argparse.Namespace) -> None:
    """--dictionary names a readable dictionary (its hooks are checked against the model once it loads)."""
    from mambascope.features.dictionary import load_dictionary

    if getattr(args, "stream", False):
        raise ValueError("--dictionary: the feature census reads the windows in memory; drop --stream")
    try:
        load_dictionary(args.dictionary)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--dictionary {exc}") from None


def _check_out_parents(out: Path) -> None:
    """--out's existing ancestors must be directories (``--out file/sub`` would fail at mkdir, as File exists)."""
    for parent in reversed(out.parents):
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(f"--out {out}: {parent} is a file, not a directory")


def _check_train_flags(args: argparse.Namespace) -> None:
    """``train-tiny``: the flags that only --task reads are refused without it, rather than ignored."""
    task_only = {"--shape": args.shape, "--min-pairs": args.min_pairs, "--train-queries": args.train_queries,
                 "--warmup": args.warmup, "--reference-init": args.reference_init,
                 "--sinusoidal-positions": args.sinusoidal_positions, "--unit-decay": args.unit_decay,
                 "--eval-every": args.eval_every, "--stop-at": args.stop_at}
    given = [flag for flag, value in task_only.items() if value not in (None, False)]
    if args.task is None and given:
        raise ValueError(f"{given[0]} applies only to a task model: add --task mqar or --task copy, or drop it")
    if args.stop_at is not None and not 0 < args.stop_at <= 1:
        raise ValueError(f"--stop-at must be a held-out accuracy in (0, 1], got {args.stop_at:g}")


def _check_patch_flags(args: argparse.Namespace) -> None:
    """``patch``: the prompts' flags and the unit types, before the model loads (``args.units`` becomes a list)."""
    from mambascope.interventions.patching import unit_type_name

    if (args.corrupt is None) == (args.noise_subject is None):
        raise ValueError("give either --corrupt (a corrupted prompt) or --noise-subject (Gaussian noise on that "
                         "part of --clean), not both or neither")
    if args.noise_subject is not None and args.noise_subject not in args.clean:
        raise ValueError(f"--noise-subject {args.noise_subject!r} does not occur in --clean {args.clean!r}")
    if args.noise_scale <= 0:
        raise ValueError(f"--noise-scale must be positive, got {args.noise_scale:g}")
    if args.units is not None:
        names = [u.strip() for u in args.units.split(",") if u.strip()]
        try:
            args.units = list(dict.fromkeys(unit_type_name(u) for u in names)) or None
        except ValueError as exc:
            raise ValueError(f"--units: {exc}") from None
        if args.units is None:
            raise ValueError("--units is empty: name at least one unit type")
        if "knockout" in args.units and args.direction != "noise":
            raise ValueError("--units knockout removes a token inside the clean run: add --direction noise")
    if args.channels is not None:
        try:
            args.channels = [int(c) for c in args.channels.split(",")]
        except ValueError:
            raise ValueError(f"--channels {args.channels!r}: give comma-separated neuron indices, e.g. 3,17") from None
        if min(args.channels) < 0:
            raise ValueError(f"--channels {min(args.channels)}: neuron indices start at 0")
    if (args.channels is not None) != ("channels" in (args.units or ())):
        raise ValueError("--units channels and --channels go together: --channels lists the neurons patched as "
                         "one unit")
    if (args.dictionary is not None) != ("features" in (args.units or ())):
        raise ValueError("--units features and --dictionary go together: --dictionary names the sparse dictionary "
                         "whose features are patched")
    if args.features is not None:
        if args.dictionary is None:
            raise ValueError("--features lists features of --dictionary: add --units features --dictionary DIR")
        try:
            args.features = tuple(dict.fromkeys(int(c) for c in args.features.split(",")))
        except ValueError:
            raise ValueError(f"--features {args.features!r}: give comma-separated feature indices, e.g. 3,17") \
                from None


def _check_model_flags(args: argparse.Namespace, model, window: bool = True) -> None:
    """The checks that need the loaded model: layer indices and (``window``) the window against its limits."""
    from mambascope.pipeline import check_layers

    for flag in ("layers", "attention_layers"):
        try:
            check_layers(model, getattr(args, flag, None))
        except IndexError as exc:
            raise IndexError(f"--{flag.replace('_', '-')}: {exc}") from None
    if getattr(args, "dictionary", None):  # its hooks and widths against this model, before any tokenization
        from mambascope.features.census import open_dictionary

        args.feature_dictionary = (*open_dictionary(args.dictionary, model), str(Path(args.dictionary).resolve()))
    limit = getattr(model.config, "n_positions", None)  # learned position embeddings end there
    if window and limit is not None and args.window > limit:
        raise ValueError(f"--window {args.window} exceeds the model's maximum length of {limit} tokens")


def _prepare(args: argparse.Namespace):
    """Load corpus, model and windows, checking the model-dependent flags before any tokenization."""
    import torch

    from mambascope.data import load_corpus, tokenize_windows
    from mambascope.models import load_model
    from mambascope.pipeline import model_info

    torch.manual_seed(args.seed)
    if getattr(args, "stream", False):
        return _prepare_stream(args)
    corpus = load_corpus(args.corpus, split=args.split)  # a bad corpus fails before a large model loads
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype,
                                  device_map=getattr(args, "device_map", None))
    _check_model_flags(args, model)
    try:
        windows = tokenize_windows(corpus.texts, tokenizer, args.window, max_tokens=args.max_tokens or None)
    except ValueError as exc:
        raise ValueError(f"--corpus {corpus.name}: {exc}") from None
    info = {"model": model_info(model, args.model),
            "corpus": {"name": corpus.name, "split": corpus.split, "texts": windows.n_texts,
                       "skipped_texts": windows.n_skipped, "short_texts": windows.n_short,
                       "tokens": windows.n_tokens, "windows": windows.n_windows, "window": args.window}}
    return model, tokenizer, windows.ids, info


def _prepare_stream(args: argparse.Namespace):
    """As ``_prepare``, with the corpus streamed: its counts are known only once the census has read it."""
    from mambascope.data.stream import WindowStream, stream_documents
    from mambascope.models import load_model
    from mambascope.pipeline import model_info

    documents = stream_documents(args.corpus, split=args.split)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map)
    _check_model_flags(args, model)
    windows = WindowStream(documents, tokenizer, args.window, max_tokens=args.max_tokens or None)
    info = {"model": model_info(model, args.model),
            "corpus": {"name": args.corpus, "split": args.split, "window": args.window, "streamed": True,
                       "max_tokens": args.max_tokens}}
    return model, tokenizer, windows, info


def _stream_counts(windows) -> dict:
    """What a streamed corpus turned out to hold (after its complete pass)."""
    return {"texts": windows.n_texts, "skipped_texts": windows.n_skipped, "short_texts": windows.n_short,
            "tokens": windows.n_windows * windows.window, "windows": windows.n_windows}


def _claim(args: argparse.Namespace, kind: str):
    from mambascope.results.outputs import OutputDir, marker

    status = (marker(Path(args.out)) or {}).get("status")
    resuming = getattr(args, "resume", False) and status in ("incomplete", "failed")
    if getattr(args, "resume", False) and status == "complete" and not args.overwrite:
        raise FileExistsError(f"--resume: --out {args.out} is a complete output; there is nothing to resume "
                              f"(its results: {Path(args.out) / 'results.json'})")
    return OutputDir(args.out, overwrite=args.overwrite or resuming, kind=kind)


def _check_checkpoints(args: argparse.Namespace, world: int) -> None:
    """Rank 0, holding the output's lock: an unfinished census's checkpoints are continued (--resume), replaced
    (--overwrite) or refused."""
    from mambascope.scale import checkpoint_paths, remove_checkpoints

    found = checkpoint_paths(args.out)
    if not found:
        if args.resume:  # a resumable script may always pass --resume; a mistyped --out must not go unnoticed
            print(f"mambascope: --resume: no checkpoint of --out {args.out}; starting a new census", file=sys.stderr)
        return
    if not args.resume:
        if not args.overwrite:
            raise FileExistsError(f"--out {args.out} has the checkpoint of an unfinished census ({found[0].name}); "
                                  "pass --resume to continue it or --overwrite to start over")
        remove_checkpoints(args.out)
        return
    worlds = {int(p.name.rsplit("-of-", 1)[1]) for p in found if p.name.rsplit("-of-", 1)[1].isdigit()}
    if worlds != {world}:
        raise ValueError(f"--resume: the checkpoint of --out {args.out} was made by {', '.join(map(str, worlds))} "
                         f"process(es), this run has {world}; resume with the same number (torchrun "
                         "--nproc_per_node and --nnodes)")


def _scan_plan(args: argparse.Namespace, ranks, model, windows, info: dict):
    """The census scan of this rank: checkpointed beside --out, resumed with --resume (checked here, before
    any work), with the memory plan of rank 0 or of the checkpoint (``scale.agreed_memory_plan``)."""
    from mambascope.pipeline import split_windows
    from mambascope.scale import (
        Checkpointer,
        ScanPlan,
        agreed_memory_plan,
        checkpoint_path,
        parse_every,
        weights_digest,
    )

    batches, seconds = parse_every(args.checkpoint_every)
    fingerprint = {
        "model": {**{k: v for k, v in info["model"].items() if k != "device"}, "weights_sha256": weights_digest(model)},
        "corpus": {k: info["corpus"].get(k) for k in ("name", "split", "tokens", "windows", "window", "max_tokens")},
        "settings": {"layers": args.layers, "heldout_fraction": args.heldout_fraction}}
    ckpt = Checkpointer(checkpoint_path(args.out, ranks), fingerprint, batches, seconds, resume=args.resume)
    select, _ = split_windows(windows, args.heldout_fraction)
    ckpt.prepare(select, args.batch_size, ranks, model.get_input_embeddings().weight.device)
    memory, resumed = agreed_memory_plan(ranks, None if ckpt.saved is None else ckpt.saved["memory"],
                                         lambda: _memory_plan(args, model, info))
    ckpt.memory = memory.to_json()
    if ranks.main and not args.quiet:
        kept = "--resume: the census continues with its checkpoint's memory plan: " if resumed else ""
        print(f"mambascope: {kept}{memory.describe()}", file=sys.stderr)
    return ScanPlan(ranks, ckpt if batches or seconds or args.resume else None, memory.summaries)


def _memory_plan(args: argparse.Namespace, model, info: dict):
    """Exact or bounded n-gram tables for this census, from --memory-budget (default: ``scale.default_budget``)
    and the corpus size (a stream of unknown length: its file's size in bytes, at least its token count; a
    datasets stream: unbounded)."""
    from mambascope.arch import adapter
    from mambascope.pipeline import census_layers
    from mambascope.scale import default_budget, plan_memory, resident_bytes

    corpus = info["corpus"]
    if not corpus.get("streamed"):
        tokens: float = corpus["tokens"]
    elif args.max_tokens:
        tokens = args.max_tokens
    else:
        path = Path(args.corpus).expanduser()
        tokens = path.stat().st_size if path.suffix.lower() in (".txt", ".jsonl") else math.inf
    ad, width = adapter(model), info["model"]["d_inner"]
    layers, _ = census_layers(model, args.layers)
    ssm = [layer for layer in layers if ad.neuron_kind(layer) in ("mamba", "mamba2")]  # the layers with Δ
    units = 0 if not ssm else width // (ad.mixer_params(ssm[0]).head_dim if ad.neuron_kind(ssm[0]) == "mamba2" else 1)
    budget, note = (default_budget(resident_bytes(model)) if args.memory_budget is None
                    else (args.memory_budget * 2**30, ""))
    return plan_memory(model, len(layers), width, units, tokens=tokens, window=args.window,
                       batch_size=args.batch_size, budget=budget, budget_note=note)


def _keep_finished(out, stages: tuple[str, ...], status: str = "incomplete") -> str | None:
    """After an interrupt (``status`` incomplete) or a failure (failed): which stages had finished and where they
    are (never over an earlier output), or None when none had (then nothing is kept: results.json is written
    before the first stage)."""
    import json

    try:
        incomplete = json.loads((out.staging / "results.json").read_text(encoding="utf-8"))["incomplete"]
    except (OSError, ValueError, KeyError, TypeError):
        incomplete = list(stages)
    finished = [stage for stage in stages if stage not in incomplete]
    if not finished and not out.committed:
        (out.staging / "results.json").unlink(missing_ok=True)  # abandon() then removes the staging folder
    try:
        where = out.abandon(status)
    except OSError as exc:  # the disk that failed the run may refuse the marker too: the stages are still there
        if not (out.staging / "results.json").is_file():
            raise
        return (f"{out.path} is unchanged; finished stages kept in {out.staging / 'results.json'} (its marker "
                f"could not be updated: {exc.strerror or exc})")
    if where is None:
        return None
    if where == out.path:
        return f"finished stages kept in {where / 'results.json'} ({', '.join(finished)})"
    return f"{out.path} is unchanged; finished stages kept in {where / 'results.json'} ({', '.join(finished)})"


def _resume_hint(args: argparse.Namespace, stages: tuple[str, ...]) -> str:
    """How to continue an interrupted census, when its checkpoint is there."""
    from mambascope.scale import checkpoint_paths

    if "census" not in stages or not checkpoint_paths(args.out):
        return ""
    return "; the census checkpoint is kept: rerun with --resume to continue from it"


def _census_options(args: argparse.Namespace) -> dict | None:
    """``LayerCensus`` options from the flags (``census``'s --detector-precision), None for the defaults."""
    precision = getattr(args, "detector_precision", None)
    return None if precision is None else {"min_precision": precision}


def _run(args: argparse.Namespace, stages: tuple[str, ...]) -> int:
    """Under ``torchrun`` every rank runs its share of the census; rank 0 alone claims --out, merges the
    ranks' accumulators, runs the other stages and writes (docs/design.md §9)."""
    from mambascope.scale import close_distributed, init_distributed

    ranks, args.device = init_distributed(args.device)
    try:
        return _run_main(args, stages, ranks) if ranks.main else _run_rank(args, stages, ranks)
    finally:
        close_distributed()


def _run_rank(args: argparse.Namespace, stages: tuple[str, ...], ranks) -> int:
    """A rank other than 0: its share of the census pass, sent to rank 0; nothing written but its checkpoint."""
    from mambascope.pipeline import census_accumulate, split_windows
    from mambascope.scale import scan_function

    args.quiet = True
    _quiet_libraries(True)
    model, tokenizer, windows, info = _prepare(args)
    if "census" in stages:
        plan = _scan_plan(args, ranks, model, windows, info)
        census_accumulate(model, tokenizer, split_windows(windows, args.heldout_fraction)[0], layers=args.layers,
                          batch_size=args.batch_size, progress=False, scan=scan_function(plan),
                          ngram_counters=plan.ngram_counters, census_options=_census_options(args))
    return OK


# `analyze`'s default attention-neuron methods leave out `rollout`: its input, the channel mean of every layer's
# full [L, L] hidden attention, and its faithfulness curves are a third of the stage (docs/design.md §8).
ANALYZE_SKIPS = ("rollout",)
# analyze's token-level test scores half of `attention`'s windows (TOKEN_WINDOWS): its masked forwards are
# half of the stage; 32 windows keep every interval within √2 of the 64-window width
ANALYZE_TOKEN_WINDOWS = 32


def _attention_methods(args: argparse.Namespace, model: Any) -> list[str] | None:
    """``--methods``, or for ``analyze`` without it every method the model supports except ``ANALYZE_SKIPS``."""
    methods = getattr(args, "methods", None)
    if methods is not None or args.command != "analyze":
        return methods
    from mambascope.arch import architecture
    from mambascope.attribution import check_methods

    return [m for m in check_methods(None, architecture(model)) if m not in ANALYZE_SKIPS]


def _whole_model_methods(args: argparse.Namespace, model: Any) -> list[str]:
    """``--whole-model-methods`` (``none``: no method), by default ``DEFAULT_WHOLE_MODEL``'s that the model supports."""
    from mambascope.attribution.faithfulness import DEFAULT_WHOLE_MODEL
    from mambascope.attribution.input_attribution import unavailable

    methods = getattr(args, "whole_model_methods", None)
    if methods is None:
        return [m for m in DEFAULT_WHOLE_MODEL if unavailable(model, m) is None]
    return [] if methods == ["none"] else methods


def _run_main(args: argparse.Namespace, stages: tuple[str, ...], ranks) -> int:
    from mambascope.attribution.faithfulness import TOKEN_WINDOWS
    from mambascope.pipeline import neuron_table, print_analysis_summary, run_analysis
    from mambascope.results import save_results, save_table
    from mambascope.scale import remove_checkpoints, scan_function

    with _claim(args, args.command) as out:
        if "census" in stages:
            _check_checkpoints(args, ranks.world)

        def save(results: dict) -> None:  # after every stage: what an interrupt keeps (results.json last)
            if results["layers"] and not (out.staging / "neurons.parquet").exists():
                save_table(out.staging, neuron_table({"layers": results["layers"]}))
            save_results(out.staging, results)  # per-neuron fields to store/, the rest to results.json

        model, tokenizer, windows, info = _prepare(args)
        plan = _scan_plan(args, ranks, model, windows, info) if "census" in stages else None
        info["processes"] = ranks.world  # that shared the census pass (torchrun); the other stages run here
        try:
            results = run_analysis(
                model, tokenizer, windows, info=info, layers=args.layers, stages=stages,
                attention_layers=getattr(args, "attention_layers", None), methods=_attention_methods(args, model),
                whole_model_methods=_whole_model_methods(args, model),
                token_windows=getattr(args, "token_windows", TOKEN_WINDOWS),
                heldout_fraction=args.heldout_fraction, batch_size=args.batch_size, draws=args.draws,
                seed=args.seed, progress=not args.quiet, save=save,
                scan=None if plan is None else scan_function(plan),
                ngram_counters=None if plan is None else plan.ngram_counters,
                dictionary=getattr(args, "feature_dictionary", None), census_options=_census_options(args))
            if getattr(args, "stream", False) and windows.n_windows is not None:
                results["corpus"].update(_stream_counts(windows))
                save_results(out.staging, results, store=False)
            if args.report:
                _render(results, out.staging, args.debug)
                save_results(out.staging, results, store=False)
        except KeyboardInterrupt:
            kept = _keep_finished(out, stages) or f"no stage had finished; {out.path} is unchanged"
            print(f"mambascope: interrupted; {kept}{_resume_hint(args, stages)}", file=sys.stderr)
            return INTERRUPTED
        except BaseException as exc:
            kept, hint = _keep_finished(out, stages, "failed"), _resume_hint(args, stages)
            if kept is not None and isinstance(exc, Exception):
                exc.kept = kept + hint  # told on the failure's one line (main)
            elif kept is not None or hint:
                print(f"mambascope: {kept or 'no stage had finished'}{hint}", file=sys.stderr)
            raise
        try:
            path = out.commit()
        finally:  # also when Ctrl-C, held during the swap, arrives right after it
            if out.committed and "census" in stages:
                remove_checkpoints(args.out)
    print_analysis_summary(results)
    print(f"results: {path / 'results.json'}")
    if args.report and "report" not in results["errors"]:
        print(f"report:  {path / 'report.html'}")
    return FAILED if results["errors"] else OK


def _render(results: dict, directory: Path, debug: bool = False) -> None:
    """Figures and report.html into ``directory``; a failure is recorded under errors["report"]; a full disk is
    the run's failure (raised)."""
    from mambascope.report import render_report
    from mambascope.results.outputs import DISK_FULL

    try:
        figures = _draw_figures(results, directory / "figures", debug)
        render_report(results, directory, figures)
    except Exception as exc:  # the results stay valid without their report; not on a full disk
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            raise
        results["errors"]["report"] = f"{type(exc).__name__}: {exc}"


def _draw_figures(results: dict, directory: Path, debug: bool):
    """``create_comprehensive_report``, its failed figures told in one line each (--debug: with the traceback;
    the report says which were not drawn and why), and a full disk raised as the failure it is."""
    import logging

    from mambascope.report import create_comprehensive_report
    from mambascope.results.outputs import DISK_FULL

    failed: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = failed.append  # type: ignore[method-assign]
    log = logging.getLogger("mambascope.report")
    log.addHandler(handler)
    propagate, log.propagate = log.propagate, False
    try:
        figures = create_comprehensive_report(results, directory)
    finally:
        log.removeHandler(handler)
        log.propagate = propagate
    for record in failed:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            raise exc
        print(f"mambascope: {record.getMessage()}" + (f" ({type(exc).__name__}: {exc})" if exc else ""),
              file=sys.stderr)
        if debug and record.exc_info:
            traceback.print_exception(*record.exc_info)
    return figures


def _cmd_report(args: argparse.Namespace) -> int:
    """Re-render into a scratch folder inside DIR, then swap figures/ and report.html in (results.json untouched),
    holding DIR's lock from before the results are read until the swap is done."""
    from mambascope.report import render_report
    from mambascope.results import open_results
    from mambascope.results.layout import read_results_file
    from mambascope.results.outputs import OutputLock, check_figures_folder, recover_report, swap_in_report

    target = Path(args.directory)
    if not target.exists():
        read_results_file(target)  # its one-line error: nothing there to lock or read
    directory = target if target.is_dir() else target.parent
    lock = OutputLock(directory, flag="report")
    try:
        recover_report(directory)
        check_figures_folder(directory)
        # The neuron pages' detail is read from the store as the report embeds it, never all at once.
        results, store = open_results(target)  # older results.json: everything inline, no store
        if store is not None:
            store.verify()  # a truncated store file: one line naming it, before any figure is drawn
        try:
            scratch = Path(tempfile.mkdtemp(prefix=".report-", dir=directory))
        except OSError as exc:
            raise PermissionError(f"cannot write the report into {directory}: {exc.strerror or exc}") from None
        try:
            figures = _draw_figures(results, scratch / "figures", args.debug)
            render_report(results, scratch, figures, store=store)
            swap_in_report(directory, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    finally:
        lock.release()
    print(f"report: {directory / 'report.html'}")
    return OK


def _cmd_serve(args: argparse.Namespace) -> int:
    """Serve DIR until Ctrl-C / SIGTERM: exit 0, since stopping the server is how a serve session ends and
    nothing is left unfinished (uvicorn shuts down gracefully, then re-raises the signal, caught here)."""
    from mambascope.serve.server import is_local

    if args.model and args.no_model:
        raise ValueError("--model and --no-model exclude each other")
    local = is_local(args.host)
    if not local:
        print(f"mambascope: warning: serving on {args.host}, not only this machine: anyone who can reach it can "
              "read this output and run the model on their text (no authentication)", file=sys.stderr)
    from mambascope.serve import LOCAL_HOSTS, create_app
    from mambascope.serve.app import open_output
    from mambascope.serve.server import bind, run

    open_output(args.directory)  # DIR checked before the port and the model
    sock = bind(args.host, args.port)
    try:
        app = create_app(args.directory, model=args.model, live=not args.no_model, device=args.device,
                         allowed_hosts=LOCAL_HOSTS if local else ("*",))
        live = app.state.explorer.live_state()
        print(f"mambascope: live traces: {live['model'] if live['available'] else 'off: ' + live['reason']}",
              file=sys.stderr)
        run(app, sock, quiet=args.quiet)
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    print("mambascope: server stopped", file=sys.stderr)
    return OK


def _cmd_analyze(args: argparse.Namespace) -> int:
    return _run(args, ("census", "interventions", "attention_neurons"))


def _cmd_census(args: argparse.Namespace) -> int:
    stages = ("census", *(("features",) if args.dictionary else ()), *(() if args.no_ablation else ("interventions",)))
    return _run(args, stages)


def _cmd_attention(args: argparse.Namespace) -> int:
    if args.task is not None:
        return _run_ground_truth(args)
    return _run(args, ("attention_neurons",))


def _run_ground_truth(args: argparse.Namespace) -> int:
    """``attention --task``: attribution accuracy against the task's ground truth (docs/methods.md)."""
    import time

    import torch

    from mambascope.attribution.ground_truth import print_ground_truth, run_ground_truth, task_settings
    from mambascope.models import BUNDLED, bundled_path, load_model
    from mambascope.pipeline import model_info

    torch.manual_seed(args.seed)
    with _claim(args, "ground_truth") as out:
        model, _ = load_model(args.model, device=args.device, dtype=args.dtype)
        settings = task_settings(bundled_path(args.model) if args.model in BUNDLED else args.model)
        if settings["task"] != args.task:
            raise ValueError(f"--task {args.task}: {args.model} was trained on {settings['task']!r}")
        _check_model_flags(args, model, window=False)  # a task model's length is the task's
        start = time.perf_counter()
        truth = run_ground_truth(model, settings, n_queries=args.queries, layers=args.layers, methods=args.methods,
                                 seed=args.seed, whole_model=_whole_model_methods(args, model))
        corpus = {"name": f"task:{args.task}", "split": "held-out", "windows": truth["n_queries"],
                  "window": truth["seq_len"], "tokens": truth["n_queries"] * truth["seq_len"]}
        path, results = _commit_section(args, out, model_info(model, args.model), corpus, "ground_truth", truth,
                                        time.perf_counter() - start)
    print_ground_truth(truth)
    print(f"results: {path / 'results.json'}")
    return FAILED if results["errors"] else OK


def _commit_section(args: argparse.Namespace, out: Any, model: dict, corpus: dict, key: str, section: dict,
                    seconds: float) -> tuple[Path, dict]:
    """The results of a one-section command (``attention --task``, ``leaderboard``): results.json with the
    section under ``key`` and its failures named in ``errors``, the report, then the output swapped in."""
    from mambascope.results import save_json

    results = {"model": model, "corpus": corpus, key: section,
               "errors": {f"{key}: {m}": r for m, r in section["errors"].items()},
               "timings": {key: round(seconds, 3)}, "incomplete": []}
    if args.report:
        _render(results, out.staging, args.debug)
    save_json(out.file("results.json"), results)
    return out.commit(), results


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    """Every attribution method on every task model against ground truth, and ΔA^F on the language models
    (docs/methods.md, "The leaderboard")."""
    import time

    import torch

    from mambascope.attribution.input_attribution import BASELINES, Settings
    from mambascope.attribution.leaderboard import check_models, print_leaderboard, run_leaderboard

    _at_least(args, "--flip-positions", 2)
    _at_least(args, "--ig-steps", 1)
    if args.baseline not in BASELINES:
        raise ValueError(f"--baseline {args.baseline!r}: choose from {', '.join(BASELINES)}")
    check_models(args.models, args.lm_models)
    torch.manual_seed(args.seed)
    with _claim(args, "leaderboard") as out:
        start = time.perf_counter()
        say = (lambda _msg: None) if args.quiet else (lambda msg: print(f"mambascope: {msg}", file=sys.stderr))
        board = run_leaderboard(args.models, args.lm_models, n_queries=args.queries, n_positions=args.flip_positions,
                                seed=args.seed, settings=Settings(ig_steps=args.ig_steps, baseline=args.baseline),
                                progress=say)
        names = [*board["models"], *board["flipping"]]
        path, results = _commit_section(
            args, out, {"name": f"leaderboard: {', '.join(names)}", "arch": "several"},
            {"name": "task held-out examples; builtin (validation) for ΔA^F", "split": "held-out"},
            "leaderboard", board, time.perf_counter() - start)
    print_leaderboard(board)
    print(f"results: {path / 'results.json'}")
    return FAILED if results["errors"] else OK


def _cmd_patch(args: argparse.Namespace) -> int:
    """Activation patching of one prompt pair (docs/patching.md): grids, attribution estimates, heatmaps."""
    from mambascope.interventions.patching import grid_rows
    from mambascope.interventions.prompts import patch_prompts, prompt_pair
    from mambascope.models import load_model
    from mambascope.pipeline import model_info
    from mambascope.report.patching_plots import print_patching
    from mambascope.results import save_json

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    pair = prompt_pair(tokenizer, args.clean, args.corrupt, args.target, args.corrupt_target, args.noise_subject)
    units = args.units or _default_units(model)
    dictionary = None
    if args.dictionary is not None:  # its hooks and widths against the model, before --out
        from mambascope.features.census import open_dictionary
        from mambascope.interventions.patching import Dictionary

        dictionary = Dictionary(*open_dictionary(args.dictionary, model), args.features)
    rows = grid_rows(model, units, channels=args.channels, dictionary=dictionary)  # fails before --out
    _patch_estimate(args, model, pair, rows)
    with _claim(args, "patching") as out:
        patching, timings, errors = patch_prompts(
            model, tokenizer, pair, unit_types=units, metric=args.metric, direction=args.direction,
            channels=args.channels, noise_scale=args.noise_scale, seed=args.seed, batch_size=args.batch_size,
            dictionary=dictionary,
            progress=not args.quiet)
        n = 1 if pair.corrupt_ids is None else 2
        results = {"model": model_info(model, args.model),
                   "corpus": {"name": "prompts", "split": None, "texts": n, "tokens": n * len(pair.clean_ids)},
                   "patching": {"model": args.model, **patching}, "errors": errors,
                   "timings": {k: round(v, 3) for k, v in timings.items()}, "incomplete": []}
        if args.report:
            _render(results, out.staging, args.debug)
        save_json(out.file("results.json"), results)
        path = out.commit()
    print_patching(results["patching"])
    for name, reason in results["errors"].items():
        print(f"FAILED {name}: {reason}", file=sys.stderr)
    print(f"results: {path / 'results.json'}")
    return FAILED if results["errors"] else OK


def _patch_estimate(args: argparse.Namespace, model, pair, rows: dict) -> None:
    """Say how many patches ``patch`` will run before it starts: the grid grows as units x positions, so a long
    prompt takes hours.  From LONG_PATCH_RUN patches on, also with --quiet, with a time estimate from one
    timed forward pass of a full batch (a warning only: the user asked for this grid, and Ctrl-C now costs
    nothing)."""
    import time

    import torch

    from mambascope.trace import trace

    units, positions = sum(len(r) for r in rows.values()), len(pair.clean_ids)
    patches = units * positions
    passes = -(-patches // args.batch_size)
    long = patches >= LONG_PATCH_RUN
    if args.quiet and not long:
        return
    line = (f"mambascope: patch: {patches:,} patches ({units} units x {positions} positions) in {passes:,} "
            f"forward passes of up to {args.batch_size}")
    if long:
        ids = torch.tensor([pair.clean_ids], device=model.get_input_embeddings().weight.device)
        start = time.perf_counter()
        trace(model, ids.expand(min(args.batch_size, patches), -1), names=[])
        seconds = (time.perf_counter() - start) * passes
        line += f": about {seconds / 3600:.1f} h" if seconds >= 3600 else f": about {seconds / 60:.1f} min"
    print(line, file=sys.stderr)


def _check_attribute_flags(args: argparse.Namespace) -> None:
    """``attribute``: the flags that need no model (``args.attribute_methods`` becomes the validated list)."""
    from mambascope.attribution.input_attribution import BASELINES, check_token_methods

    if not args.text.strip():
        raise ValueError("--text is empty: give the text whose next-token prediction should be explained")
    for flag, value in (("--ig-steps", args.ig_steps), ("--top", args.top)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if args.baseline not in BASELINES:
        raise ValueError(f"--baseline {args.baseline!r}: choose from {', '.join(BASELINES)}")
    if args.attribute_methods is not None:
        try:
            args.attribute_methods = check_token_methods(args.attribute_methods)
        except ValueError as exc:
            raise ValueError(f"--methods: {exc}") from None


def _cmd_attribute(args: argparse.Namespace) -> int:
    """Per-token relevance of one prediction by every method (docs/methods.md, "Token relevance of one prediction")."""
    import torch

    from mambascope.attribution.input_attribution import Settings, explain_prediction, unavailable
    from mambascope.interventions.prompts import single_token, tokens
    from mambascope.models import BUNDLED, load_model
    from mambascope.models.loading import load_tokenizer
    from mambascope.pipeline import model_info
    from mambascope.report.attribute_plots import print_attribution
    from mambascope.results import save_json
    from mambascope.trace import check_inputs

    _check_attribute_flags(args)
    # the text and the target are checked against the tokenizer before a model loads, where it is local
    local = args.model in BUNDLED or Path(args.model).expanduser().is_dir()
    tokenizer = load_tokenizer(args.model) if local else None

    def prediction(tok):
        ids = tok(args.text).input_ids
        if not ids:
            raise ValueError(f"--text {args.text!r} gives no tokens")
        if not -len(ids) <= args.position < len(ids):
            raise IndexError(f"--position {args.position} is outside the {len(ids)}-token --text")
        return ids, None if args.target is None else single_token(tok, args.target, "--target")

    if tokenizer is not None:
        prediction(tokenizer)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    ids, target = prediction(tokenizer)
    check_inputs(model, torch.tensor([ids]))
    for method in args.attribute_methods or ():
        reason = unavailable(model, method)
        if reason:
            raise ValueError(f"--methods {method}: {reason}")
    with _claim(args, "attribution") as out:
        attribution = explain_prediction(model, ids, args.position, target, args.attribute_methods,
                                         Settings(ig_steps=args.ig_steps, baseline=args.baseline))
        attribution["target"]["token"] = tokenizer.decode([attribution["target"]["id"]])
        attribution = {"text": args.text, "tokens": tokens(tokenizer, ids), **attribution}
        errors = {f"attribution: {m}": r for m, r in attribution["errors"].items()}
        results = {"model": model_info(model, args.model),
                   "corpus": {"name": "text", "split": None, "texts": 1, "tokens": len(ids)},
                   "attribution": attribution, "errors": errors,
                   "timings": {"attribution": round(sum(attribution["timings"].values()), 3)}, "incomplete": []}
        if args.report:
            _render(results, out.staging, args.debug)
        save_json(out.file("results.json"), results)
        path = out.commit()
    print_attribution(results["attribution"], k=args.top)
    print(f"results: {path / 'results.json'}")
    return FAILED if results["errors"] else OK


def _default_units(model) -> list[str]:
    """The default unit types of ``patch``: those of the residual stream, the parts' outputs, the neurons and
    the SSM state that the model has."""
    from mambascope.interventions.patching import DEFAULT_UNITS, grid_rows

    available = []
    for unit in DEFAULT_UNITS:
        try:
            grid_rows(model, [unit])
        except ValueError:
            continue
        available.append(unit)
    return available


def _cmd_compare(args: argparse.Namespace) -> int:
    from mambascope.compare import compare_models, comparison_table
    from mambascope.data import load_corpus
    from mambascope.models.loading import check_checkpoint, position_limit
    from mambascope.report.compare_plots import plot_comparison
    from mambascope.report.html import render_comparison_report
    from mambascope.results import save_json, save_table

    if len(args.models) < 2:
        raise ValueError("--models: compare needs at least two models")
    for name in args.models:
        check_checkpoint(name)
        limit = position_limit(name)
        if limit is not None and args.window > limit:
            raise ValueError(f"--window {args.window} exceeds the maximum length of {name}, {limit} tokens")
    corpus = load_corpus(args.corpus, split=args.split)
    with _claim(args, "comparison") as out:
        comparison = compare_models(args.models, corpus.texts, window=args.window, max_tokens=args.max_tokens or None,
                                    device=args.device, batch_size=args.batch_size, progress=not args.quiet)
        comparison["corpus"] = {"name": corpus.name, "split": corpus.split, "texts": len(corpus.texts)}
        figures = plot_comparison(comparison, out.figures)
        comparison["figures"] = {k: (v.name if hasattr(v, "name") else f"skipped: {v}") for k, v in figures.items()}
        save_json(out.file("comparison.json"), comparison)
        save_table(out.staging, comparison_table(comparison), "comparison")
        render_comparison_report(comparison, out.staging, figures)
        path = out.commit()
    table = comparison_table(comparison)
    columns = ["model", "layer", "layer_kind", "depth", "pct_dead", "pct_positional", "token_detectors",
               "mean_dt_selectivity", "entropy", "sink_mass"]
    print(table[[c for c in columns if c in table]].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    for name, reason in comparison["errors"].items():
        print(f"FAILED {name}: {reason}", file=sys.stderr)
    print(f"comparison: {path / 'comparison.json'}")
    return FAILED if comparison["errors"] else OK


def _shape_overrides(items: list[str] | None) -> dict[str, int | float]:
    """``--shape hidden_size=128 initializer_range=0.05`` as config overrides (numbers)."""
    overrides: dict[str, int | float] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            overrides[key] = int(value) if value.lstrip("-").isdigit() else _finite(value)
        except argparse.ArgumentTypeError:
            sep = ""
        if not sep:
            raise ValueError(f"--shape {item!r}: expected KEY=NUMBER (a finite number), e.g. hidden_size=128")
    return overrides


def _cmd_train_tiny(args: argparse.Namespace) -> int:
    from mambascope.models import train_tiny

    if args.tokenizer is not None and not (Path(args.tokenizer) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"--tokenizer {args.tokenizer}: no tokenizer.json there; give a directory saved "
                                "by a tokenizer's save_pretrained (e.g. a bundled model's)")
    with _claim(args, "model") as out:
        if args.task is not None:
            from mambascope.models.train_task import train_task

            stats = train_task(args.arch, args.task, out.staging, seq_len=args.seq_len, num_pairs=args.num_pairs,
                               steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                               device=args.device, num_threads=args.threads, min_pairs=args.min_pairs,
                               curriculum=args.curriculum, reference_init=args.reference_init,
                               sinusoidal_positions=args.sinusoidal_positions, train_queries=args.train_queries,
                               unit_decay=args.unit_decay, eval_every=args.eval_every, stop_at=args.stop_at,
                               weight_decay=args.weight_decay, warmup=args.warmup,
                               config_overrides=_shape_overrides(args.shape))
        else:
            stats = train_tiny(args.arch, out.staging, steps=args.steps, batch_size=args.batch_size,
                               seq_len=args.seq_len, lr=args.lr, seed=args.seed, device=args.device,
                               tokenizer=args.tokenizer, num_threads=args.threads)
        path = out.commit()
    if args.task is not None:
        print(f"saved {args.arch} {args.task} model to {path}: held-out query accuracy "
              f"{stats['heldout_query_accuracy']:.4f} on {stats['heldout_queries']} queries")
        return OK
    print(f"saved {args.arch} to {path}: held-out loss {stats['val_loss']:.3f} nats/token "
          f"(unigram {stats['unigram_loss']:.3f})")
    return OK


def _check_steer_flags(args: argparse.Namespace) -> None:
    """``steer``: everything that needs no model (``args.unit``, ``args.feature``, ``args.positions`` parsed)."""

    from mambascope.trace.generate import MAX_NEW_TOKENS, dictionary_direction, parse_positions

    if not args.prompt.strip():
        raise ValueError("--prompt is empty: give the text to continue")
    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"--max-new-tokens must be in 1..{MAX_NEW_TOKENS}, got {args.max_new_tokens}")
    if args.temperature <= 0:  # finite already (_finite)
        raise ValueError(f"--temperature must be a positive number, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    if args.positions is not None:
        args.positions = parse_positions(args.positions)
    spec = args.unit if args.unit is not None else args.feature
    flag = "--unit" if args.unit is not None else "--feature"
    where, sep, index = spec.rpartition(":")
    try:
        index = int(index)
    except ValueError:
        index = -1
    if not sep or not where or index < 0:
        raise ValueError(f"{flag} {spec!r}: give {'LAYER:NEURON' if flag == '--unit' else 'DIR:FEATURE'}, e.g. "
                         f"{'2:17' if flag == '--unit' else 'sae-out:5'}, with non-negative indices")
    if args.unit is not None:
        if not where.isdigit():
            raise ValueError(f"--unit {spec!r}: the layer must be a non-negative integer")
        args.unit = (int(where), index)
    else:
        if args.mode == "set":
            raise ValueError("--mode set clamps a neuron (--unit); a feature is steered by adding its decoder "
                             "direction (--mode add)")
        args.feature = (*dictionary_direction(where, index), index)


def _steer_edit(args: argparse.Namespace, model) -> tuple[str, str, object]:
    """(hook name, a label, the edit) of ``steer``'s --unit or --feature, checked against the model."""
    from mambascope.arch import adapter
    from mambascope.trace import all_names
    from mambascope.trace.generate import Steer, neuron_steering

    ad = adapter(model)
    if args.unit is not None:
        layer, neuron = args.unit
        try:
            hook, direction = neuron_steering(model, layer, neuron)
        except (ValueError, IndexError) as exc:
            raise type(exc)(f"--unit {layer}:{neuron}: {exc}") from None
        label = f"neuron {neuron}"
    else:
        hook, direction, feature = args.feature
        names = all_names([ad.units(layer) for layer in range(ad.n_layers)])
        if hook not in names:
            raise ValueError(f"--feature: the dictionary's hook_name {hook!r} is not a unit of this "
                             f"{ad.model_type} model")
        label = f"feature {feature}"
    return hook, label, Steer(direction, args.scale, args.positions, args.mode)


def _columns(left: str, right: str, titles: tuple[str, str]) -> list[str]:
    """Two texts wrapped side by side to the terminal's width; control characters escaped."""
    import textwrap

    width = max(20, (shutil.get_terminal_size().columns - 3) // 2)

    def lines(text: str) -> list[str]:
        shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
        return textwrap.wrap(shown, width, replace_whitespace=False, drop_whitespace=False) or [""]

    a, b = lines(left), lines(right)
    rows = [(titles[0], titles[1]), ("-" * width, "-" * width)]
    rows += [(a[i] if i < len(a) else "", b[i] if i < len(b) else "") for i in range(max(len(a), len(b)))]
    return [f"{x:<{width}} | {y}" for x, y in rows]


def _cmd_steer(args: argparse.Namespace) -> int:
    """Generate from --prompt with and without one neuron or feature steered; print both side by side."""
    import contextlib

    import torch

    from mambascope.models import load_model
    from mambascope.results import save_json
    from mambascope.trace import trace
    from mambascope.trace.generate import check_generate, steered_pair

    _check_steer_flags(args)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    ids = torch.tensor([tokenizer.encode(args.prompt)])
    check_generate(model, args.max_new_tokens, args.temperature, args.top_k, ids.shape[1])
    hook, label, edit = _steer_edit(args, model)
    width = trace(model, ids, names=[hook])[hook].shape[-1]
    if edit.direction.shape[0] != width:
        raise ValueError(f"--feature: the dictionary's d_in is {edit.direction.shape[0]}, but {hook} has {width} "
                         "channels")
    # --out is claimed before the generation, so that an existing output is refused before any work
    with _claim(args, "steer") if args.out is not None else contextlib.nullcontext() as out:
        settings = {"do_sample": args.sample, "temperature": args.temperature, "top_k": args.top_k, "seed": args.seed}
        runs = steered_pair(model, ids, hook, edit, args.max_new_tokens, **settings)
        new = {name: tokens[0].tolist() for name, tokens in runs.items()}
        texts = {name: tokenizer.decode(tokens) for name, tokens in new.items()}
        verb = "+" if args.mode == "add" else "set to "
        where = "every position" if args.positions is None else "positions " + ",".join(
            f"{lo}:{'' if hi is None else hi}" if hi != lo + 1 else str(lo) for lo, hi in args.positions)
        print(f"{args.model}: {hook} {label}, {verb}{args.scale:g} at {where}; "
              f"{'sampled' if args.sample else 'greedy'}, {args.max_new_tokens} new tokens")
        print(f"prompt: {args.prompt!r}")
        print("\n".join(_columns(texts["unsteered"], texts["steered"], ("unsteered", f"steered ({label})"))))
        if out is None:
            return OK
        record = {"model": args.model, "prompt": args.prompt, "prompt_ids": ids[0].tolist(), "hook_name": hook,
                  "unit": label, "mode": args.mode, "scale": args.scale,
                  "positions": None if args.positions is None else [list(r) for r in args.positions],
                  "max_new_tokens": args.max_new_tokens, **settings,
                  "tokens": new, "texts": texts}
        save_json(out.file("steer.json"), record)
        path = out.commit()
    print(f"results: {path / 'steer.json'}")
    return OK


def _sae_config(args: argparse.Namespace):
    """``sae``: the training flags as a TrainConfig, and every check that needs no model."""
    from mambascope.features.dictionary import split_hook
    from mambascope.features.train import TrainConfig, check_config

    if args.hook is not None:
        split_hook(args.hook)
    if args.input_hook is not None:
        if args.kind != "transcoder":
            raise ValueError("--input-hook is the input of a transcoder: add --kind transcoder or drop it")
        split_hook(args.input_hook, "--input-hook")
    if (args.latents is not None and args.latents < 1) or (args.expansion is not None and args.expansion <= 0):
        raise ValueError("--latents and --expansion must be positive")
    if args.k < 1:
        raise ValueError(f"--k must be at least 1, got {args.k}")
    if args.latents is not None and args.k > args.latents:
        raise ValueError(f"--k {args.k} must be at most --latents ({args.latents})")
    if args.eval_windows < 1:
        raise ValueError(f"--eval-windows must be positive, got {args.eval_windows}")
    cfg = TrainConfig(tokens=args.tokens, batch_tokens=args.batch_tokens, buffer_tokens=args.buffer_tokens,
                      lr=args.lr, auxk_alpha=args.auxk_alpha, dead_after=args.dead_after,
                      window_batch=args.batch_size, seed=args.seed)
    check_config(cfg)
    return cfg


def _cmd_sae(args: argparse.Namespace) -> int:
    """``sae``: train a sparse dictionary on one traced unit, evaluate it held out, save it for SAELens."""
    from mambascope.data.stream import WindowStream, stream_documents
    from mambascope.features.run import make_spec, summary_lines, train_and_evaluate
    from mambascope.features.train import checkpoint_dir, load_checkpoint
    from mambascope.models import load_model
    from mambascope.pipeline import model_info
    from mambascope.results import save_json

    cfg = _sae_config(args)
    checkpoint = checkpoint_dir(args.out)
    with _claim(args, "dictionary") as out:
        if checkpoint.exists() and not args.resume:
            if not args.overwrite:
                raise FileExistsError(f"--out {args.out} has the checkpoint of an unfinished training ({checkpoint}); "
                                      "pass --resume to continue it or --overwrite to start over")
            shutil.rmtree(checkpoint)
        documents = stream_documents(args.corpus, split=args.split)  # a bad corpus fails before the model loads
        model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
        _check_model_flags(args, model)
        spec = make_spec(model, args.model, args.kind, args.hook, args.input_hook, args.latents,
                         args.expansion if args.latents is None else None, args.k)
        state = None
        if args.resume:
            if (checkpoint / "state.json").is_file():
                state = load_checkpoint(checkpoint, spec, cfg)
                print(f"mambascope: resuming from step {state.step} of {cfg.steps}", file=sys.stderr)
            else:
                print(f"mambascope: --resume: no checkpoint of --out {args.out}; starting a new training",
                      file=sys.stderr)
        stream = WindowStream(documents, tokenizer, args.window)
        info = {"model": model_info(model, args.model),
                "corpus": {"name": args.corpus, "split": args.split, "window": args.window, "streamed": True,
                           "heldout_fraction": args.heldout_fraction}}
        try:
            results = train_and_evaluate(model, spec, cfg, stream, heldout_fraction=args.heldout_fraction,
                                         eval_windows=args.eval_windows, out_dir=out.staging, checkpoint=checkpoint,
                                         state=state, progress=not args.quiet, info=info)
        except KeyboardInterrupt:
            if (checkpoint / "state.json").is_file():
                print(f"mambascope: the training state is kept in {checkpoint}; rerun with --resume to continue",
                      file=sys.stderr)
            raise
        save_json(out.file("results.json"), results)
        path = out.commit()
    shutil.rmtree(checkpoint, ignore_errors=True)
    for line in summary_lines(results):
        print(line)
    print(f"dictionary: {path} (cfg.json, sae_weights.safetensors, results.json)")
    return FAILED if results["errors"] else OK


def _add_token_level_args(p: argparse.ArgumentParser, token_windows: int) -> None:
    """The token-level faithfulness test's flags: which whole-model methods join it, on how many windows."""
    from mambascope.attribution.faithfulness import DEFAULT_WHOLE_MODEL
    from mambascope.attribution.input_attribution import WHOLE_MODEL_METHODS

    p.add_argument("--token-windows", type=int, default=token_windows, metavar="N",
                   help="held-out windows scored by the token-level faithfulness test (default: %(default)s)")

    p.add_argument("--whole-model-methods", nargs="+", default=None, metavar="METHOD",
                   help="whole-model token attributions scored beside the attention-neuron methods (token-level "
                   f"faithfulness; with --task, against the ground truth), of {', '.join(WHOLE_MODEL_METHODS)}, or "
                   f"none (default: {' '.join(DEFAULT_WHOLE_MODEL)} where the model supports them; "
                   "integrated_gradients, occlusion and knockout cost 10-60x more a window: name them to add them)")


def build_parser() -> argparse.ArgumentParser:
    from mambascope.attribution.faithfulness import TOKEN_WINDOWS
    from mambascope.models.train import ARCHS as TRAIN_ARCHS

    parser = _Parser(prog="mambascope", description="Neuron-level interpretability of Mamba models.",
                                     epilog="exit codes: 0 ok, 1 a stage failed, 2 bad input, 130 interrupted")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    common = [_common_args()]

    p = sub.add_parser("analyze", parents=common, help="every analysis on one model and corpus, with report")
    _add_model_args(p)
    _add_corpus_args(p)
    _add_run_args(p, "mambascope-out")
    p.add_argument("--attention-layers", type=int, nargs="+", default=None,
                   help="layers for attention neurons (default: as --layers)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="attention-neuron methods (default: all but rollout, which costs a third of the stage; "
                        "name it to include it)")
    _add_token_level_args(p, ANALYZE_TOKEN_WINDOWS)
    _add_scale_args(p)
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("census", parents=common, help="dead, rare, positional, detector, Δ neurons; ablation")
    _add_model_args(p)
    _add_corpus_args(p)
    _add_run_args(p, "mambascope-census")
    p.add_argument("--no-ablation", action="store_true", help="skip ablation and pruning")
    p.add_argument("--dictionary", default=None, metavar="DIR",
                   help="also census the features of this sparse dictionary (a mambascope sae output) on the same "
                   "windows, and compare them with the neurons of its layer (docs/features.md)")
    p.add_argument("--detector-precision", type=_finite, default=0.95, metavar="P",
                   help="a token detector's triggers fire it on at least this share of their occurrences, for "
                   "neurons and features alike (default: %(default)s, Voita et al. 2023)")
    _add_scale_args(p)
    p.set_defaults(func=_cmd_census)

    p = sub.add_parser("attention", parents=common, help="hidden attention, attention neurons, faithfulness")
    _add_model_args(p)
    _add_corpus_args(p)
    _add_run_args(p, "mambascope-attention")
    p.add_argument("--methods", nargs="+", default=None, help="attention-neuron methods (default: all)")
    p.add_argument("--task", default=None, choices=["mqar", "copy"],
                   help="score the methods against the ground truth of a task model (train-tiny --task)")
    p.add_argument("--queries", type=int, default=512, help="held-out queries for --task (default: %(default)s)")
    _add_token_level_args(p, TOKEN_WINDOWS)
    p.set_defaults(func=_cmd_attention)

    p = sub.add_parser("leaderboard", parents=common,
                       help="every attribution method on every task model against ground truth; ΔA^F")
    _add_leaderboard_args(p)
    p.set_defaults(func=_cmd_leaderboard)

    p = sub.add_parser("report", parents=common, help="re-render figures and report.html from a results directory")
    p.add_argument("directory", help="a directory holding results.json")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("serve", parents=common, help="browse the neurons of an output directory in a local web app")
    p.add_argument("directory", help="an output directory of mambascope analyze (with results.json and store/)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only; another address prints a "
                        "warning: the app has no authentication)")
    p.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (default: %(default)s)")
    p.add_argument("--model", default=None,
                   help="model for live traces (default: the one named in results.json)")
    p.add_argument("--no-model", action="store_true", help="serve without live traces (no model loaded)")
    p.add_argument("--device", default="cpu", help="device of the live model: cpu, cuda, cuda:N or auto "
                   "(default: %(default)s)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("compare", parents=common, help="the same census and attention statistics across models")
    p.add_argument("--models", nargs="+", default=["tiny-mamba", "tiny-mamba2", "tiny-gpt"],
                   help="bundled names, local directories or hub ids (default: %(default)s)")
    p.add_argument("--device", default="auto")
    _add_corpus_args(p)
    _add_out_args(p, "mambascope-compare")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("patch", parents=common, help="activation patching / causal tracing of one prompt pair")
    _add_patch_args(p)
    p.set_defaults(func=_cmd_patch)

    p = sub.add_parser("attribute", parents=common, help="per-token relevance of one prediction, by every method")
    _add_attribute_args(p)
    p.set_defaults(func=_cmd_attribute)

    p = sub.add_parser("train-tiny", parents=common, help="train a bundled-size model on the built-in corpus")
    p.add_argument("--arch", required=True, choices=TRAIN_ARCHS)
    _add_out_args(p, None)
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=_finite, default=4e-3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--tokenizer", default=None, help="reuse this tokenizer directory instead of training one")
    p.add_argument("--task", default=None, choices=["mqar", "copy"],
                   help="train on a synthetic task (mambascope.data.tasks) instead of the corpus")
    p.add_argument("--num-pairs", type=int, default=8, help="MQAR key-value pairs per example (default: %(default)s)")
    p.add_argument("--min-pairs", type=int, default=None,
                   help="--task mqar: train on every pair count from this to --num-pairs, mixed in each batch")
    p.add_argument("--curriculum", default="mix", choices=["mix", "grow"],
                   help="with --min-pairs: mix the pair counts in each batch, or grow from --min-pairs as each is "
                        "learnt (default: %(default)s)")
    p.add_argument("--reference-init", action="store_true",
                   help="--task, Mamba: initialise the mixers' in_proj/x_proj as the reference mamba_ssm code does")
    p.add_argument("--sinusoidal-positions", action="store_true",
                   help="--task, GPT-2: start the learned position embeddings as sinusoids")
    p.add_argument("--train-queries", type=int, default=None,
                   help="--task mqar: queries per training example (default: one per pair; held-out: one per pair)")
    p.add_argument("--unit-decay", action="store_true",
                   help="--task, Mamba-1: start every state dimension at A = -1 instead of S4D-real -(1..N)")
    p.add_argument("--weight-decay", type=_finite, default=0.1, help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of --steps)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="--task: measure held-out accuracy and save a checkpoint to --out every N steps "
                        "(default: --steps / 6)")
    p.add_argument("--stop-at", type=_finite, default=None, metavar="ACCURACY",
                   help="--task: stop at the first evaluation whose held-out accuracy reaches this (e.g. 0.95)")
    p.add_argument("--shape", nargs="+", default=None, metavar="KEY=NUMBER",
                   help="--task: override config fields, e.g. hidden_size=128 initializer_range=0.05 "
                        "(train_task.TASK_SHAPES)")
    p.set_defaults(func=_cmd_train_tiny)

    p = sub.add_parser("steer", parents=common, help="generate with one neuron or dictionary feature steered, "
                       "beside the unsteered text")
    _add_steer_args(p)
    p.set_defaults(func=_cmd_steer)


    p = sub.add_parser("sae", parents=common, help="train a sparse dictionary (TopK SAE or transcoder) on one unit")
    _add_sae_args(p)
    p.set_defaults(func=_cmd_sae)
    return parser


def _add_sae_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--hook", default=None, help="the unit: blocks.L.UNIT or UNIT for the middle layer (default: "
                   "mixer.hook_post, the neuron; with --kind transcoder: hook_mixer_out, the transcoder's output)")
    p.add_argument("--input-hook", default=None, help="--kind transcoder: its input, earlier in the same layer "
                   "(default: blocks.L.hook_resid_pre)")
    p.add_argument("--kind", default="topk", choices=["topk", "transcoder"])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--latents", type=int, default=None, help="number of latents d_sae")
    size.add_argument("--expansion", type=_finite, default=8.0, help="d_sae = expansion x input width (default: "
                      "%(default)s)")
    p.add_argument("--k", type=int, default=32, help="active latents per token, TopK (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=131_072, help="training tokens (default: %(default)s)")
    p.add_argument("--batch-tokens", type=int, default=512, help="tokens per optimizer step (default: %(default)s)")
    p.add_argument("--buffer-tokens", type=int, default=16_384,
                   help="shuffle buffer, in tokens (default: %(default)s)")
    p.add_argument("--lr", type=_finite, default=2e-3, help="Adam learning rate, warmup then linear decay "
                   "(default: %(default)s)")
    p.add_argument("--auxk-alpha", type=_finite, default=1 / 32, help="weight of the dead-latent AuxK loss "
                   "(default: 1/32)")
    p.add_argument("--dead-after", type=int, default=16_384,
                   help="a latent silent for this many training tokens is dead for AuxK (default: %(default)s)")
    p.add_argument("--corpus", default="builtin", help="builtin, a .txt or .jsonl file, or a datasets name, read "
                   "lazily (default: %(default)s)")
    p.add_argument("--split", default="train", choices=SPLITS, help="(default: %(default)s)")
    p.add_argument("--window", type=int, default=128, help="tokens per window (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: %(default)s)")
    p.add_argument("--heldout-fraction", type=_finite, default=0.1,
                   help="every 1/f-th window is held out for the evaluation (default: %(default)s)")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows evaluated (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue an interrupted training of the same --out from "
                   "its checkpoint (.OUT.sae-checkpoint beside it; the same flags)")
    _add_out_args(p, "mambascope-sae")


def _add_patch_args(p: argparse.ArgumentParser) -> None:
    from mambascope.interventions.patching import ALIASES, DEFAULT_UNITS, DIRECTIONS, METRICS, UNIT_TYPES

    _add_model_args(p)
    p.add_argument("--clean", required=True, help="the prompt whose answer patching restores")
    p.add_argument("--corrupt", default=None, help="the corrupted prompt, as many tokens as --clean")
    p.add_argument("--target", required=True, help='the clean answer, one token (e.g. " raised")')
    p.add_argument("--corrupt-target", default=None, help="the answer the logit difference is taken against, one "
                   "token (default: the corrupted run's top token other than --target)")
    p.add_argument("--units", default=None, help=f"comma-separated unit types: {', '.join(UNIT_TYPES)} ("
                   f"{', '.join(f'{k} = {v}' for k, v in ALIASES.items())}); default: every one of "
                   f"{', '.join(DEFAULT_UNITS)} the model has")
    p.add_argument("--channels", default=None, help="comma-separated neuron indices patched together (--units "
                   "channels)")
    p.add_argument("--dictionary", default=None, metavar="DIR", help="a sparse dictionary (mambascope sae output) "
                   "whose features --units features patches, one grid row per feature (docs/features.md)")
    p.add_argument("--features", default=None, help="comma-separated feature indices of --dictionary, one row each "
                   "(default: every feature)")
    p.add_argument("--metric", default="logit_diff", choices=METRICS,
                   help="logit_diff: logit of --target minus that of --corrupt-target; logprob: log-probability of "
                   "--target (default: %(default)s)")
    p.add_argument("--direction", default="denoise", choices=DIRECTIONS,
                   help="denoise: clean activations into the corrupted run; noise: the reverse (default: %(default)s)")
    p.add_argument("--noise-subject", default=None, help="causal tracing: corrupt --clean by Gaussian noise on the "
                   "embeddings of this part of it, instead of --corrupt")
    p.add_argument("--noise-scale", type=_finite, default=3.0,
                   help="noise std in units of the embeddings' std (default: %(default)s, Meng et al. 2022)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="patches per forward pass (default: %(default)s)")
    _add_out_args(p, "mambascope-patch")
    p.add_argument("--no-report", dest="report", action="store_false", help="skip figures and report.html")


def _add_leaderboard_args(p: argparse.ArgumentParser) -> None:
    from mambascope.attribution.input_attribution import BASELINE, IG_STEPS
    from mambascope.attribution.leaderboard import DEFAULT_QUERIES, language_models, task_models
    from mambascope.attribution.token_flipping import DEFAULT_POSITIONS

    p.add_argument("--models", nargs="+", default=task_models(), metavar="MODEL",
                   help="task models: bundled ones, handwired-mamba-mqar, or local directories with a training.json "
                        "naming the task (default: %(default)s)")
    p.add_argument("--lm-models", nargs="*", default=language_models(), metavar="MODEL",
                   help="bundled language models for ΔA^F; none to skip it (default: %(default)s)")
    p.add_argument("--queries", type=int, default=DEFAULT_QUERIES,
                   help="held-out queries per task model (default: %(default)s)")
    p.add_argument("--flip-positions", type=int, default=DEFAULT_POSITIONS,
                   help="context-dependent positions per language model for ΔA^F (default: %(default)s)")
    p.add_argument("--ig-steps", type=int, default=IG_STEPS, help="integrated-gradients steps (default: %(default)s)")
    p.add_argument("--baseline", default=BASELINE, help="reference input of IG and occlusion: mean or zero "
                   "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    _add_out_args(p, "mambascope-leaderboard")
    p.add_argument("--no-report", dest="report", action="store_false", help="skip the figure and report.html")


def _add_attribute_args(p: argparse.ArgumentParser) -> None:
    from mambascope.attribution.input_attribution import BASELINE, BASELINES, IG_STEPS, TOKEN_METHODS

    _add_model_args(p)
    p.add_argument("--text", required=True, help="the text whose next-token prediction is explained")
    p.add_argument("--target", default=None, help='the token explained, one token (e.g. " return"; default: the '
                   "model's top prediction at --position)")
    p.add_argument("--position", type=int, default=-1, help="the position whose next-token prediction is explained; "
                   "negative counts from the end (default: %(default)s, the last token)")
    p.add_argument("--methods", dest="attribute_methods", nargs="+", default=None,
                   help=f"methods, of {', '.join(TOKEN_METHODS)} (default: every one the model supports)")
    p.add_argument("--baseline", default=BASELINE, help="reference input of integrated gradients and occlusion: "
                   + "; ".join(f"{k} = {v}" for k, v in BASELINES.items()) + " (default: %(default)s)")
    p.add_argument("--ig-steps", type=int, default=IG_STEPS,
                   help="integrated gradients' Gauss-Legendre steps (default: %(default)s)")
    p.add_argument("--top", type=int, default=5, help="tokens listed per method (default: %(default)s)")
    _add_out_args(p, "mambascope-attribute")
    p.add_argument("--no-report", dest="report", action="store_false", help="skip the figure and report.html")


def _add_steer_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help="the text to continue")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--unit", default=None, metavar="L:N", help="neuron N of layer L (blocks.L.mixer.hook_post; "
                      "blocks.L.mlp.hook_post on a transformer layer)")
    what.add_argument("--feature", default=None, metavar="DIR:I", help="feature I of a SAELens-format dictionary "
                      "in DIR (cfg.json + sae_weights.safetensors): adds scale·W_dec[I] at its hook_name")
    p.add_argument("--scale", type=_finite, required=True, help="how much is added (or, --mode set, the value)")
    p.add_argument("--mode", default="add", choices=("add", "set"),
                   help="add: activation + scale·direction (activation steering); set: the neuron clamped to "
                   "scale (--unit only) (default: %(default)s)")
    p.add_argument("--positions", default=None, metavar="P", help="absolute token positions steered, "
                   "comma-separated N, A:B (B excluded) or A: (to the end), prompt from 0 (default: every position)")
    p.add_argument("--max-new-tokens", type=int, default=20, help="tokens generated (default: %(default)s)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (both runs share --seed)")
    p.add_argument("--temperature", type=_finite, default=1.0, help="sampling temperature (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k best tokens (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (default: %(default)s)")
    p.add_argument("--out", default=None, help="also write steer.json with both continuations to this directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM ends a run exactly like Ctrl-C: finished stages kept, exit 130


def _handle_interrupts() -> dict[int, object]:
    """SIGINT and SIGTERM raise KeyboardInterrupt for the run (exit 130, docs/design.md §13), except a signal
    this process was started with ignored: a background job of a non-interactive shell (or a CI runner) has
    SIGINT ignored so that the terminal's Ctrl-C does not reach it, and by POSIX convention it stays ignored
    (as Python itself leaves it).  Returns the handlers replaced, for ``main`` to put back."""
    previous = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(s) is not signal.SIG_IGN:
            previous[s] = signal.signal(s, _interrupt)
    return previous


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _quiet_libraries(quiet: bool) -> None:
    """Kernel-fallback notices of transformers are not the user's concern; its weight-loading bar goes with
    ``--quiet`` like every other bar."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        from transformers.utils import logging

        logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a one-line usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else BAD_INPUT
    previous = _handle_interrupts()
    try:
        _check_flags(args)
        _quiet_libraries(args.quiet)
        return args.func(args)
    except KeyboardInterrupt:
        print("mambascope: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        user = isinstance(exc, USER_ERRORS) and not (isinstance(exc, OSError) and exc.errno is not None)
        kind = "error" if user else f"failed ({type(exc).__name__})"
        hint = "" if user or args.debug else " (rerun with --debug for the traceback)"
        kept = f"; {exc.kept}" if isinstance(getattr(exc, "kept", None), str) else ""  # _run_main's
        print(f"mambascope: {kind}: {_one_line(exc)}{kept}{hint}", file=sys.stderr)
        return BAD_INPUT if user else FAILED
    finally:
        for s, handler in previous.items():
            if handler is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
