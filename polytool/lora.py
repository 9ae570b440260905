"""Plain LoRA adapters (PEFT's format), read and applied as PEFT 0.21 loads them, by polytool's own code.

    adapter_config.json         peft_type "LORA", r, lora_alpha, target_modules, rank_pattern, ...
    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight   (r_m, in)
                                base_model.model.<module path>.lora_B.weight   (out, r_m)   (+ .lora_B.bias)
                                base_model.model.<path>.<param>                modules_to_save copies (heads)

The update is PEFT's: y = base(x) + (x @ A.T @ B.T [+ b]) * scaling_m, in float32, cast back to the
base's dtype. Which modules get it is decided as PEFT decides (target_modules, exclude_modules,
layers_to_transform / layers_pattern, never inside modules_to_save), and so is each module's scaling
(rank_pattern / alpha_pattern; lora_alpha / r, or / sqrt(r) under use_rslora). Every config field of
PEFT 0.21's LoraConfig is either honoured, has no effect on a loaded adapter's forward, or is refused
in one line naming it (docs/formats.md has the table): an artifact is never applied in a way PEFT,
vLLM or TGI would not apply it.
"""
from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .adapter import CONFIG_NAME, PREFIX
from .checkpoint import FLOAT_DTYPES, TORCH_NAMES, SafetensorsFile, least_precise, parse_json
from .errors import AdapterError, PolytoolError

WEIGHTS_NAME = "adapter_model.safetensors"
SUFFIX_A, SUFFIX_B, SUFFIX_BIAS = ".lora_A.weight", ".lora_B.weight", ".lora_B.bias"

# Fields that change nothing in the eval forward of saved tensors (metadata, dropout, init-time helpers
# whose effect is in the saved tensors: EVA, orthogonal and gaussian inits leave the base untouched).
NO_EFFECT = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
    "auto_mapping", "lora_dropout", "runtime_config", "megatron_core", "qalora_group_size", "eva_config",
    "fan_in_fan_out",
})
# Fields honoured exactly.
HONOURED = frozenset({"r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules", "layers_to_transform",
                      "layers_pattern", "rank_pattern", "alpha_pattern", "modules_to_save", "lora_bias", "bias",
                      "init_lora_weights", "loftq_config", "corda_config", "lora_ga_config"})
# init_lora_weights values that rewrite the base weights at init: the adapter is right only on that changed base
BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")
# Every other field must keep its neutral value (use_dora, layer_replication, target_parameters, ...).
NEUTRAL = (None, False, "none", {}, [])


@dataclass
class LoraArtifact:
    """A validated plain LoRA adapter: per module, A (r_m, in) and B (out, r_m) as float32."""

    directory: Path
    config: dict
    dtype: str  # the least precise float dtype its tensors are stored in
    metadata: dict[str, str]
    weights: dict[str, tuple[np.ndarray, np.ndarray]]
    biases: dict[str, np.ndarray] = field(default_factory=dict)  # lora_bias: lora_B's bias per module
    saved: dict[str, np.ndarray] = field(default_factory=dict)  # modules_to_save tensors by model tensor name

    @property
    def r(self) -> int:
        return self.config["r"]

    def scaling(self, module: str) -> float:
        """PEFT's scale of `module`: alpha / r (alpha / sqrt(r) under use_rslora), patterns resolved."""
        r = _pattern_value(self.config.get("rank_pattern") or {}, module, self.config["r"])
        alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module, self.config["lora_alpha"])
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    @property
    def scalings(self) -> dict[str, float]:
        """{module: its scale} for every module the LoRA holds."""
        return {module: self.scaling(module) for module in self.weights}

    def rank(self, module: str) -> int:
        return int(_pattern_value(self.config.get("rank_pattern") or {}, module, self.config["r"]))


def _pattern_value(pattern: dict, module: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the first key whose regex matches the end of the module path."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return pattern[key]
    return default


def _check_config(config: Any, file: Path) -> dict:
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        got = config.get("peft_type") if isinstance(config, dict) else None
        raise AdapterError(f"peft_type is {got!r}, not 'LORA': not a LoRA adapter", file)
    for key, value in config.items():
        if key in NO_EFFECT or key in HONOURED:
            continue
        if not any(value == n and type(value) is type(n) for n in NEUTRAL) and key in KNOWN_FIELDS:
            raise AdapterError(f"uses the LoRA feature {key}={value!r}, which polytool cannot apply exactly", file)
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise AdapterError(f"uses init_lora_weights={init!r}, which rewrites the base weights at init: the adapter "
                           "is right only on that changed base, which polytool does not have", file)
    if config.get("bias", "none") != "none":
        raise AdapterError(f"uses bias={config['bias']!r}: the base's biases were trained and are not in the adapter "
                           "file in a form polytool applies", file)
    if config.get("target_modules") == "all-linear":
        raise AdapterError("target_modules is 'all-linear', which PEFT resolves against the model at training time: "
                           "list the module names", file)
    r, alpha = config.get("r", 8), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"r must be an integer >= 1, got {r!r}", file)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterError(f"lora_alpha must be a number, got {alpha!r} (PEFT would silently use 8)", file)
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise AdapterError(f"{key} must be an object of pattern -> number, got {config[key]!r}", file)
    return {**config, "r": r}


