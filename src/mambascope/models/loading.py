"""Load a causal LM and its tokenizer: a bundled tiny model, a local checkpoint, or a hub id.

Every route ends in the real ``transformers`` ``from_pretrained`` code path, so a bundled model is
loaded exactly as a user's checkpoint would be.
"""

from __future__ import annotations

import difflib
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

BUNDLED: dict[str, str] = {
    "tiny-mamba": "Mamba-1 (MambaForCausalLM)",
    "tiny-mamba2": "Mamba-2 (Mamba2ForCausalLM)",
    "tiny-gpt": "GPT-2 style transformer (GPT2LMHeadModel)",
    "tiny-mamba2-mqar": "Mamba-2 trained on MQAR, 8 key-value pairs in 64 tokens (docs/models.md, Task models)",
}
# model_type (config.json) -> the causal-LM class mambascope knows how to trace.
SUPPORTED: dict[str, str] = {
    "mamba": "MambaForCausalLM",
    "mamba2": "Mamba2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,
}
# owner/name or a bare legacy name ("gpt2"); the Hub allows letters, digits, "-", "_", ".".
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def bundled_path(name: str) -> Path:
    """Directory of the bundled model ``name`` inside the installed package."""
    if name not in BUNDLED:
        raise ValueError(f"{name!r} is not a bundled model; bundled: {', '.join(BUNDLED)}")
    return Path(str(resources.files("mambascope") / "assets" / name))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else is parsed by ``torch.device``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``None`` -> float32; accepts torch dtypes and names such as ``"bfloat16"`` or ``"fp16"``."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type, got {dtype}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return _DTYPES[key]


def _unknown(name: str, why: str) -> str:
    close = difflib.get_close_matches(name, list(BUNDLED), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"cannot load model {name!r}{hint}: {why}; bundled models: {', '.join(BUNDLED)}"


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; the environment may have been set later.
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:
        pass
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _check_supported(model_type: str | None, source: str) -> None:
    if model_type not in SUPPORTED:
        supported = ", ".join(f"{cls} ({mt})" for mt, cls in SUPPORTED.items())
        raise ValueError(
            f"unsupported architecture {model_type!r} in {source}: mambascope supports {supported}"
        )


def _resolve_source(name_or_path: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is local)."""
    if name_or_path in BUNDLED:
        path = bundled_path(name_or_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"bundled model {name_or_path!r} is missing from this install ({path}); "
                "reinstall mambascope or retrain it with `mambascope train-tiny` (docs/models.md)"
            )
        return str(path), True
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(_unknown(name_or_path, f"directory {path} has no config.json"))
        return str(path), True
    if path.exists():
        raise FileNotFoundError(_unknown(name_or_path, f"{path} is a file, not a checkpoint directory"))
    if not _HUB_ID.match(name_or_path):
        # "./x", "/a/b", "a/b/c": only a path can look like this, and there is nothing there.
        raise FileNotFoundError(_unknown(name_or_path, f"no such directory {path}"))
    if "/" not in name_or_path and difflib.get_close_matches(name_or_path, list(BUNDLED), n=1, cutoff=0.8):
        # "tiny-mamb": a typo of a bundled name, not worth a round of hub retries.
        raise ValueError(_unknown(name_or_path, "not a bundled model name nor a local directory"))
    return name_or_path, False


def load_model(
    name_or_path: str,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` for a bundled name, a local checkpoint directory, or a hub id.

    Bundled names: ``tiny-mamba``, ``tiny-mamba2``, ``tiny-gpt``. Supported architectures
    (``config.model_type``): mamba, mamba2, gpt2. ``device="auto"`` picks CUDA when available;
    ``dtype=None`` means float32. The model is returned in eval mode.
    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for an unknown name, an
    unreachable hub, an unsupported architecture, or a checkpoint without tokenizer files.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    source, local = _resolve_source(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as exc:
        if local:
            raise ValueError(f"cannot read the config of {source}: {exc}") from None
        if _hub_offline():
            why = "it is not a local directory and the Hugging Face Hub is offline (HF_HUB_OFFLINE=1)"
        elif "connect" in str(exc).lower():
            why = "it is not a local directory and the Hugging Face Hub is unreachable (the machine seems offline)"
        else:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            why = f"it is not a local directory and the Hugging Face Hub has no such model ({first[:200]})"
        raise ValueError(_unknown(name_or_path, why)) from None
    except ValueError as exc:
        # transformers raises ValueError for a config.json without a known model_type.
        raise ValueError(f"unsupported checkpoint {name_or_path!r}: {exc}") from None
    _check_supported(getattr(config, "model_type", None), name_or_path)

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ValueError(f"no usable tokenizer for {name_or_path!r}: {str(exc).splitlines()[0]}") from None

    model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=torch_dtype)
    model.to(dev)
    model.eval()
    return model, tokenizer
