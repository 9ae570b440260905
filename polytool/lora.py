"""Plain LoRA adapters (PEFT's format), read and applied exactly as PEFT 0.21 loads them (no PEFT import).

    adapter_config.json         peft_type "LORA" + the fields of PEFT's LoraConfig
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight   (r_m, in)
                                base_model.model.<module>.lora_B.weight   (out, r_m)
                                base_model.model.<module>.lora_B.bias     (out,)      lora_bias only
                                base_model.model.<saved module>.<param>               modules_to_save

Which modules PEFT wraps is decided from the config and the model's module names alone
(`lora_targets`: target_modules, exclude_modules, layers_to_transform / layers_pattern, never inside
modules_to_save). Each wrapped module computes y = base(x) + (x @ A.T @ B.T + bias) * scaling_m in
float32, cast back to the layer's dtype, with scaling_m = alpha_m / r_m (alpha_m / sqrt(r_m) under
use_rslora) and r_m, alpha_m resolved from rank_pattern / alpha_pattern as PEFT resolves them. Modules
in modules_to_save run with the saved tensors (`swap_saved_modules`). Every LoraConfig field is either
honoured, without effect on the eval forward of the saved tensors, or refused in one line naming
key=value (docs/formats.md, "LoRA configs verify understands", has the table). Keys that are not
LoraConfig fields are ignored, as PEFT drops them.
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

from .checkpoint import FLOAT_DTYPES, TORCH_NAMES, SafetensorsFile, parse_json
from .errors import AdapterError, PolytoolError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
SUFFIX_A, SUFFIX_B, SUFFIX_BIAS = ".lora_A.weight", ".lora_B.weight", ".lora_B.bias"
MIN_TARGETS_TO_MINIMISE = 20  # PEFT's MIN_TARGET_MODULES_FOR_OPTIMIZATION

# The fields of PEFT 0.21.2's LoraConfig. Any other key is dropped by PEFT (with a warning), and so here.
LORA_FIELDS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
    "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core", "trainable_token_indices", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "use_dora", "velora_config", "alora_invocation_tokens",
    "use_qalora", "qalora_group_size", "monteclora_config", "layer_replication", "runtime_config", "lora_bias",
    "target_parameters", "use_bdlora", "arrow_config", "kasa_config", "ensure_weight_tying",
})
# Fields refused when active: (is it active?, what it does that a plain LoRA forward does not).
REFUSED = {
    "bias": (lambda v: v != "none", "the base model's biases were trained too (saved beside the LoRA)"),
    "use_dora": (bool, "DoRA rescales every output by a learned magnitude"),
    "layer_replication": (bool, "the model is rebuilt with repeated base layers"),
    "target_parameters": (bool, "LoRA on raw nn.Parameters (MoE experts), not on layers"),
    "trainable_token_indices": (lambda v: v is not None, "a trained delta on chosen embedding rows"),
    "megatron_config": (lambda v: v is not None, "Megatron's parallel linear layers"),
    "use_qalora": (bool, "QALoRA pools the input features before lora_A"),
    "alora_invocation_tokens": (bool, "aLoRA applies the adapter only after its invocation tokens"),
    "use_bdlora": (lambda v: v is not None, "BD-LoRA's block-diagonal factors"),
    "arrow_config": (lambda v: v is not None, "Arrow routes each token among several LoRAs"),
    "kasa_config": (lambda v: v is not None, "KaSA truncates the base weight and scales by a learned diagonal"),
    "ensure_weight_tying": (bool, "the adapters of tied layers (embeddings) are tied together"),
}
# init_lora_weights values that rewrite the base weights when the adapter is created: the saved adapter is right
# only on that rewritten base (PEFT's path_initial_model_for_weight_conversion saves a plain LoRA instead).
BASE_CHANGING_INITS = {"pissa": "PiSSA", "corda": "CorDA", "olora": "OLoRA", "loftq": "LoftQ", "lora_ga": "LoRA-GA"}
# Training-only variants (the eval forward is plain LoRA) and the extra tensors they save, skipped here.
TRAINING_ONLY = {"velora_config": (".lora_velora_embed",), "monteclora_config": (".lora_monteclora_sampler.",)}
# What PEFT leaves in a wrapped module that the file has no tensors for, by init_lora_weights.
AT_INIT = {True: "B = 0, a no-op", False: "random A and B", "gaussian": "B = 0, a no-op", "eva": "B = 0, a no-op",
           "orthogonal": "random A and B", "mica": "A = 0, a no-op"}
# Heads PEFT adds to modules_to_save by task type; SEQ_CLS adds them before it picks the LoRA targets.
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


@dataclass
class LoraArtifact:
    """A validated plain LoRA adapter: per module, A (r_m, in) and B (out, r_m) as float32.

    `scalings` holds each module's scaling, rank_pattern / alpha_pattern resolved from the config
    (filled in for every module not given one); r and lora_alpha are the config's defaults.
    """

    directory: Path
    config: dict  # adapter_config.json as written
    dtype: str  # the least precise float dtype its tensors are stored in
    metadata: dict[str, str]
    weights: dict[str, tuple[np.ndarray, np.ndarray]]
    biases: dict[str, np.ndarray] = field(default_factory=dict)  # lora_bias: lora_B's bias (out,) per module
    saved: dict[str, np.ndarray] = field(default_factory=dict)  # modules_to_save tensors by name: classifier.weight
    scalings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        config = _check_config(self.config, Path(self.directory) / CONFIG_NAME)
        self.scalings = {name: self.scalings[name] if name in self.scalings
                         else _scaling(config, *module_rank_alpha(config, name)) for name in self.weights}

    @property
    def r(self) -> int:
        return self.config.get("r", DEFAULTS["r"])

    @property
    def lora_alpha(self) -> float:
        return self.config["lora_alpha"]

    def scaling(self, module: str | None = None) -> float:
        """PEFT's scaling of `module` (patterns resolved); without one, the config's default lora_alpha / r
        (or / sqrt(r) under use_rslora), which modules no pattern names get."""
        config = {**DEFAULTS, **self.config}
        if module is None:
            return _scaling(config, self.r, self.lora_alpha)
        if module in self.scalings:
            return self.scalings[module]
        return _scaling(config, *module_rank_alpha(config, module))

    @property
    def saved_modules(self) -> dict[str, dict[str, np.ndarray]]:
        """The modules_to_save tensors by module (the module PEFT wraps whole): {param name: value}."""
        owners = saved_module_names({**DEFAULTS, **self.config})
        grouped: dict[str, dict[str, np.ndarray]] = {}
        for name, value in self.saved.items():
            owner = _saved_owner(name, owners) or name.rpartition(".")[0]
            grouped.setdefault(owner, {})[name[len(owner) + 1 :]] = value
        return grouped


# ---- the config ----------------------------------------------------------------------------------


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# honoured field -> (is the value well-formed?, what is allowed); a missing field takes PEFT's default
SHAPES = {
    "r": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "lora_bias": (lambda v: isinstance(v, bool), "true or false"),
    "target_modules": (lambda v: isinstance(v, str) or _is_str_list(v), "a regex or a list of module names"),
    "exclude_modules": (lambda v: v is None or isinstance(v, str) or _is_str_list(v),
                        "null, a regex or a list of module names"),
    "layers_to_transform": (lambda v: v is None or _is_int(v) or (isinstance(v, list) and all(map(_is_int, v))),
                            "null, a layer index or a list of them"),
    "layers_pattern": (lambda v: v is None or isinstance(v, str) or _is_str_list(v), "null, a name or a list"),
    "rank_pattern": (lambda v: isinstance(v, dict) and all(_is_int(r) and r >= 1 for r in v.values()),
                     "an object of module pattern -> rank >= 1"),
    "alpha_pattern": (lambda v: isinstance(v, dict) and all(map(_is_number, v.values())),
                      "an object of module pattern -> number"),
    "modules_to_save": (lambda v: v is None or _is_str_list(v), "null or a list of module names"),
    "task_type": (lambda v: v is None or isinstance(v, str), "null or a task type name"),
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)), "true, false or the name of an initialisation"),
}
DEFAULTS = {"r": 8, "use_rslora": False, "lora_bias": False, "exclude_modules": None, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
            "task_type": None, "init_lora_weights": True}


def _init_kind(init: bool | str) -> bool | str:
    """init_lora_weights as PEFT 0.21's update_layer dispatches it: True, False, or a canonical name."""
    if isinstance(init, bool):
        return init
    for prefix, name in BASE_CHANGING_INITS.items():
        if init.startswith(prefix) if prefix in ("pissa", "corda") else init.lower() == prefix:
            return prefix
    if init in ("eva", "orthogonal") or init.lower() in ("gaussian", "mica"):
        return init.lower()
    return "unknown"