# LoraConfig's fields in PEFT 0.21 (a field not listed here is unknown to PEFT, which drops it with a warning)
KNOWN_FIELDS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
    "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core", "trainable_token_indices", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "use_dora", "velora_config", "alora_invocation_tokens",
    "use_qalora", "qalora_group_size", "monteclora_config", "layer_replication", "runtime_config", "lora_bias",
    "target_parameters", "use_bdlora", "arrow_config", "kasa_config", "ensure_weight_tying",
})


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix in (SUFFIX_A, SUFFIX_B, SUFFIX_BIAS):
        if key.startswith(PREFIX) and key.endswith(suffix):
            return key[len(PREFIX):-len(suffix)], suffix
    return None


def _read_tensors(tensors: SafetensorsFile, config: dict, file: Path) -> tuple[dict, dict, dict]:
    found: dict[str, dict[str, str]] = {}
    saved: dict[str, np.ndarray] = {}
    owners = config.get("modules_to_save") or []
    owners = [owners] if isinstance(owners, str) else owners
    for key in tensors.keys():
        parsed = _split_key(key)
        if parsed is not None:
            found.setdefault(parsed[0], {})[parsed[1]] = key
            continue
        name = key[len(PREFIX):] if key.startswith(PREFIX) else ""
        if not any(f".{m}." in f".{name}" for m in owners):
            raise AdapterError(f"unexpected tensor {key!r} (expected base_model.model.<module>.lora_A/lora_B.weight, "
                               "or a modules_to_save module the config names)", file)
        saved[name] = tensors.float_array(key, np.float32)
    if not found:
        raise AdapterError("holds no LoRA tensors", file)
    weights, biases = {}, {}
    for module, keys in found.items():
        if SUFFIX_A not in keys or SUFFIX_B not in keys:
            raise AdapterError(f"module {module!r} has only one of lora_A / lora_B", file)
        if any(tensors.dtype(k) not in FLOAT_DTYPES for k in keys.values()):
            raise AdapterError(f"module {module!r}: LoRA tensors must be floating point", file)
        A, B = (tensors.float_array(keys[s], np.float32) for s in (SUFFIX_A, SUFFIX_B))
        r = int(_pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != r or B.shape[1] != r:
            raise AdapterError(f"module {module!r}: lora_A {list(A.shape)} / lora_B {list(B.shape)} "
                               f"do not match (r, in) / (out, r) with r={r} (its rank_pattern / r)", file)
        if SUFFIX_BIAS in keys:
            if not config.get("lora_bias"):
                raise AdapterError(f"module {module!r} has a lora_B bias, but lora_bias is false: PEFT would not "
                                   "load it", file)
            biases[module] = tensors.float_array(keys[SUFFIX_BIAS], np.float32)
        arrays = [A, B] + ([biases[module]] if module in biases else [])
        if not all(np.isfinite(a).all() for a in arrays):
            raise AdapterError(f"module {module!r}: LoRA tensors contain NaN or Inf", file)
        weights[module] = (A, B)
    return weights, biases, saved


def read_lora(directory: str | Path) -> LoraArtifact:
    """Open and validate a plain LoRA adapter directory (safetensors only)."""
    directory = Path(directory)
    config_file = directory / CONFIG_NAME
    try:
        config = parse_json(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"cannot read the LoRA config ({exc.__class__.__name__}: {exc})", config_file) from None
    config = _check_config(config, config_file)
    file = directory / WEIGHTS_NAME
    if not file.is_file():
        raise AdapterError(f"no {WEIGHTS_NAME} in the LoRA adapter directory", directory)
    try:
        tensors = SafetensorsFile(file)
    except PolytoolError as exc:
        raise AdapterError(exc.message, file) from None
    with tensors:
        weights, biases, saved = _read_tensors(tensors, config, file)
        metadata = dict(tensors.metadata)
        stored = {tensors.dtype(key) for key in tensors.keys()}
    dtype = TORCH_NAMES[least_precise(stored)]
    return LoraArtifact(directory, config, dtype, metadata, weights, biases, saved)


# ---- which modules PEFT wraps ----------------------------------------------------------------


def _layer_index(config: dict, name: str) -> int | None:
    patterns = config.get("layers_pattern")
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match.group("idx")) if match else None


