"""The attention stage of ``mambascope analyze`` with default flags, alone: its seconds, and its result.

    python benchmarks/bench_attention_stage.py [--model tiny-mamba] [--out FILE.json] [--profile FILE.prof]

The same call as ``analyze`` makes (``run_analysis`` on the built-in validation corpus, 128-token windows,
65,536 tokens, held-out fraction 0.25, attention neurons on the first 16 selection windows, faithfulness on
the held-out windows, with analyze's default methods, whole-model methods and token windows), with only the
``attention_neurons`` stage.  Prints the stage's wall seconds from
``results["timings"]``; ``--out`` writes the stage's result (to compare two versions of the code, run
once with each on ``PYTHONPATH`` and diff the files); ``--profile`` writes a cProfile of the stage.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mambascope.cli import _attention_methods, _whole_model_methods, build_parser
from mambascope.data import load_corpus, tokenize_windows
from mambascope.models import load_model
from mambascope.pipeline import run_analysis
from mambascope.results import to_jsonable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-mamba")
    parser.add_argument("--out", default=None, help="write the stage's result here (JSON)")
    parser.add_argument("--profile", default=None, help="write a cProfile of the stage here")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, device="cpu")
    windows = tokenize_windows(load_corpus("builtin", split="validation").texts, tokenizer, 128,
                               max_tokens=65536).ids
    profile = cProfile.Profile() if args.profile else None
    if profile is not None:
        profile.enable()
    defaults = build_parser().parse_args(["analyze"])
    results = run_analysis(model, tokenizer, windows, info={"model": {}, "corpus": {}},
                           stages=["attention_neurons"], progress=False,
                           methods=_attention_methods(defaults, model),
                           whole_model_methods=_whole_model_methods(defaults, model),
                           token_windows=defaults.token_windows)
    if profile is not None:
        profile.disable()
        profile.dump_stats(args.profile)
    if results["errors"]:
        raise SystemExit(f"the stage failed: {results['errors']}")
    print(f"attention stage: {results['timings']['attention_neurons']:.2f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(to_jsonable(results["attention_neurons"]), f)


if __name__ == "__main__":
    main()