def _check_config(raw: Any, file: Path) -> dict:
    """The config with PEFT's defaults filled in; one-line AdapterError for anything not applied exactly."""
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        got = raw.get("peft_type") if isinstance(raw, dict) else None
        raise AdapterError(f"peft_type is {got!r}, not 'LORA': not a LoRA adapter", file)
    config = {**DEFAULTS, **{k: v for k, v in raw.items() if k in LORA_FIELDS}}
    for key, (active, what) in REFUSED.items():
        if key in config and active(config[key]):
            raise AdapterError(f"uses the LoRA feature {key}={config[key]!r}, which polytool cannot apply exactly: "
                               f"{what}", file)
    if "lora_alpha" not in config or not _is_number(config["lora_alpha"]):
        raise AdapterError(f"lora_alpha must be a number, got {config.get('lora_alpha')!r} (PEFT would silently "
                           "use 8)", file)
    if config.get("target_modules") is None:
        raise AdapterError("target_modules=None: PEFT would pick default targets for the model type, which "
                           "polytool does not guess", file)
    for key, (ok, allowed) in SHAPES.items():
        if not ok(config[key]):
            raise AdapterError(f"{key} must be {allowed}, got {config[key]!r}", file)
    if isinstance(config["target_modules"], str) and config["target_modules"].lower() == "all-linear":
        raise AdapterError(f"target_modules is {config['target_modules']!r}, which PEFT resolves from the model's "
                           "layer types (and saves the resolved list): polytool needs the list", file)
    init = _init_kind(config["init_lora_weights"])
    if init in BASE_CHANGING_INITS:
        raise AdapterError(f"init_lora_weights={config['init_lora_weights']!r}: {BASE_CHANGING_INITS[init]} rewrites "
                           "the base weights when the adapter is created, so the adapter is right only on that "
                           "rewritten base, which polytool does not apply", file)
    if init == "unknown":
        raise AdapterError(f"init_lora_weights={config['init_lora_weights']!r} is not an initialisation PEFT knows "
                           "(PEFT refuses to load it)", file)
    _check_combinations(config, init, file)
    return config


