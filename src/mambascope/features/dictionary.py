"""Sparse dictionaries (TopK SAEs and transcoders) on traced units, and their SAELens-format files.

The dictionary itself is EleutherAI's ``sparsify.SparseCoder`` (eai-sparsify; Gao et al. 2024, "Scaling
and evaluating sparse autoencoders"): TopK latents z = topk_k(ReLU(W (x − b_dec·[SAE]) + b)), reconstruction
x̂ = zᵀ W_dec + b_dec.  A dictionary reads ``hook_in`` and writes ``hook_out`` (the same unit for an SAE; a
transcoder maps e.g. ``hook_resid_pre`` to ``hook_mixer_out``).  Units with more than one feature axis
(``[b, L, G, N]``) are flattened per token.

Saved in the SAELens layout (``cfg.json`` + ``sae_weights.safetensors``: ``W_enc [d_in, d_sae]``, ``b_enc``,
``W_dec [d_sae, d_out]``, ``b_dec``), with sparsify's input centring folded into ``b_enc`` so that SAELens's
formula topk(ReLU(x W_enc + b_enc)) gives the same codes (docs/features.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mambascope.arch import adapter
from mambascope.arch.units import PART_OUT, PART_UNITS, STATE_UNIT

KINDS = ("topk", "transcoder")
CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
# Units a per-token dictionary cannot read: the state is per requested position, the pattern per key.
NOT_PER_TOKEN = (STATE_UNIT, "attn.hook_pattern")
# docs/hooks.md, "Our names, TransformerLens's, mamba-lens's": the units with a counterpart.
TRANSFORMER_LENS = {u: u for u in ("hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern",
                                   "attn.hook_z", "hook_attn_out", "hook_resid_mid", "mlp.hook_pre",
                                   "mlp.hook_pre_linear", "mlp.hook_post", "hook_mlp_out")}
MAMBA_LENS = {"hook_resid_pre": "hook_resid_pre", "mixer.hook_x": "hook_in_proj", "mixer.hook_gate_pre": "hook_skip",
              "mixer.hook_conv": "hook_conv", "mixer.hook_ssm_input": "hook_ssm_input", "mixer.hook_dt": "hook_delta",
              "mixer.hook_B": "hook_B", "mixer.hook_C": "hook_C", "mixer.hook_y": "hook_ssm_output",
              "mixer.hook_post": "hook_after_skip", "hook_mixer_out": "hook_out_proj"}
_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")


def known_units() -> list[str]:
    """Every per-token unit any supported family has (for checking a hook name before the model loads)."""
    units = {"hook_resid_pre", "hook_resid_mid", "hook_resid_post", *PART_OUT.values()}
    for part in PART_UNITS.values():
        units.update(part)
    return sorted(u for u in units if u not in NOT_PER_TOKEN)


def split_hook(name: str, flag: str = "--hook") -> tuple[int | None, str]:
    """(layer or None, unit) of ``blocks.{l}.<unit>`` or a bare ``<unit>``; a unit no family has is a
    ``KeyError`` listing the valid ones."""
    match = _NAME.match(name)
    layer, unit = (int(match.group(1)), match.group(2)) if match else (None, name)
    if unit not in known_units():
        raise KeyError(f"{flag} {name!r}: no per-token unit {unit!r}; valid units (as blocks.L.UNIT or UNIT for the "
                       f"middle layer): {', '.join(known_units())}")
    return layer, unit


def resolve_hook(model: nn.Module, name: str, flag: str = "--hook") -> str:
    """The full hook name for ``model``: a bare unit means the middle layer; a layer or unit the model does
    not have is a ``KeyError`` (one line naming the valid ones)."""
    ad = adapter(model)
    layer, unit = split_hook(name, flag)
    layer = ad.n_layers // 2 if layer is None else layer
    if not 0 <= layer < ad.n_layers:
        raise KeyError(f"{flag} {name!r}: the model has layers 0..{ad.n_layers - 1}")
    units = [u for u in ad.units(layer) if u not in NOT_PER_TOKEN]
    if unit not in units:
        raise KeyError(f"{flag} {name!r}: layer {layer} of this {ad.model_type} model has no {unit!r}; valid: "
                       f"blocks.{layer}.{{{', '.join(units)}}}")
    return f"blocks.{layer}.{unit}"


def counterparts(hook: str) -> dict[str, str]:
    """The TransformerLens / mamba-lens names of a hook, where docs/hooks.md gives one."""
    layer, unit = split_hook(hook)
    out = {}
    if unit in TRANSFORMER_LENS:
        out["hook_name_transformer_lens"] = f"blocks.{layer}.{TRANSFORMER_LENS[unit]}"
    if unit in MAMBA_LENS:
        out["hook_name_mamba_lens"] = f"blocks.{layer}.{MAMBA_LENS[unit]}"
    return out


@dataclass(frozen=True)
class DictionarySpec:
    """What a dictionary reads and writes: ``hook_in`` [.., d_in] → ``d_sae`` TopK-``k`` latents → ``hook_out``
    [.., d_out] (``hook_in == hook_out`` for an SAE)."""

    kind: str
    hook_in: str
    hook_out: str
    d_in: int
    d_out: int
    d_sae: int
    k: int
    model_name: str

    @property
    def layer(self) -> int:
        return int(_NAME.match(self.hook_out).group(1))


def new_coder(spec: DictionarySpec) -> nn.Module:
    """A freshly initialised ``sparsify.SparseCoder`` for ``spec`` (float32; its transcoder needs d_in = d_out)."""
    if spec.d_in != spec.d_out:
        raise ValueError(f"a transcoder from {spec.hook_in} ({spec.d_in}) to {spec.hook_out} ({spec.d_out}) needs "
                         "equal widths (sparsify's SparseCoder decodes into its input width)")
    SparseCoder, SparseCoderConfig = _sparsify()
    cfg = SparseCoderConfig(activation="topk", num_latents=spec.d_sae, k=spec.k, transcode=spec.kind == "transcoder",
                            normalize_decoder=spec.kind == "topk")
    return SparseCoder(spec.d_in, cfg, device="cpu", dtype=torch.float32)


def _sparsify():
    """sparsify's classes; its import prints a notice about Triton to stdout, which is not our output."""
    with contextlib.redirect_stdout(io.StringIO()):
        from sparsify import SparseCoder, SparseCoderConfig
    return SparseCoder, SparseCoderConfig


