"""Decoding speed of ``mambascope.generate`` (recurrent cache, one token per step) beside Hugging Face's own
``generate`` and a re-run of the traced forward over the whole sequence at every token, on the bundled models.

    python benchmarks/bench_generate.py [--prompt 64] [--new 64] [--threads 1]

Greedy, batch 1, fp32, CPU; the three decoders are checked to give the same tokens.  Reported: new tokens
per second, prefill included.
"""

from __future__ import annotations

import argparse
import time

import torch

from mambascope import generate, load_model, trace


def rerun(model, ids, new):
    """The no-cache reference: the whole sequence through the tracer for every new token."""
    for _ in range(new):
        ids = torch.cat([ids, trace(model, ids, names=[]).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def hf(model, ids, new):
    config = model.generation_config
    config.eos_token_id, config.do_sample, config.max_new_tokens = None, False, new
    return model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"prompt {args.prompt} tokens, {args.new} new, greedy, batch 1, {args.threads} thread(s); new tokens/s")
    print(f"{'model':<14} {'generate':>9} {'HF':>9} {'re-run':>9}  same tokens")
    for name in ("tiny-mamba", "tiny-mamba2", "tiny-gpt", "tiny-hybrid"):
        model, _ = load_model(name, device="cpu")
        ids = (torch.arange(1, args.prompt + 1) * 7 % model.config.vocab_size)[None]
        rates, outs = [], []
        for decode in (generate, hf, rerun):
            with torch.no_grad():
                start = time.perf_counter()
                outs.append(decode(model, ids, args.new))
                rates.append(args.new / (time.perf_counter() - start))
        same = all(torch.equal(outs[0], o) for o in outs[1:])
        print(f"{name:<14} {rates[0]:>9.1f} {rates[1]:>9.1f} {rates[2]:>9.1f}  {same}")


if __name__ == "__main__":
    main()