def _check_combinations(config: dict, init: bool | str, file: Path) -> None:
    """Combinations PEFT's LoraConfig or its layers refuse to load."""
    pairs = []
    if isinstance(config["target_modules"], str):
        pairs += [(k, "target_modules") for k in ("layers_to_transform", "layers_pattern") if config[k] is not None]
    if config["layers_pattern"] and config["layers_to_transform"] is None:
        pairs.append(("layers_pattern", "layers_to_transform"))
    if config["lora_bias"] and not isinstance(init, bool):
        pairs.append(("lora_bias", "init_lora_weights"))
    variants = [k for k in TRAINING_ONLY if config.get(k) is not None]
    variants += ["init_lora_weights"] if init == "mica" else []
    pairs += [(variants[0], other) for other in variants[1:]]
    if pairs:
        a, b = pairs[0]
        raise AdapterError(f"{a}={config[a]!r} together with {b}={config[b]!r}: PEFT refuses to load this config",
                           file)


def _pattern_value(pattern: dict, module: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the value of the first key (in file order) whose regex ends the module path."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return pattern[key]
    return default


def module_rank_alpha(config: dict, module: str) -> tuple[int, float]:
    """(r_m, alpha_m) of one module path: rank_pattern / alpha_pattern, else r / lora_alpha."""
    return (_pattern_value(config["rank_pattern"], module, config["r"]),
            _pattern_value(config["alpha_pattern"], module, config["lora_alpha"]))


def _scaling(config: dict, r: int, alpha: float) -> float:
    return alpha / math.sqrt(r) if config["use_rslora"] else alpha / r


def saved_module_names(config: dict) -> list[str]:
    """modules_to_save as PEFT loads it: the config's list plus the heads its task type adds."""
    return list(config["modules_to_save"] or []) + list(TASK_HEADS.get(config["task_type"], ()))


# ---- the tensors ---------------------------------------------------------------------------------


def _saved_owner(path: str, owners: list[str]) -> str | None:
    """The modules_to_save module a tensor path belongs to: PEFT wraps the outermost module whose
    name (base_model.model.<module>) ends with an entry, as its _set_trainable matches."""
    parts = path.split(".")
    for i in range(1, len(parts)):
        module = ".".join(parts[:i])
        if any((PREFIX + module).endswith(m) for m in owners):
            return module
    return None


def _read_tensors(tensors: SafetensorsFile, config: dict, file: Path) -> tuple[dict, dict]:
    """({module: {suffix: key}} of the LoRA tensors, {model tensor name: key} of the modules_to_save ones)."""
    lora: dict[str, dict[str, str]] = {}
    saved: dict[str, str] = {}
    skip = tuple(s for k, suffixes in TRAINING_ONLY.items() if config.get(k) is not None for s in suffixes)
    owners = saved_module_names(config)
    for key in tensors.keys():
        path = key[len(PREFIX):] if key.startswith(PREFIX) else None
        suffix = next((s for s in (SUFFIX_A, SUFFIX_B, SUFFIX_BIAS) if path and path.endswith(s)), None)
        if suffix is not None:
            lora.setdefault(path[: -len(suffix)], {})[suffix] = key
            continue
        if path and skip and any(s in path for s in skip):
            continue
        if not path or _saved_owner(path, owners) is None:
            raise AdapterError(f"unexpected tensor {key!r} (expected base_model.model.<module>.lora_A.weight, "
                               ".lora_B.weight, .lora_B.bias, or a tensor of a modules_to_save module)", file)
        saved[path] = key
    if not lora:
        raise AdapterError("holds no LoRA tensors", file)
    return lora, saved


def _load_module(tensors: SafetensorsFile, config: dict, module: str, keys: dict[str, str],
                 file: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One module's A (r_m, in), B (out, r_m) and bias (out,) or None, checked against the config."""
    if SUFFIX_A not in keys or SUFFIX_B not in keys:
        raise AdapterError(f"module {module!r} has only one of lora_A / lora_B", file)
    if SUFFIX_BIAS in keys and not config["lora_bias"]:
        raise AdapterError(f"module {module!r} has a lora_B bias, but lora_bias is false: PEFT would ignore it", file)
    if config["lora_bias"] and SUFFIX_BIAS not in keys:
        raise AdapterError(f"module {module!r} has no lora_B bias, but lora_bias is true: PEFT would leave it at its "
                           "initial value", file)
    if any(tensors.dtype(k) not in FLOAT_DTYPES for k in keys.values()):
        raise AdapterError(f"module {module!r}: LoRA tensors must be floating point", file)
    A, B = (tensors.float_array(keys[s], np.float32) for s in (SUFFIX_A, SUFFIX_B))
    bias = tensors.float_array(keys[SUFFIX_BIAS], np.float32) if SUFFIX_BIAS in keys else None
    r, _ = module_rank_alpha(config, module)
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != r or B.shape[1] != r:
        raise AdapterError(f"module {module!r}: lora_A {list(A.shape)} / lora_B {list(B.shape)} "
                           f"do not match (r, in) / (out, r) with r={r} (from r / rank_pattern)", file)
    if bias is not None and bias.shape != (B.shape[0],):
        raise AdapterError(f"module {module!r}: lora_B bias {list(bias.shape)} does not match lora_B's "
                           f"{B.shape[0]} outputs", file)
    if not all(np.isfinite(t).all() for t in (A, B) + ((bias,) if bias is not None else ())):
        raise AdapterError(f"module {module!r}: LoRA tensors contain NaN or Inf", file)
    init = _init_kind(config["init_lora_weights"])
    if init == "orthogonal" and r % 2:
        raise AdapterError(f"module {module!r}: init_lora_weights='orthogonal' with the odd rank {r}: PEFT refuses "
                           "to load it", file)
    if init == "mica" and r > min(A.shape[1], B.shape[0]):
        raise AdapterError(f"module {module!r}: init_lora_weights='mica' with rank {r} > min(in, out): PEFT refuses "
                           "to load it", file)
    return A, B, bias


def _saved_array(tensors: SafetensorsFile, key: str) -> np.ndarray:
    kind = tensors.dtype(key)
    if kind in FLOAT_DTYPES:
        return tensors.float_array(key, np.float64 if kind == "F64" else np.float32)
    return np.array(tensors.array(key))


def read_lora(directory: str | Path) -> LoraArtifact:
    """Open and validate a plain LoRA adapter directory (safetensors only)."""
    directory = Path(directory)
    config_file = directory / CONFIG_NAME
    try:
        raw = parse_json(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"cannot read the LoRA config ({exc.__class__.__name__}: {exc})", config_file) from None
    config = _check_config(raw, config_file)
    file = directory / WEIGHTS_NAME
    if not file.is_file():
        raise AdapterError(f"no {WEIGHTS_NAME} in the LoRA adapter directory", directory)
    try:
        tensors = SafetensorsFile(file)
    except PolytoolError as exc:
        raise AdapterError(exc.message, file) from None
    weights, biases = {}, {}
    with tensors:
        lora, saved = _read_tensors(tensors, config, file)
        for module, keys in lora.items():
            A, B, bias = _load_module(tensors, config, module, keys, file)
            weights[module] = (A, B)
            if bias is not None:
                biases[module] = bias
        saved = {name: _saved_array(tensors, key) for name, key in saved.items()}
        metadata = dict(tensors.metadata)
        stored = {tensors.dtype(key) for key in tensors.keys()}
    dtype = next(TORCH_NAMES[d] for d in ("BF16", "F16", "F32", "F64") if d in stored)
    return LoraArtifact(directory, raw, dtype, metadata, weights, biases, saved)


# ---- which modules PEFT wraps --------------------------------------------------------------------


def _layer_index(layers_pattern: str | list[str] | None, name: str) -> int | None:
    """The layer index PEFT reads from a module path: the first numbered segment (after layers_pattern)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _is_target(config: dict, targets: str | set[str], name: str) -> bool:
    """PEFT 0.21's check_target_module_exists for one module path."""
    exclude = config["exclude_modules"]
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, name):
                return False
        elif name in exclude or any(name.endswith(f".{e}") for e in exclude):
            return False
    guarded = list(config["modules_to_save"] or []) + (list(TASK_HEADS["SEQ_CLS"]) if config["task_type"] == "SEQ_CLS"
                                                       else [])
    if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in guarded):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True  # an exact name: layers_to_transform does not apply
    found = any(name.endswith(f".{t}") for t in targets)
    layers = config["layers_to_transform"]
    if found and layers is not None and layers != []:
        index = _layer_index(config["layers_pattern"], name)
        if index is None:
            return False
        return index == layers if isinstance(layers, int) else index in layers
    return found