@torch.no_grad()
def codes(coder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Dense latent activations [n, d_sae] of inputs x [n, d_in] (zero outside each row's top k)."""
    top_acts, top_indices, _ = coder.encode(x.to(coder.dtype))
    return torch.zeros(x.shape[0], coder.num_latents, dtype=top_acts.dtype,
                       device=top_acts.device).scatter_(1, top_indices, top_acts)


@torch.no_grad()
def reconstruct(coder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The dictionary's output [n, d_out] for inputs x [n, d_in]."""
    top_acts, top_indices, _ = coder.encode(x.to(coder.dtype))
    return coder.decode(top_acts, top_indices)


def saelens_weights(coder: nn.Module) -> dict[str, torch.Tensor]:
    """SAELens tensors: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out].

    sparsify's SAE encodes W(x − b_dec) + b; SAELens (apply_b_dec_to_input false) encodes x W_enc + b_enc,
    so b_enc = b − W b_dec (a transcoder does not centre its input: b_enc = b)."""
    W, b = coder.encoder.weight.detach(), coder.encoder.bias.detach()
    b_enc = b if coder.cfg.transcode else b - W @ coder.b_dec.detach()
    return {"W_enc": W.T.contiguous(), "b_enc": b_enc.contiguous(), "W_dec": coder.W_dec.detach().contiguous(),
            "b_dec": coder.b_dec.detach().contiguous()}


def saelens_cfg(spec: DictionarySpec, dtype: str = "float32", **extra: Any) -> dict[str, Any]:
    """cfg.json: SAELens's fields (architecture, d_in, d_sae, k, hook_name, model_name, dtype, normalisation;
    v6 also under ``metadata``), ours (``hook_name_out``, ``d_out`` for a transcoder) and the
    TransformerLens / mamba-lens counterparts of the hooks."""
    meta = {"model_name": spec.model_name, "hook_name": spec.hook_in, "hook_layer": spec.layer,
            "hook_head_index": None, "prepend_bos": True, **counterparts(spec.hook_in)}
    cfg: dict[str, Any] = {"architecture": spec.kind, "d_in": spec.d_in, "d_sae": spec.d_sae, "k": spec.k,
                           "activation_fn": "topk", "activation_fn_kwargs": {"k": spec.k}, "dtype": dtype,
                           "device": "cpu", "apply_b_dec_to_input": False, "normalize_activations": "none",
                           "reshape_activations": "none", **meta, "metadata": dict(meta)}
    if spec.kind == "transcoder":
        out = {"hook_name_out": spec.hook_out, "hook_layer_out": spec.layer, "hook_head_index_out": None,
               "d_out": spec.d_out,
               **{f"{k}_out": v for k, v in counterparts(spec.hook_out).items()}}
        cfg.update(out)
        cfg["metadata"].update(out)
    cfg["mambascope"] = {"spec": asdict(spec), **extra}
    return cfg


def save_dictionary(coder: nn.Module, spec: DictionarySpec, directory: Path, **extra: Any) -> None:
    """Write ``cfg.json`` and ``sae_weights.safetensors`` into ``directory`` (an OutputDir's staging folder)."""
    save_file(saelens_weights(coder), str(directory / WEIGHTS_FILE))
    (directory / CFG_FILE).write_text(json.dumps(saelens_cfg(spec, **extra), indent=1))


def load_dictionary(directory: str | Path) -> tuple[nn.Module, DictionarySpec]:
    """A dictionary saved by ``save_dictionary``, as a ``SparseCoder`` whose codes equal the saved file's."""
    directory = Path(directory)
    try:
        cfg = json.loads((directory / CFG_FILE).read_text())
        spec = DictionarySpec(**cfg["mambascope"]["spec"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FileNotFoundError(f"{directory}: not a dictionary written by mambascope sae ({exc})") from None
    weights = load_file(str(directory / WEIGHTS_FILE))
    coder = new_coder(spec)
    with torch.no_grad():
        coder.encoder.weight.copy_(weights["W_enc"].T)
        coder.W_dec.copy_(weights["W_dec"])
        coder.b_dec.copy_(weights["b_dec"])
        # undo the fold of saelens_weights: b = b_enc + W b_dec for an SAE
        fold = 0 if coder.cfg.transcode else coder.encoder.weight @ coder.b_dec
        coder.encoder.bias.copy_(weights["b_enc"] + fold)
    return coder, spec
