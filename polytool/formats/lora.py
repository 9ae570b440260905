"""Plain LoRA adapters (PEFT's format), read and validated exactly as PEFT 0.21 loads them (no PEFT import).

    adapter_config.json         peft_type "LORA" + the fields of PEFT's LoraConfig
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight   (r_m, in)
                                base_model.model.<module>.lora_B.weight   (out, r_m)
                                base_model.model.<module>.lora_B.bias     (out,)      lora_bias only
                                base_model.model.<saved module>.<param>               modules_to_save

`read_lora_facts` reads the config and the tensors' dtypes and shapes only (what `polytool check` rules
on); `read_lora` validates everything and resolves each module's scaling_m = alpha_m / r_m (alpha_m /
sqrt(r_m) under use_rslora), r_m and alpha_m from rank_pattern / alpha_pattern as PEFT resolves them.
verify/lora_apply.py applies the result to a model. Every LoraConfig field is either
honoured, without effect on the eval forward of the saved tensors, or refused in one line naming
key=value (docs/formats.md, "LoRA configs verify understands", has the table). Keys that are not
LoraConfig fields are ignored, as PEFT drops them.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .safetensors import FLOAT_DTYPES, TORCH_NAMES, SafetensorsFile
from ..architectures import TASK_HEADS
from .base import is_directory
from .jsonfile import parse_json
from .adapter_dir import CONFIG_NAME, PREFIX, WEIGHTS_NAME, saved_owner
from ..errors import AdapterError, PolytoolError

SUFFIX_A, SUFFIX_B, SUFFIX_BIAS = ".lora_A.weight", ".lora_B.weight", ".lora_B.bias"

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
            owner = saved_owner(name, owners) or name.rpartition(".")[0]
            grouped.setdefault(owner, {})[name[len(owner) + 1 :]] = value
        return grouped


# ---- the header only: what `polytool check` looks at (no validation beyond the file format) ----


@dataclass
class LoraFacts:
    """What the rules look at: the config and every tensor's dtype and shape (no data but bias)."""

    where: Path
    config: dict
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # key -> (dtype, shape)
    bias_zero: bool | None = None  # every bias tensor all zero (None: no bias tensors)

    @property
    def modules(self) -> list[str]:
        """Module paths of the lora_A / lora_B pairs (or embedding pairs), in file order."""
        found = []
        for key in self.tensors:
            for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B"):
                if key.endswith(suffix):
                    found.append(key[: -len(suffix)].removeprefix(PREFIX))
        return list(dict.fromkeys(found))

    @property
    def ranks(self) -> list[int]:
        return [shape[0] for key, (_, shape) in self.tensors.items() if key.endswith(".lora_A.weight") and shape]


def read_lora_facts(directory: str | Path) -> LoraFacts:
    """Read a PEFT LoRA directory's config and safetensors header; bad input raises AdapterError."""
    directory = Path(directory)
    if not is_directory(directory):
        what = "is a file, expected a LoRA directory (holding adapter_config.json)" if directory.exists() else \
            "no such LoRA directory"
        raise AdapterError(what, directory)
    file = directory / CONFIG_NAME
    config = _raw_config(file)
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        got = config.get("peft_type") if isinstance(config, dict) else None
        raise AdapterError(f"peft_type is {got!r}, not 'LORA': check reads plain PEFT LoRA adapters", file)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterError("no adapter_model.safetensors in the LoRA directory", directory)
    try:
        with SafetensorsFile(weights) as st:
            tensors = {k: (st.dtype(k), tuple(st.shape(k))) for k in st.keys()}
            biases = [k for k in st.keys() if k.endswith(".bias")]
            bias_zero = all(not st.float_array(k).any() for k in biases) if biases else None
    except PolytoolError as exc:
        raise AdapterError(exc.message, weights) from None
    return LoraFacts(directory, config, tensors, bias_zero)


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


# a group repeated by * + or {}, itself holding a repeat: (.*)*, (a+)+ ... backtracks exponentially
NESTED_REPEAT = re.compile(r"\([^()]*[*+}][^()]*\)[*+{]")


def _pattern_value(pattern: dict, module: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the value of the first key (in file order) whose regex ends the module path.
    A key that is the path or its dotted suffix matches without a regex; a key with a nested repeat, which could
    make the match run for hours on a crafted file, is refused."""
    for key in pattern:
        if module == key or module.endswith("." + key):
            return pattern[key]
        if NESTED_REPEAT.search(key):
            raise AdapterError(f"rank_pattern / alpha_pattern key {key!r} repeats a repeated group (e.g. (.*)*), "
                               "which can take exponential time to match: write the module names instead")
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
        if not path or saved_owner(path, owners) is None:
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


def _raw_config(file: Path) -> Any:
    """adapter_config.json as parsed JSON (any value: the callers check it)."""
    try:
        return parse_json(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"cannot read the LoRA config ({exc.__class__.__name__}: {exc})", file) from None


def read_lora(directory: str | Path) -> LoraArtifact:
    """Open and validate a plain LoRA adapter directory (safetensors only)."""
    directory = Path(directory)
    config_file = directory / CONFIG_NAME
    raw = _raw_config(config_file)
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