def _minimal_targets(targets: set[str], names: list[str]) -> set[str]:
    """PEFT's _find_minimal_target_modules, which it applies to lists of 20 names or more before matching."""
    suffixes = tuple("." + t for t in targets)
    others = {n for n in names if n not in targets and not n.endswith(suffixes)}

    def suffixes_of(s: str) -> list[str]:
        parts = s.split(".")
        return [".".join(parts[i:]) for i in range(len(parts))][::-1]

    other_suffixes = {s for n in others for s in suffixes_of(n)}
    required: set[str] = set()
    for item, candidates in sorted(((t, suffixes_of(t)) for t in targets), key=lambda tup: tup[1]):
        for suffix in candidates:
            if suffix in required or suffix in other_suffixes:
                continue
            if not any(item.endswith("." + r) for r in required):
                required.add(suffix)
                break
    return required or set(targets)


def lora_targets(artifact: LoraArtifact, module_names) -> set[str]:
    """Of a model's module paths (`model.named_modules()` names), those PEFT would wrap with this LoRA."""
    config = _check_config(artifact.config, artifact.directory / CONFIG_NAME)
    names = list(module_names)
    targets = config["target_modules"]
    if not isinstance(targets, str):
        targets = set(targets)
        if len(targets) >= MIN_TARGETS_TO_MINIMISE:
            minimal = _minimal_targets(targets, names)
            targets = minimal if len(minimal) < len(targets) else targets
    return {name for name in names if name and _is_target(config, targets, name)}


