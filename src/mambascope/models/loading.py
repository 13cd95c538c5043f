"""Load a causal LM and its tokenizer: a bundled tiny model, a local checkpoint, or a hub id.

Every route ends in the real ``transformers`` ``from_pretrained`` code path, so a bundled model is
loaded exactly as a user's checkpoint would be.
"""

from __future__ import annotations

import difflib
import json
import os
import pickle
import re
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

# model_type (config.json) -> the causal-LM class mambascope knows how to trace: one per adapter.
from mambascope.arch import SUPPORTED

BUNDLED: dict[str, str] = {
    "tiny-mamba": "Mamba-1 (MambaForCausalLM)",
    "tiny-mamba2": "Mamba-2 (Mamba2ForCausalLM)",
    "tiny-gpt": "GPT-2 style transformer (GPT2LMHeadModel)",
    "tiny-hybrid": "Bamba hybrid: Mamba-2 and attention layers, each with a SwiGLU MLP (BambaForCausalLM)",
    "tiny-mamba-mqar": "Mamba-1 trained on MQAR, 8 key-value pairs in 64 tokens (docs/models.md, Task models)",
    "tiny-mamba2-mqar": "Mamba-2 trained on MQAR, 8 key-value pairs in 64 tokens (docs/models.md, Task models)",
    "tiny-gpt-mqar": "GPT-2 trained on MQAR, 8 key-value pairs in 64 tokens (docs/models.md, Task models)",
    "tiny-gpt-copy": "GPT-2 trained on copying 31 symbols in 64 tokens (docs/models.md, Task models)",
    "tiny-mamba-copy": "Mamba-1 trained on copying 31 symbols in 64 tokens (docs/models.md, Task models)",
    "tiny-mamba2-copy": "Mamba-2 trained on copying 31 symbols in 64 tokens (docs/models.md, Task models)",
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


# What save_pretrained writes: weights (single file or sharded index) and a tokenizer's vocabulary.
_WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt")
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}
_RESAVE = "re-save the checkpoint with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _check_config_json(path: Path) -> None:
    """``path/config.json`` is a readable JSON object (transformers' own errors name neither the problem nor
    the fix for a file that is not JSON or is a JSON list)."""
    file = path / "config.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {file}: {_first_line(exc)}; restore the config.json saved with the "
                         f"weights, or {_RESAVE}") from exc
    if not isinstance(data, dict):
        kind = _JSON_TYPES.get(type(data), type(data).__name__)
        raise ValueError(f"{file} must be a JSON object with a \"model_type\" key, got a JSON {kind}; restore the "
                         f"config.json saved with the weights, or {_RESAVE}")


def _weights_file(path: Path) -> Path:
    """The checkpoint's weights file in ``path`` (FileNotFoundError naming the files looked for)."""
    for name in _WEIGHTS_FILES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"no weights file in {path} (looked for {', '.join(_WEIGHTS_FILES)}); {_RESAVE}")


def _check_tokenizer_files(path: Path, what: str) -> None:
    # Without them transformers builds an empty tokenizer for the model type (2 special tokens) instead of failing.
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(f"no tokenizer files in {what} {path} (looked for {', '.join(_TOKENIZER_FILES)}); save "
                         "the tokenizer there with tokenizer.save_pretrained(dir)")


def _tokenizer(source: str, what: str) -> Any:
    """AutoTokenizer for ``source``, refused when it cannot tokenize text (no ordinary token at all)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"no usable tokenizer in {what}: {_first_line(exc)}; save a tokenizer there with "
                         "tokenizer.save_pretrained(dir)") from exc
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise ValueError(f"the tokenizer of {what} has only special tokens ({len(tokenizer)} in all), so it cannot "
                         "encode text; save the real tokenizer there with tokenizer.save_pretrained(dir)")
    return tokenizer


def load_tokenizer(name_or_path: str | Path) -> Any:
    """The tokenizer of a bundled model name or of a local directory it was saved to (``save_pretrained``).

    Raises ``FileNotFoundError`` for a missing directory and ``ValueError`` for a directory without tokenizer
    files or with unreadable ones, each naming the directory and the fix.
    """
    if str(name_or_path) in BUNDLED:
        path = bundled_path(str(name_or_path))
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory {path} does not exist: give a directory a tokenizer was "
                                    f"saved to (tokenizer.save_pretrained) or a bundled model: {', '.join(BUNDLED)}")
    _check_tokenizer_files(path, "tokenizer directory")
    return _tokenizer(str(path), f"tokenizer directory {path}")


def _weights_problems(info: dict[str, Any]) -> list[str]:
    """Missing and shape-mismatched weights from ``from_pretrained(output_loading_info=True)``, as text."""
    problems = []
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        problems.append(f"{len(missing)} weight(s) the config needs are missing ({', '.join(missing[:3])}"
                        f"{', …' if len(missing) > 3 else ''})")
    for key, ckpt_shape, model_shape in sorted(info.get("mismatched_keys") or ())[:3]:
        problems.append(f"{key} has shape {list(ckpt_shape)} in the weights but {list(model_shape)} in the config")
    return problems


def _load_weights(source: str, config: Any, dtype: torch.dtype, weights: str, config_file: str,
                  device_map: str | dict | None = None) -> nn.Module:
    """``from_pretrained`` with every failure as one ValueError naming ``weights`` and the fix.

    transformers only logs missing weights (left randomly initialised) and, with ``ignore_mismatched_sizes``,
    mismatched shapes; both are refused here, so a model never runs on weights it did not load.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would repeat, at length, what the error below says
    try:
        placement = {} if device_map is None else {"device_map": device_map}
        model, info = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype,
                                                           output_loading_info=True, ignore_mismatched_sizes=True,
                                                           **placement)
    except SafetensorError as exc:
        raise ValueError(f"{weights} is not a readable safetensors file ({_first_line(exc)}): it is truncated or "
                         f"corrupt; copy it again, or {_RESAVE}") from exc
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise ValueError(f"cannot load the weights {weights}: {_first_line(exc)}; copy them again, or {_RESAVE}"
                         ) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = _weights_problems(info)
    if problems:
        raise ValueError(f"the weights {weights} do not match {config_file}: {'; '.join(problems)}; use the "
                         "config.json saved with these weights")
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        warnings.warn(f"{weights} has {len(unexpected)} weight(s) that {config_file} does not use, ignored "
                      f"({', '.join(unexpected[:3])}{', …' if len(unexpected) > 3 else ''})", stacklevel=3)
    return model


