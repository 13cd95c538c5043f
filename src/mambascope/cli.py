"""The ``mambascope`` command line: ``analyze``, ``census``, ``attention``, ``compare``, ``report``, ``train-tiny``.

Every flag has a default.  A user error (unknown model, unreadable corpus, layer out of range, ...)
prints one line and exits with status 2; an interrupt exits with 130 after keeping what was finished.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

USER_ERRORS = (ValueError, KeyError, IndexError, FileNotFoundError, FileExistsError, PermissionError,
               FloatingPointError, MemoryError, NotADirectoryError)


def _add_model_args(p: argparse.ArgumentParser, model: str = "tiny-mamba") -> None:
    p.add_argument("--model", default=model, help="bundled name (tiny-mamba, tiny-mamba2, tiny-gpt), local "
                   "checkpoint directory or hub id (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _add_corpus_args(p: argparse.ArgumentParser, window: int = 128, max_tokens: int | None = 65536) -> None:
    p.add_argument("--corpus", default="builtin", help="builtin, a .txt or .jsonl file, or a datasets name "
                   "(default: %(default)s)")
    p.add_argument("--split", default="validation", help="corpus split to analyse (default: %(default)s)")
    p.add_argument("--window", type=int, default=window, help="tokens per window, T (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=max_tokens,
                   help="token budget; 0 = the whole split (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: %(default)s)")


def _add_run_args(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layer indices (default: all)")
    p.add_argument("--heldout-fraction", type=float, default=0.25,
                   help="share of the windows held out for ablation/pruning/faithfulness (default: %(default)s)")
    p.add_argument("--draws", type=int, default=3, help="random-control draws (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=out, help="output directory (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-report", dest="report", action="store_false", help="skip figures and report.html")


def _prepare(args: argparse.Namespace):
    """Load model, corpus and windows; claim the output directory first so a bad --out fails fast."""
    import torch

    from mambascope.data import load_corpus, tokenize_windows
    from mambascope.models import load_model
    from mambascope.pipeline import model_info
    from mambascope.results import ResultsDir

    torch.manual_seed(args.seed)
    out = ResultsDir(args.out, overwrite=args.overwrite)  # nothing is written before the first save
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    corpus = load_corpus(args.corpus, split=args.split)
    windows = tokenize_windows(corpus.texts, tokenizer, args.window, max_tokens=args.max_tokens or None)
    info = {"model": model_info(model, args.model),
            "corpus": {"name": corpus.name, "split": corpus.split, "texts": windows.n_texts,
                       "skipped_texts": windows.n_skipped, "short_texts": windows.n_short,
                       "tokens": windows.n_tokens, "windows": windows.n_windows, "window": args.window}}
    return model, tokenizer, windows.ids, info, out


def _run(args: argparse.Namespace, stages: tuple[str, ...]) -> int:
    from mambascope.pipeline import neuron_table, print_analysis_summary, run_analysis

    model, tokenizer, windows, info, out = _prepare(args)
    try:
        results = run_analysis(
            model, tokenizer, windows, info=info, layers=args.layers, stages=stages,
            attention_layers=getattr(args, "attention_layers", None), methods=getattr(args, "methods", None),
            heldout_fraction=args.heldout_fraction, batch_size=args.batch_size, draws=args.draws, seed=args.seed,
            progress=not args.quiet, save=out.save)
    except KeyboardInterrupt:
        if not out.file("results.json").exists():
            out.discard()
            raise
        path = out.commit()
        print(f"mambascope: interrupted; finished parts kept in {path / 'results.json'}", file=sys.stderr)
        return 130
    except BaseException:
        out.discard()
        raise
    if results["layers"]:
        out.save_table(neuron_table({"layers": results["layers"]}))
    if args.report:
        _render(results, out.staging)
        out.save(results)
    path = out.commit()
    print_analysis_summary(results)
    print(f"results: {path / 'results.json'}")
    if args.report and "report" not in results["errors"]:
        print(f"report:  {path / 'report.html'}")
    return 1 if results["errors"] else 0


def _render(results: dict, directory: Path) -> None:
    """Figures and report.html into ``directory``; a failure is recorded under errors["report"]."""
    from mambascope.report import create_comprehensive_report, render_report

    try:
        figures = create_comprehensive_report(results, directory / "figures")
        render_report(results, directory, figures)
    except Exception as exc:  # the results stay valid without their report
        results["errors"]["report"] = f"{type(exc).__name__}: {exc}"


def _cmd_report(args: argparse.Namespace) -> int:
    from mambascope.report import create_comprehensive_report, render_report
    from mambascope.results import load_results

    directory = Path(args.directory)
    results = load_results(directory)
    figures = create_comprehensive_report(results, directory / "figures")
    path = render_report(results, directory, figures)
    print(f"report: {path}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    return _run(args, ("census", "interventions", "attention_neurons"))


def _cmd_census(args: argparse.Namespace) -> int:
    return _run(args, ("census", "interventions") if not args.no_ablation else ("census",))


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
    from mambascope.results import ResultsDir

    torch.manual_seed(args.seed)
    out = ResultsDir(args.out, overwrite=args.overwrite)
    model, _ = load_model(args.model, device=args.device, dtype=args.dtype)
    settings = task_settings(bundled_path(args.model) if args.model in BUNDLED else args.model)
    if settings["task"] != args.task:
        raise ValueError(f"{args.model} was trained on {settings['task']!r}, not {args.task!r}")
    start = time.perf_counter()
    try:
        truth = run_ground_truth(model, settings, n_queries=args.queries, layers=args.layers, methods=args.methods,
                                 seed=args.seed)
    except BaseException:
        out.discard()
        raise
    results = {"model": model_info(model, args.model),
               "corpus": {"name": f"task:{args.task}", "split": "held-out", "windows": truth["n_queries"],
                          "window": truth["seq_len"], "tokens": truth["n_queries"] * truth["seq_len"]},
               "ground_truth": truth, "errors": {f"ground_truth: {m}": r for m, r in truth["errors"].items()},
               "timings": {"ground_truth": round(time.perf_counter() - start, 3)}, "incomplete": []}
    if args.report:
        _render(results, out.staging)
    out.save(results)
    path = out.commit()
    print_ground_truth(truth)
    print(f"results: {path / 'results.json'}")
    return 1 if results["errors"] else 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from mambascope.compare import compare_models, comparison_table
    from mambascope.data import load_corpus
    from mambascope.report.compare_plots import plot_comparison
    from mambascope.report.html import render_comparison_report
    from mambascope.results import ResultsDir, to_jsonable

    out = ResultsDir(args.out, overwrite=args.overwrite)
    corpus = load_corpus(args.corpus, split=args.split)
    try:
        comparison = compare_models(args.models, corpus.texts, window=args.window, max_tokens=args.max_tokens or None,
                                    device=args.device, batch_size=args.batch_size, progress=not args.quiet)
        comparison["corpus"] = {"name": corpus.name, "split": corpus.split, "texts": len(corpus.texts)}
        figures = plot_comparison(comparison, out.figures)
        comparison["figures"] = {k: (v.name if hasattr(v, "name") else f"skipped: {v}") for k, v in figures.items()}
        out.file("comparison.json").write_text(json.dumps(to_jsonable(comparison), indent=1, allow_nan=False))
        out.save_table(comparison_table(comparison), "comparison")
        render_comparison_report(comparison, out.staging, figures)
    except BaseException:
        out.discard()
        raise
    path = out.commit()
    table = comparison_table(comparison)
    columns = ["model", "layer", "depth", "pct_dead", "pct_positional", "token_detectors", "mean_dt_selectivity",
               "entropy", "sink_mass"]
    print(table[[c for c in columns if c in table]].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    for name, reason in comparison["errors"].items():
        print(f"FAILED {name}: {reason}")
    print(f"comparison: {path / 'comparison.json'}")
    return 0


def _cmd_train_tiny(args: argparse.Namespace) -> int:
    from mambascope.models import train_tiny

    if args.task is not None:
        from mambascope.models.train_task import train_task

        stats = train_task(args.arch, args.task, args.out, seq_len=args.seq_len, num_pairs=args.num_pairs,
                           steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                           device=args.device, num_threads=args.threads)
        print(f"saved {args.arch} {args.task} model to {args.out}: held-out query accuracy "
              f"{stats['heldout_query_accuracy']:.4f} on {stats['heldout_queries']} queries")
        return 0
    stats = train_tiny(args.arch, args.out, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                       lr=args.lr, seed=args.seed, device=args.device, tokenizer=args.tokenizer,
                       num_threads=args.threads)
    print(f"saved {args.arch} to {args.out}: held-out loss {stats['val_loss']:.3f} nats/token "
          f"(unigram {stats['unigram_loss']:.3f})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mambascope", description="Neuron-level interpretability of Mamba models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyze", help="every analysis on one model and corpus, with figures and report")
    _add_model_args(p)
    _add_corpus_args(p)
    _add_run_args(p, "mambascope-out")
    p.add_argument("--attention-layers", type=int, nargs="+", default=None,
                   help="layers for attention neurons (default: as --layers)")
    p.add_argument("--methods", nargs="+", default=None, help="attention-neuron methods (default: all)")
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("census", help="dead, rare, positional, detector, Δ neurons; ablation and pruning")
    _add_model_args(p)
    _add_corpus_args(p)
    _add_run_args(p, "mambascope-census")
    p.add_argument("--no-ablation", action="store_true", help="skip ablation and pruning")
    p.set_defaults(func=_cmd_census)

    p = sub.add_parser("attention", help="hidden attention, attention neurons and their faithfulness")
    _add_model_args(p)
    _add_corpus_args(p)
    _add_run_args(p, "mambascope-attention")
    p.add_argument("--methods", nargs="+", default=None, help="attention-neuron methods (default: all)")
    p.add_argument("--task", default=None, choices=["mqar", "copy"],
                   help="score the methods against the ground truth of a task model (train-tiny --task)")
    p.add_argument("--queries", type=int, default=512, help="held-out queries for --task (default: %(default)s)")
    p.set_defaults(func=_cmd_attention)

    p = sub.add_parser("report", help="re-render figures and report.html from a results directory")
    p.add_argument("directory", help="a directory holding results.json")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("compare", help="the same census and attention statistics across models")
    p.add_argument("--models", nargs="+", default=["tiny-mamba", "tiny-mamba2", "tiny-gpt"],
                   help="bundled names, local directories or hub ids (default: %(default)s)")
    p.add_argument("--device", default="auto")
    _add_corpus_args(p)
    p.add_argument("--out", default="mambascope-compare", help="output directory (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("train-tiny", help="train a bundled-size model on the built-in corpus")
    p.add_argument("--arch", required=True, choices=["mamba", "mamba2", "gpt2"])
    p.add_argument("--out", required=True, help="output directory (Hugging Face format)")
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--tokenizer", default=None, help="reuse this tokenizer directory instead of training one")
    p.add_argument("--task", default=None, choices=["mqar", "copy"],
                   help="train on a synthetic task (mambascope.data.tasks) instead of the corpus")
    p.add_argument("--num-pairs", type=int, default=8, help="MQAR key-value pairs per example (default: %(default)s)")
    p.set_defaults(func=_cmd_train_tiny)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # kernel-fallback notices are not the user's concern
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("mambascope: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"mambascope: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