# ---- applying it ---------------------------------------------------------------------------------


def attach_lora(layers: dict, artifact: LoraArtifact | dict, scaling: float | None = None, *,
                module_names=None) -> list:
    """Add y += (x @ A.T @ B.T + bias) * scaling_m to every module PEFT would wrap, through forward hooks.

    layers: {module path: nn.Linear or Conv1D} for EVERY such layer of the model (a Poly layer's
    `.base_layer`); module_names: every module path of the model (`named_modules()`), to also catch
    targets that are not Linear / Conv1D (defaults to the keys of `layers`). Refused in one line: a
    tensor for a module PEFT would not wrap, a wrapped module without tensors, a wrapped module that
    is not Linear / Conv1D, a shape that does not fit. The update runs in float32 and the sum is cast
    back to the layer's dtype, as PEFT does; the returned handles' `remove()` restores the layers.

    attach_lora(layers, {module: (A, B)}, scaling) applies given factors to exactly those modules, scaled
    by a number or by scaling(module).
    """
    if not isinstance(artifact, LoraArtifact):  # the plain form: factors and their scaling, no config
        return _hook_all(layers, artifact, {n: scaling(n) if callable(scaling) else scaling for n in artifact}, {},
                         None)
    names = list(layers) if module_names is None else list(module_names)
    targets = lora_targets(artifact, names)
    where = artifact.directory
    if not targets:
        raise PolytoolError(f"target_modules={artifact.config.get('target_modules')!r} selects no module of this "
                            "model: PEFT refuses to load it", where)
    ignored = sorted(set(artifact.weights) - targets)
    if ignored:
        raise PolytoolError(f"the LoRA holds tensors for {ignored[0]!r}, which PEFT would not wrap with this config "
                            "(target_modules, exclude_modules, layers_to_transform, modules_to_save): PEFT would "
                            "ignore them", where)
    other = sorted(targets - set(layers))
    if other:
        raise PolytoolError(f"the config selects {other[0]!r}, which is not a Linear or Conv1D layer (PEFT would give "
                            "it another LoRA layer type, or refuse it): polytool applies LoRA to those two only", where)
    missing = sorted(targets - set(artifact.weights))
    if missing:
        init = _init_kind(artifact.config.get("init_lora_weights", True))
        raise PolytoolError(f"the config selects {missing[0]!r} ({len(missing)} modules in all), but the LoRA holds no "
                            f"tensors for it: PEFT would leave it at its initial value ({AT_INIT[init]}); the adapter "
                            "is incomplete", where)
    return _hook_all(layers, artifact.weights, artifact.scalings, artifact.biases, where)


