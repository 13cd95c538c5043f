"""Tokens/s of the Hugging Face forward vs the traced forward (every internal unit collected), side by side.

    python benchmarks/bench_forward.py [--device cpu|cuda] [--quick] [--families] [--attention] [--repeats N]
                                       [--threads N]

Configs: the bundled models' size, and a 130m-scale random config (d_model 768, 24 layers) at L 512 and
1024.  ``--families``: one row per supported architecture family at bundled size (d_model 128, vocab
4096, 4 layers; hybrids with their SSM / attention / MLP-MoE layer mix) at L 512 instead.  Each row
times both forwards on the same inputs in the same process, best of ``--repeats``.  ``--attention``: the
transformer families (GPT-2, GPT-NeoX / Pythia, Llama) at bundled size, batch 1, L 512, the model's own
forward beside the traced forward with every unit except ``attn.hook_pattern`` (fused attention, as the
model's own) and with every unit (the explicit softmax pattern), both holding every layer's units to the
end, and the first again with each layer's units let go once handed over (``streamed``, what a per-layer
consumer such as the census pays), the four timed in turn, ``--repeats`` rounds: best of the rounds, and
the median of the per-round ratios.  ``--threads``: torch's CPU threads (a CPU shared with another job
times more steadily with 1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import transformers
from transformers import AutoModelForCausalLM, Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from mambascope.arch import adapter
from mambascope.trace import trace_stream

CONFIGS = {
    "mamba-tiny": lambda: MambaConfig(vocab_size=4096, hidden_size=128, num_hidden_layers=4, state_size=16),
    "mamba2-tiny": lambda: Mamba2Config(vocab_size=4096, hidden_size=128, num_hidden_layers=4, state_size=32,
                                        head_dim=32, num_heads=8, n_groups=1, chunk_size=64),
    "mamba-130m": lambda: MambaConfig(vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16),
    "mamba2-130m": lambda: Mamba2Config(vocab_size=50288, hidden_size=768, num_hidden_layers=24, state_size=128,
                                        head_dim=64, num_heads=24, n_groups=1, chunk_size=256),
}


_SMALL = {"vocab_size": 4096, "hidden_size": 128}
_MAMBA2_HYBRID = {"mamba_n_heads": 8, "mamba_d_head": 32, "mamba_d_state": 32, "mamba_n_groups": 1,
                  "mamba_chunk_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 256}
# family -> (config class name, kwargs) at the bundled models' size
FAMILIES: dict[str, tuple[str, dict]] = {
    "mamba": ("MambaConfig", {**_SMALL, "num_hidden_layers": 4, "state_size": 16}),
    "mamba2": ("Mamba2Config", {**_SMALL, "num_hidden_layers": 4, "state_size": 32, "head_dim": 32, "num_heads": 8,
                                "n_groups": 1, "chunk_size": 64}),
    "falcon_mamba": ("FalconMambaConfig", {**_SMALL, "num_hidden_layers": 4, "state_size": 16}),
    "gpt2": ("GPT2Config", {"vocab_size": 4096, "n_embd": 128, "n_layer": 4, "n_head": 4, "n_inner": 256,
                            "n_positions": 512}),
    "gpt_neox": ("GPTNeoXConfig", {**_SMALL, "num_hidden_layers": 4, "num_attention_heads": 4,
                                   "intermediate_size": 256}),
    "llama": ("LlamaConfig", {**_SMALL, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 256}),
    "bamba": ("BambaConfig", {**_SMALL, **_MAMBA2_HYBRID, "num_hidden_layers": 4, "attn_layer_indices": [2]}),
    "nemotron_h": ("NemotronHConfig", {**_SMALL, "layers_block_type": ["linear_attention", "mlp", "full_attention",
                                                                      "mlp", "linear_attention", "moe"],
                                       "mamba_num_heads": 8, "mamba_head_dim": 32, "ssm_state_size": 32,
                                       "n_groups": 1, "chunk_size": 64, "intermediate_size": 256,
                                       "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 32,
                                       "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                       "moe_shared_expert_intermediate_size": 128}),
    "granitemoehybrid": ("GraniteMoeHybridConfig", {**_SMALL, **_MAMBA2_HYBRID, "num_hidden_layers": 4,
                                                    "layer_types": ["linear_attention", "linear_attention",
                                                                    "full_attention", "linear_attention"],
                                                    "num_local_experts": 4, "num_experts_per_tok": 2,
                                                    "intermediate_size": 64, "shared_intermediate_size": 128}),
    "falcon_h1": ("FalconH1Config", {**_SMALL, **_MAMBA2_HYBRID, "num_hidden_layers": 4, "mamba_d_ssm": 256}),
    "zamba2": ("Zamba2Config", {**_SMALL, "layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"],
                                "num_hidden_layers": 4, "n_mamba_heads": 8, "mamba_d_state": 32, "mamba_ngroups": 1,
                                "chunk_size": 64, "num_attention_heads": 4, "intermediate_size": 256,
                                "adapter_rank": 8, "use_shared_attention_adapter": True}),
    "jamba": ("JambaConfig", {**_SMALL, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
                              "intermediate_size": 256, "num_experts": 4, "num_experts_per_tok": 2,
                              "attn_layer_period": 4, "attn_layer_offset": 2, "expert_layer_period": 2,
                              "expert_layer_offset": 1, "mamba_d_state": 16}),
}


def family_model(family: str, device: torch.device) -> torch.nn.Module:
    cls_name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, cls_name)(**kwargs)
    return AutoModelForCausalLM.from_config(config).to(device).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (allocations, kernel selection)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def run(name: str, batch: int, length: int, device: torch.device, repeats: int) -> dict:
    torch.manual_seed(0)
    if name in FAMILIES:
        model = family_model(name, device)
    else:
        model = (MambaForCausalLM if "mamba-" in name else Mamba2ForCausalLM)(CONFIGS[name]()).to(device).eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device=device)
    kept = []

    def hf() -> None:
        with torch.no_grad():
            model(ids, use_cache=False)

    def traced() -> None:
        kept.clear()
        trace_stream(model, ids, lambda layer, units: kept.append(units))  # every unit of every layer

    t_hf, t_ours = best_time(hf, device, repeats), best_time(traced, device, repeats)
    tokens = batch * length
    return {"config": name, "batch": batch, "L": length, "hf_tok_s": tokens / t_hf, "traced_tok_s": tokens / t_ours,
            "hf_s": t_hf, "traced_s": t_ours, "speedup": t_hf / t_ours}


ATTENTION_FAMILIES = ("gpt2", "gpt_neox", "llama")


def run_attention(family: str, batch: int, length: int, device: torch.device, repeats: int) -> dict:
    """Own forward, traced without the pattern, traced with it: seconds, best of ``repeats``, timed in turn."""
    model = family_model(family, device)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device=device)
    every = [f"blocks.{layer}.{unit}" for layer in range(model.config.num_hidden_layers)
             for unit in adapter(model).units(layer)]
    no_pattern = [name for name in every if not name.endswith("attn.hook_pattern")]

    def hf() -> None:
        with torch.no_grad():
            model(ids, use_cache=False)

    def traced(names: list[str]) -> None:
        kept = []
        trace_stream(model, ids, lambda layer, units: kept.append(units), names=names)

    def streamed() -> None:  # the same units, each layer's let go once handed over (a per-layer consumer)
        trace_stream(model, ids, lambda layer, units: None, names=no_pattern)

    runs = {"hf": hf, "no_pattern": lambda: traced(no_pattern), "pattern": lambda: traced(every),
            "streamed": streamed}
    times: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(repeats):  # interleaved, so that a change of machine load hits all three alike
        for key, fn in runs.items():
            times[key].append(best_time(fn, device, 1))
    # the ratio within each round, whose median a burst of load on one round cannot move
    paired = {key: statistics.median(a / b for a, b in zip(times["hf"], times[key], strict=True))
              for key in ("no_pattern", "streamed")}
    return {**{key: min(t) for key, t in times.items()}, "paired": paired}


def attention_table(device: torch.device, repeats: int) -> None:
    print(f"{'family':<10} {'HF s':>8} {'traced s':>9} {'HF/traced':>10} {'median':>7} {'+pattern s':>11} "
          f"{'HF/+pattern':>12} {'streamed s':>11} {'HF/streamed':>12} {'median':>7}")
    print("(traced: every unit but attn.hook_pattern, all layers' units held; +pattern: every unit; streamed: "
          "as traced, each layer's units let go once handed over; median: of the per-round HF/x ratios)")
    for family in ATTENTION_FAMILIES:
        t = run_attention(family, 1, 512, device, repeats)
        print(f"{family:<10} {t['hf']:>8.4f} {t['no_pattern']:>9.4f} {t['hf'] / t['no_pattern']:>9.2f}x "
              f"{t['paired']['no_pattern']:>6.2f}x {t['pattern']:>11.4f} {t['hf'] / t['pattern']:>11.2f}x "
              f"{t['streamed']:>11.4f} {t['hf'] / t['streamed']:>11.2f}x {t['paired']['streamed']:>6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="bundled size only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--families", action="store_true", help="one row per architecture family, bundled size")
    parser.add_argument("--attention", action="store_true",
                        help="transformer families: own forward vs traced with and without attn.hook_pattern")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    if args.attention:
        print(f"device: {name}; torch {torch.__version__}; batch 1, L 512, best of {args.repeats}")
        attention_table(device, args.repeats)
        return
    rows = [("mamba-tiny", 1, 512), ("mamba2-tiny", 1, 512), ("mamba-tiny", 8, 256), ("mamba2-tiny", 8, 256)]
    if args.families:
        rows = [(family, 1, 512) for family in FAMILIES]
    elif not args.quick:
        rows += [("mamba-130m", 1, 512), ("mamba2-130m", 1, 512), ("mamba-130m", 1, 1024), ("mamba2-130m", 1, 1024)]
        if device.type == "cuda":
            rows += [("mamba-130m", 4, 1024), ("mamba2-130m", 4, 1024)]
    print(f"device: {name}; torch {torch.__version__}; traced = every unit of every layer collected")
    print(f"{'config':<16} {'batch':>5} {'L':>5} {'HF tok/s':>10} {'traced tok/s':>13} {'HF s':>8} {'traced s':>9} "
          f"{'speedup':>8}")
    for config, batch, length in rows:
        r = run(config, batch, length, device, args.repeats)
        print(f"{r['config']:<16} {r['batch']:>5} {r['L']:>5} {r['hf_tok_s']:>10.0f} {r['traced_tok_s']:>13.0f} "
              f"{r['hf_s']:>8.3f} {r['traced_s']:>9.3f} {r['speedup']:>7.2f}x")


if __name__ == "__main__":
    main()