def is_target(config: dict, name: str) -> bool:
    """PEFT 0.21's check_target_module_exists for one module path."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, name):
                return False
        elif name in exclude or any(name.endswith(f".{e}") for e in exclude):
            return False
    saved = config.get("modules_to_save") or []
    if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in ([saved] if isinstance(saved, str) else saved)):
        return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    found = any(name.endswith(f".{t}") for t in targets)
    layers = config.get("layers_to_transform")
    if found and layers is not None and (not isinstance(layers, list) or layers):
        index = _layer_index(config, name)
        if index is None:
            return False
        return index == layers if isinstance(layers, int) else index in layers
    return found


def lora_targets(artifact: LoraArtifact, module_names: list[str]) -> set[str]:
    """Of a model's module paths, those PEFT would wrap with this LoRA."""
    return {name for name in module_names if name and is_target(artifact.config, name)}


def attach_lora(layers: dict, artifact: LoraArtifact) -> list:
    """Add y += (x @ A.T @ B.T + b) * scaling to the modules PEFT would wrap, through forward hooks.

    layers: {module path: nn.Linear or Conv1D} for EVERY linear layer of the model. A tensor for a module
    PEFT would not wrap, or a wrapped module without tensors, is refused (PEFT would ignore the one and
    leave the other at its init). Shapes are checked before any hook is added; the returned handles'
    `remove()` restores the plain layers.
    """
    import torch

    from .poly.layer import linear_features

    targets = lora_targets(artifact, list(layers))
    ignored = sorted(set(artifact.weights) - targets)
    if ignored:
        why = "is not a linear layer of this model" if ignored[0] not in layers else "is not selected by its config"
        raise PolytoolError(f"the LoRA holds tensors for {ignored[0]!r}, which {why} (target_modules, "
                            f"exclude_modules, layers_to_transform): PEFT would ignore them", artifact.directory)
    missing = sorted(targets - set(artifact.weights))
    if missing:
        raise PolytoolError(f"the config selects {missing[0]!r} ({len(missing)} modules in all), but the LoRA holds no "
                            "tensors for it: PEFT would leave it at its initial value", artifact.directory)
    for name, (A, B) in artifact.weights.items():
        d_in, d_out = linear_features(layers[name], name)
        if A.shape[1] != d_in or B.shape[0] != d_out:
            raise PolytoolError(f"module {name!r}: lora_A {list(A.shape)} / lora_B {list(B.shape)} "
                                f"do not fit the base's layer (in {d_in}, out {d_out})", artifact.directory)
    handles = []
    for name, (A, B) in artifact.weights.items():
        device = layers[name].weight.device
        At = torch.as_tensor(np.ascontiguousarray(A.T), dtype=torch.float32, device=device)  # (in, r)
        Bt = torch.as_tensor(np.ascontiguousarray(B.T), dtype=torch.float32, device=device)  # (r, out)
        bias = artifact.biases.get(name)
        b = None if bias is None else torch.as_tensor(bias, dtype=torch.float32, device=device)  # (out,)
        scale = artifact.scaling(name)

        def hook(mod, args, out, At=At, Bt=Bt, b=b, scale=scale):
            x = args[0].to(At.device, torch.float32)
            update = (x @ At) @ Bt  # (..., in) @ (in, r) @ (r, out) -> (..., out)
            if b is not None:
                update = update + b
            return (out.to(torch.float32) + (update * scale).to(out.device)).to(out.dtype)

        handles.append(layers[name].register_forward_hook(hook))
    return handles


@contextmanager
def swap_saved_modules(model, saved: dict[str, np.ndarray]) -> Iterator[None]:
    """Inside the block the model's tensors named in `saved` (modules_to_save copies) hold the saved values:
    new tensors put in place, as PEFT's copy of the module is, so a head tied to the embeddings is changed
    alone; the originals are put back after."""
    import torch

    swapped = []
    try:
        for name, value in saved.items():
            path, _, attr = name.rpartition(".")
            try:
                owner = model.get_submodule(path)
            except AttributeError:
                owner = None
            tensor = getattr(owner, attr, None)
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != value.shape:
                shown = "missing" if not isinstance(tensor, torch.Tensor) else f"of shape {list(tensor.shape)}"
                raise PolytoolError(f"the artifact's trained {name} {list(value.shape)} does not fit this model "
                                    f"(its tensor is {shown}): wrong base model?")
            new = torch.as_tensor(value).to(tensor.device, tensor.dtype)
            swapped.append((owner, attr, tensor))
            setattr(owner, attr, torch.nn.Parameter(new, requires_grad=False) if isinstance(tensor, torch.nn.Parameter)
                    else new)
        yield
    finally:
        for owner, attr, tensor in reversed(swapped):
            setattr(owner, attr, tensor)