def _hook_all(layers: dict, weights: dict, scalings: dict, biases: dict, where: Path | None) -> list:
    import torch

    from .poly.layer import linear_features

    for name, (A, B) in weights.items():
        d_in, d_out = linear_features(layers[name], name)
        if A.shape[1] != d_in or B.shape[0] != d_out:
            raise PolytoolError(f"module {name!r}: lora_A {list(A.shape)} / lora_B {list(B.shape)} "
                                f"do not fit the base's layer (in {d_in}, out {d_out})", where)
    handles = []
    for name, (A, B) in weights.items():
        weight = layers[name].weight
        device = torch.device("cpu") if weight.is_meta else weight.device  # offloaded (--max-memory): CPU
        At = torch.as_tensor(np.ascontiguousarray(A.T), dtype=torch.float32, device=device)  # (in, r)
        Bt = torch.as_tensor(np.ascontiguousarray(B.T), dtype=torch.float32, device=device)  # (r, out)
        b = biases.get(name)
        b = None if b is None else torch.as_tensor(b, dtype=torch.float32, device=device)  # (out,)

        def hook(mod, args, out, At=At, Bt=Bt, b=b, scale=scalings[name]):
            x = args[0].to(At.device, torch.float32)
            update = (x @ At) @ Bt  # (..., in) @ (in, r) @ (r, out) -> (..., out)
            if b is not None:
                update = update + b  # lora_B's bias is scaled with it, as in PEFT
            return (out.to(torch.float32) + (update * scale).to(out.device)).to(out.dtype)

        handles.append(layers[name].register_forward_hook(hook))
    return handles


