"""Plain LoRA adapters (PEFT's format), read and applied by polytool's own code (no PEFT).

    adapter_config.json         peft_type "LORA", r, lora_alpha, use_rslora, fan_in_fan_out, ...
    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight   (r, in)
                                base_model.model.<module path>.lora_B.weight   (out, r)

The update is PEFT's: y = base(x) + (x @ A.T @ B.T) * scaling, with scaling lora_alpha / r
(lora_alpha / sqrt(r) under use_rslora), computed in float32 and cast back to the base's dtype.
fan_in_fan_out only says the target stores its weight as (in, out) (GPT-2's Conv1D), which PEFT
corrects from the module's type; the forward update does not depend on it. Any config feature
that would change the forward beyond this is refused.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import FLOAT_DTYPES, TORCH_NAMES, SafetensorsFile, parse_json
from .errors import AdapterError, PolytoolError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
SUFFIX_A, SUFFIX_B = ".lora_A.weight", ".lora_B.weight"

# Config keys that do not change the eval forward of the saved tensors (metadata, targeting, init).
IGNORED_KEYS = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
    "auto_mapping", "r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "use_rslora", "target_modules",
    "exclude_modules", "init_lora_weights", "layers_to_transform", "layers_pattern", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "runtime_config", "ensure_weight_tying",
    "megatron_core", "qalora_group_size",
})
# Every other key must hold a neutral value; anything else is a feature this applier does not have
# (use_dora, lora_bias, bias, modules_to_save, rank_pattern, alpha_pattern, layer_replication, ...).
NEUTRAL = (None, False, "none", {}, [])


@dataclass
class LoraArtifact:
    """A validated plain LoRA adapter: per module, A (r, in) and B (out, r) as float32."""

    directory: Path
    config: dict
    r: int
    lora_alpha: float
    scaling: float
    dtype: str  # the least precise dtype its tensors are stored in: float32, float16 or bfloat16
    metadata: dict[str, str]
    weights: dict[str, tuple[np.ndarray, np.ndarray]]


def _read_config(file: Path) -> dict:
    try:
        config = parse_json(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"cannot read the LoRA config ({exc.__class__.__name__}: {exc})", file) from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        got = config.get("peft_type") if isinstance(config, dict) else None
        raise AdapterError(f"peft_type is {got!r}, not 'LORA': not a LoRA adapter", file)
    for key, value in config.items():
        if key not in IGNORED_KEYS and not any(value == n and type(value) is type(n) for n in NEUTRAL):
            raise AdapterError(f"uses the LoRA feature {key}={value!r}, which polytool cannot apply", file)
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"r must be an integer >= 1, got {r!r}", file)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterError(f"lora_alpha must be a number, got {alpha!r} (PEFT would silently use 8)", file)
    return config


def _module_of(key: str, file: Path) -> tuple[str, str]:
    for suffix in (SUFFIX_A, SUFFIX_B):
        if key.startswith(PREFIX) and key.endswith(suffix):
            return key[len(PREFIX) : -len(suffix)], suffix
    raise AdapterError(f"unexpected tensor {key!r} (expected base_model.model.<module>.lora_A/lora_B.weight)", file)


def _read_weights(tensors: SafetensorsFile, r: int, file: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    found: dict[str, dict[str, str]] = {}
    for key in tensors.keys():
        module, suffix = _module_of(key, file)
        found.setdefault(module, {})[suffix] = key
    if not found:
        raise AdapterError("holds no LoRA tensors", file)
    weights = {}
    for module, keys in found.items():
        if len(keys) != 2:
            raise AdapterError(f"module {module!r} has only one of lora_A / lora_B", file)
        if any(tensors.dtype(k) not in FLOAT_DTYPES for k in keys.values()):
            raise AdapterError(f"module {module!r}: LoRA tensors must be floating point", file)
        A, B = (tensors.float_array(keys[s], np.float32) for s in (SUFFIX_A, SUFFIX_B))
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != r or B.shape[1] != r:
            raise AdapterError(f"module {module!r}: lora_A {list(A.shape)} / lora_B {list(B.shape)} "
                               f"do not match (r, in) / (out, r) with r={r}", file)
        if not (np.isfinite(A).all() and np.isfinite(B).all()):
            raise AdapterError(f"module {module!r}: LoRA tensors contain NaN or Inf", file)
        weights[module] = (A, B)
    return weights


def read_lora(directory: str | Path) -> LoraArtifact:
    """Open and validate a plain LoRA adapter directory (safetensors only)."""
    directory = Path(directory)
    config = _read_config(directory / CONFIG_NAME)
    file = directory / WEIGHTS_NAME
    if not file.is_file():
        raise AdapterError(f"no {WEIGHTS_NAME} in the LoRA adapter directory", directory)
    try:
        tensors = SafetensorsFile(file)
    except PolytoolError as exc:
        raise AdapterError(exc.message, file) from None
    with tensors:
        weights = _read_weights(tensors, config["r"], file)
        metadata = dict(tensors.metadata)
        stored = {tensors.dtype(key) for key in tensors.keys()}
    dtype = next(TORCH_NAMES[d] for d in ("BF16", "F16", "F32", "F64") if d in stored)
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return LoraArtifact(directory, config, r, alpha, scaling, dtype, metadata, weights)


def attach_lora(layers: dict, weights: dict, scaling: float) -> list:
    """Add y += (x @ A.T @ B.T) * scaling to each Linear through a forward hook.

    layers: {module path: nn.Linear or Conv1D}; weights: {module path: (A (r, in), B (out, r))} as
    numpy arrays, the same keys. The update runs in float32 and the sum is cast back to the layer's
    output dtype, as PEFT does. Every shape is checked before any hook is added; the returned
    handles' `remove()` restores the plain layers.
    """
    import torch

    from .poly.layer import linear_features

    for name, (A, B) in weights.items():
        d_in, d_out = linear_features(layers[name], name)
        if A.shape[1] != d_in or B.shape[0] != d_out:
            raise PolytoolError(f"module {name!r}: lora_A {list(A.shape)} / lora_B {list(B.shape)} "
                                f"do not fit the base's layer (in {d_in}, out {d_out})")
    handles = []
    for name, (A, B) in weights.items():
        device = layers[name].weight.device
        At = torch.as_tensor(np.ascontiguousarray(A.T), dtype=torch.float32, device=device)  # (in, r)
        Bt = torch.as_tensor(np.ascontiguousarray(B.T), dtype=torch.float32, device=device)  # (r, out)

        def hook(mod, args, out, At=At, Bt=Bt):
            x = args[0].to(At.device, torch.float32)
            update = (x @ At) @ Bt * scaling  # (..., in) @ (in, r) @ (r, out) -> (..., out)
            return (out.to(torch.float32) + update.to(out.device)).to(out.dtype)

        handles.append(layers[name].register_forward_hook(hook))
    return handles
