"""The ``mambascope`` command line: ``analyze``, ``census``, ``attention``, ``train-tiny``.

Every flag has a default.  A user error (unknown model, unreadable corpus, layer out of range, ...)
prints one line and exits with status 2; an interrupt exits with 130 after keeping what was finished.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

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


def _cmd_train_tiny(args: argparse.Namespace) -> int:
    from mambascope.models import train_tiny

    stats = train_tiny(args.arch, args.out, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                       lr=args.lr, seed=args.seed, device=args.device, tokenizer=args.tokenizer)
    print(f"saved {args.arch} to {args.out}: held-out loss {stats['val_loss']:.3f} nats/token "
          f"(unigram {stats['unigram_loss']:.3f})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mambascope", description="Neuron-level interpretability of Mamba models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-tiny", help="train a bundled-size model on the built-in corpus")
    p.add_argument("--arch", required=True, choices=["mamba", "mamba2", "gpt2"])
    p.add_argument("--out", required=True, help="output directory (Hugging Face format)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--tokenizer", default=None, help="reuse this tokenizer directory instead of training one")
    p.set_defaults(func=_cmd_train_tiny)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