@contextmanager
def swap_saved_modules(model, saved: LoraArtifact | dict) -> Iterator[None]:
    """Inside the block the modules_to_save modules hold the saved tensors; restored after.

    saved: an artifact, {module path: {param name: array}} or {model tensor name: array}. Each tensor
    is replaced by a new Parameter (buffer) in the model's dtype, so a tied partner keeps its value, as
    PEFT's modules_to_save copy leaves it. Every name and shape is checked before anything changes.
    """
    import torch

    if isinstance(saved, LoraArtifact):
        saved = saved.saved
    flat = {f"{m}.{p}": v for m, ps in saved.items() for p, v in ps.items()} if saved and all(
        isinstance(v, dict) for v in saved.values()) else saved
    plan = []
    for name, value in flat.items():
        path, _, leaf = name.rpartition(".")
        try:
            owner = model.get_submodule(path)
        except AttributeError:
            owner = None
        slots = None if owner is None else owner._parameters if leaf in owner._parameters else owner._buffers
        current = None if slots is None else slots.get(leaf)
        if current is None or tuple(current.shape) != tuple(value.shape):
            shown = "missing" if current is None else f"of shape {list(current.shape)}"
            raise PolytoolError(f"the artifact's trained {name} {list(value.shape)} does not fit this model "
                                f"(its tensor is {shown}): wrong base model?")
        new = torch.as_tensor(np.ascontiguousarray(value)).to(current.device, current.dtype)
        plan.append((slots, leaf, current, torch.nn.Parameter(new, requires_grad=False)
                     if isinstance(current, torch.nn.Parameter) else new))
    try:
        for slots, leaf, _, new in plan:
            slots[leaf] = new
        yield
    finally:
        for slots, leaf, old, _ in reversed(plan):
            slots[leaf] = old