def check_checkpoint(name_or_path: str) -> None:
    """What can be checked without loading weights: a bundled name, or a local directory's config.json (a JSON
    object of a supported ``model_type``), weights file and tokenizer files; a hub id only for its form.

    Lets a command refuse a bad model before any work (``compare`` checks every model first).
    """
    source, local = _resolve_source(name_or_path)
    if not local:
        return
    path = Path(source)
    _check_config_json(path)
    _weights_file(path)
    _check_tokenizer_files(path, "checkpoint directory")
    _check_supported(json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type"), name_or_path)


def position_limit(name_or_path: str) -> int | None:
    """``n_positions`` of a bundled or local checkpoint (learned position embeddings end there), read from its
    config.json without loading it; None for a hub id or a model without learned positions."""
    source, local = _resolve_source(name_or_path)
    if not local:
        return None
    limit = json.loads((Path(source) / "config.json").read_text(encoding="utf-8")).get("n_positions")
    return limit if isinstance(limit, int) else None


def load_model(
    name_or_path: str,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` for a bundled name, a local checkpoint directory, or a hub id.

    Bundled names: ``tiny-mamba``, ``tiny-mamba2``, ``tiny-gpt``, ``tiny-hybrid``. Supported architectures
    (``config.model_type``): those of ``mambascope.arch.SUPPORTED`` (mamba, mamba2, gpt2, falcon_mamba,
    ...). ``device="auto"`` picks CUDA when available;
    ``dtype=None`` means float32. The model is returned in eval mode.
    ``device_map`` (``"auto"`` or a {module: device} dict; needs ``accelerate``) places the layers over the
    available devices for a model that does not fit one (``from_pretrained(device_map=...)``); ``device`` is
    then not used.  The tracer moves the residual stream to each block's device.
    Raises ``FileNotFoundError`` for a missing path or weights file and ``ValueError`` for an unknown
    name, an unreachable hub, an unsupported architecture, a config.json that is not a JSON object, a
    checkpoint without tokenizer files, unreadable (truncated, empty, corrupt) weights, or weights that do
    not match the config (missing or of another shape); each names the file and the fix. Weights the
    config does not use are ignored with a warning.
    """
    from transformers import AutoConfig

    dev = resolve_device(device) if device_map is None else None
    if device_map is not None:
        check_device_map(device_map)
    torch_dtype = resolve_dtype(dtype)
    source, local = _resolve_source(name_or_path)
    if local:  # checked before transformers, whose errors for it name neither the file nor the fix
        _check_config_json(Path(source))
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
            why = f"it is not a local directory and the Hugging Face Hub has no such model ({_first_line(exc)[:200]})"
        raise ValueError(_unknown(name_or_path, why)) from None
    except ValueError as exc:
        # transformers raises ValueError for a config.json without a known model_type.
        raise ValueError(f"unsupported checkpoint {name_or_path!r}: {exc}") from None
    _check_supported(getattr(config, "model_type", None), name_or_path)
    weights, config_file = name_or_path, f"the config of {name_or_path}"
    if local:
        weights, config_file = str(_weights_file(Path(source))), str(Path(source) / "config.json")
        _check_tokenizer_files(Path(source), "checkpoint directory")
    tokenizer = _tokenizer(source, repr(name_or_path))
    model = _load_weights(source, config, torch_dtype, weights, config_file, device_map)
    if dev is not None:
        model.to(dev)
    model.eval()
    return model, tokenizer


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map: str | dict) -> None:
    """A ``device_map`` that ``from_pretrained`` takes: one of ``DEVICE_MAPS`` or a dict, with ``accelerate``
    installed; raises ``ValueError`` naming the fix."""
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise ValueError(f"device_map {device_map!r} is not one of {', '.join(DEVICE_MAPS)} (or a dict of module "
                         "name to device)")
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise ValueError("device_map needs the accelerate package: pip install accelerate "
                         "(or pip install 'mambascope[scale]')")
