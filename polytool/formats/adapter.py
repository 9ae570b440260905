"""Reading and validating a Poly/MHR adapter directory (PEFT's format), without torch.

    adapter_config.json         peft_type "POLY", r, n_tasks, n_skills, n_splits, target_modules, ...
    adapter_model.safetensors   base_model.model.<module path>.poly_lora_A          (q, s, in/q, r)
                                base_model.model.<module path>.poly_lora_B          (q, s, r, out/q)
                                base_model.model.<module path>.poly_router.module_logits  (t, q*s)

`load_adapter` reads the config and the safetensors header, then validates every claim (tensor
set, shapes against the config and each other, finite values) before returning: commands act only
on adapters that passed. Tensors are memory-mapped and converted on demand.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .safetensors import FLOAT_DTYPES, SafetensorsFile
from ..architectures import SAVED_EMBEDDING_NAMES, TASK_HEADS
from .hub import input_path
from .jsonfile import parse_json
from .adapter_dir import BIN_NAME, CONFIG_NAME, PICKLE_REFUSED, PREFIX, WEIGHTS_NAME, pickle_allowed, saved_owner
from .provenance import sha256_file
from ..errors import AdapterError, PolytoolError
from ..core.routing import eval_weights, spec_weights
from ..core.taskspec import TaskSpec

SUFFIXES = {"A": ".poly_lora_A", "B": ".poly_lora_B", "logits": ".poly_router.module_logits"}
INT_FIELDS = ("r", "n_tasks", "n_skills", "n_splits")
STR_FIELDS = ("base_model_name_or_path", "revision", "task_type")  # a string or null
NAMES_FIELDS = ("target_modules", "exclude_modules", "modules_to_save")  # a name, a list of names, or null


@dataclass(frozen=True)
class AdapterModule:
    """One adapted Linear: its path in the base model and its feature sizes."""

    name: str
    in_features: int
    out_features: int


def _load_failure(exc: Exception) -> str:
    """The reason in torch.load's error, without its advice to retry with weights_only=False."""
    text = str(exc).strip()
    if "Weights only load failed" not in text:
        return f"{exc.__class__.__name__}: {text.splitlines()[0]}" if text else exc.__class__.__name__
    body = text.split("Check the documentation")[0].splitlines()[1:]  # line 0 is the generic advice
    detail = " ".join(line.strip() for line in body if line.strip() and not line.startswith("Please file an issue"))
    detail = detail.split(". ")[0].rstrip(".")
    return f"not a plain state dict of tensors ({detail})" if detail else "not a plain state dict of tensors"


class _BinTensors:
    """adapter_model.bin through torch.load(weights_only=True): the same read API as SafetensorsFile."""

    def __init__(self, path: Path):
        from ..extras import require

        require(f"{path}: reading a PyTorch .bin adapter", ("torch", ("torch",)))
        import torch

        self.path = path
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols on stderr
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad or unsafe pickle
            raise AdapterError(f"refused by torch.load(weights_only=True): {_load_failure(exc)}", path) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterError("expected a dict of tensors", path)
        self._arrays = {k: v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}
        self._dtypes = {k: ("F32" if v.is_floating_point() else str(v.dtype)) for k, v in state.items()}
        self.metadata: dict[str, str] = {}

    def keys(self) -> list[str]:
        return list(self._arrays)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._arrays[name].shape)

    def dtype(self, name: str) -> str:
        return self._dtypes[name]

    def float_array(self, name: str, dtype: Any = np.float64) -> np.ndarray:
        return self._arrays[name].astype(dtype)


class PolyAdapter:
    """A validated Poly/MHR adapter. Construct with `load_adapter`."""

    def __init__(self, directory: Path, config: dict, tensors: Any, weights_file: Path):
        self.directory = directory
        self.config = config
        self.weights_file = weights_file
        self._tensors = tensors
        self.r: int = config["r"]
        self.n_tasks: int = config["n_tasks"]
        self.n_skills: int = config["n_skills"]
        self.n_splits: int = config["n_splits"]
        self.poly_type: str = config.get("poly_type", "poly")
        targets = config.get("target_modules")
        self.target_modules = sorted(targets) if isinstance(targets, list) else targets
        self.base_model_name_or_path = config.get("base_model_name_or_path")
        self.task_type = config.get("task_type")
        self.modules: list[AdapterModule] = []
        # beside the Poly tensors: {module path: {parameter name: key}} of modules_to_save copies (heads), and
        # {module path: key} of embedding weights PEFT saves whole (a tied lm_head target's base weight)
        self.saved_modules: dict[str, dict[str, str]] = {}
        self.saved_embeddings: dict[str, str] = {}
        self._sha256: str | None = None

    # ---- tensors -------------------------------------------------------------------------
    def _key(self, module: str, kind: str) -> str:
        return PREFIX + module + SUFFIXES[kind]

    def poly_A(self, module: str, dtype: Any = np.float64) -> np.ndarray:
        """(n_splits, n_skills, in/n_splits, r)"""
        return self._tensors.float_array(self._key(module, "A"), dtype)

    def poly_B(self, module: str, dtype: Any = np.float64) -> np.ndarray:
        """(n_splits, n_skills, r, out/n_splits)"""
        return self._tensors.float_array(self._key(module, "B"), dtype)

    def logits(self, module: str) -> np.ndarray:
        """(n_tasks, n_splits * n_skills), float64"""
        return self._tensors.float_array(self._key(module, "logits"), np.float64)

    def mixing_weights(self, module: str) -> np.ndarray:
        """Eval-time mixing weights of every task: (n_tasks, n_splits, n_skills)."""
        return eval_weights(self.logits(module), self.n_splits, self.n_skills)

    def spec_weights(self, module: str, spec: TaskSpec) -> np.ndarray:
        """(n_splits, n_skills) mixing weights for a task id, "uniform" or "mean"."""
        return spec_weights(self.logits(module), self.n_splits, self.n_skills, spec)

    def tensor(self, key: str, dtype: Any = np.float32) -> np.ndarray:
        """Any tensor of the adapter file by its key (e.g. a saved module's weight)."""
        return self._tensors.float_array(key, dtype)

    def tensor_shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors.shape(key))

    def tensor_names(self) -> list[str]:
        return self._tensors.keys()

    @property
    def sha256(self) -> str:
        """SHA-256 of the weights file: the adapter's identity in provenance records."""
        if self._sha256 is None:
            self._sha256 = sha256_file(self.weights_file)
        return self._sha256

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of the Poly adapter and of one collapsed task LoRA."""
        poly = lora = 0
        for m in self.modules:
            poly += self.n_skills * self.r * (m.in_features + m.out_features) + self.n_tasks * self.n_splits * self.n_skills
            lora += self.r * (m.in_features + m.out_features)
        return {"poly": poly, "lora_per_task": lora}


def _find_config(path: Path, adapter_name: str | None) -> Path:
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except (OSError, ValueError) as exc:  # e.g. a name too long for the file system
        raise AdapterError(f"cannot access ({getattr(exc, 'strerror', None) or exc})", path) from None
    if not exists:
        raise AdapterError("no such adapter directory", path)
    if not is_dir:
        raise AdapterError("is a file, expected an adapter directory (holding adapter_config.json)", path)
    if adapter_name:
        sub = path / adapter_name
        if not (sub / CONFIG_NAME).is_file():
            raise AdapterError(f"no adapter named {adapter_name!r} here (no {adapter_name}/{CONFIG_NAME})", path)
        return sub
    if (path / CONFIG_NAME).is_file():
        return path
    subs = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / CONFIG_NAME).is_file())
    if len(subs) == 1:
        return path / subs[0]
    if subs:
        raise AdapterError(f"holds several adapters ({', '.join(subs)}): name one, e.g. {path / subs[0]}", path)
    raise AdapterError(f"no {CONFIG_NAME} here: not an adapter directory", path)


def _read_config(file: Path) -> dict:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AdapterError(f"cannot read ({exc.__class__.__name__})", file) from None
    try:
        config = parse_json(text)
    except json.JSONDecodeError as exc:
        raise AdapterError(f"invalid JSON: {exc}", file) from None
    if not isinstance(config, dict):
        raise AdapterError("invalid config: expected a JSON object", file)
    peft_type = config.get("peft_type")
    if peft_type != "POLY":
        raise AdapterError(f"peft_type is {peft_type!r}, not 'POLY': this is not a Poly/MHR adapter", file)
    for field in INT_FIELDS:
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AdapterError(f"{field} must be an integer >= 1, got {value!r}", file)
    if config.get("poly_type", "poly") != "poly":
        raise AdapterError(f"poly_type {config['poly_type']!r} is not supported (only 'poly')", file)
    for field in STR_FIELDS:
        if not isinstance(config.get(field), (str, type(None))):
            raise AdapterError(f"{field} must be a string or null, got {_short(config[field])}", file)
    for field in NAMES_FIELDS:
        value = config.get(field)
        if not (value is None or isinstance(value, str)
                or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            raise AdapterError(f"{field} must be a module name, a list of names or null, got {_short(value)}", file)
    return config


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _open_weights(directory: Path) -> tuple[Any, Path]:
    st, pt = directory / WEIGHTS_NAME, directory / BIN_NAME
    if st.is_file():
        try:
            return SafetensorsFile(st), st
        except PolytoolError as exc:
            raise AdapterError(exc.message, st) from None
    if pt.is_file():
        if not pickle_allowed():
            raise AdapterError(PICKLE_REFUSED, directory)
        return _BinTensors(pt), pt
    raise AdapterError(f"no {WEIGHTS_NAME} (or {BIN_NAME}) in the adapter directory", directory)


def _split_key(key: str) -> tuple[str, str] | None:
    if not key.startswith(PREFIX):
        return None
    for kind, suffix in SUFFIXES.items():
        if key.endswith(suffix):
            return key[len(PREFIX) : -len(suffix)], kind
    return None


def _validate_saved(adapter: PolyAdapter, tensors: Any, found: dict, others: list[str], file: Path) -> None:
    """The tensors beside the Poly ones, as PEFT saves them: modules_to_save copies (trained heads) and
    embedding layers saved whole; anything else is refused."""
    saved = adapter.config.get("modules_to_save") or []
    saved = [saved] if isinstance(saved, str) else [str(m) for m in saved]
    saved += list(TASK_HEADS.get(adapter.task_type or "", ()))  # the heads PEFT adds for the task type
    for key in others:
        path, _, param = key[len(PREFIX):].rpartition(".") if key.startswith(PREFIX) else ("", "", "")
        module = saved_owner(f"{path}.{param}", saved) if path else None  # PEFT's rule: a name ending with an entry
        if path.endswith(".base_layer") and path[: -len(".base_layer")] in found and param == "weight":
            adapter.saved_embeddings[path[: -len(".base_layer")]] = key  # a targeted (tied) embedding's weight
        elif module is not None:  # a module trained whole (a head, or an lm_head in modules_to_save)
            adapter.saved_modules.setdefault(module, {})[f"{path}.{param}"[len(module) + 1:]] = key
        elif path.rpartition(".")[2] in SAVED_EMBEDDING_NAMES and param == "weight" and path not in found:
            adapter.saved_embeddings[path] = key  # an embedding layer saved whole (e.g. resized)
        else:
            raise AdapterError(f"unexpected tensor {key!r} (neither a Poly tensor base_model.model.<module>.poly_*, "
                               "a modules_to_save module of the config, nor an embedding layer)", file)
        if tensors.dtype(key) not in FLOAT_DTYPES:
            raise AdapterError(f"tensor {key!r} has dtype {tensors.dtype(key)}, expected floating point", file)
        # a trained head is small: checked here; a saved embedding (vocab x hidden, GBs for a large model) is
        # compared with the base's where it is used, not read whole on every load
        if key not in adapter.saved_embeddings.values() and not np.isfinite(tensors.float_array(key, np.float32)).all():
            raise AdapterError(f"tensor {key!r} contains NaN or Inf", file)


def _validate(adapter: PolyAdapter, tensors: Any, file: Path) -> None:
    t, q, s, r = adapter.n_tasks, adapter.n_splits, adapter.n_skills, adapter.r
    found: dict[str, dict[str, str]] = {}
    others: list[str] = []
    for key in tensors.keys():
        parsed = _split_key(key)
        if parsed is None:
            others.append(key)
            continue
        module, kind = parsed
        found.setdefault(module, {})[kind] = key
    _validate_saved(adapter, tensors, found, others, file)
    if not found:
        raise AdapterError("holds no Poly tensors (poly_lora_A / poly_lora_B / poly_router.module_logits)", file)
    for module, kinds in found.items():
        missing = [SUFFIXES[k][1:] for k in SUFFIXES if k not in kinds]
        if missing:
            raise AdapterError(f"module {module!r} is missing {', '.join(missing)}", file)
        for kind, key in kinds.items():
            if tensors.dtype(key) not in FLOAT_DTYPES:
                raise AdapterError(f"tensor {key!r} has dtype {tensors.dtype(key)}, expected floating point", file)
        a, b, lg = (tensors.shape(kinds[k]) for k in ("A", "B", "logits"))
        if len(a) != 4 or len(b) != 4 or len(lg) != 2:
            raise AdapterError(f"module {module!r}: poly_lora_A {list(a)}, poly_lora_B {list(b)}, module_logits {list(lg)} have the wrong number of dimensions (4, 4, 2)", file)
        for label, shape, dims in (
            ("poly_lora_A", a, (("n_splits", q), ("n_skills", s), ("in/n_splits", None), ("r", r))),
            ("poly_lora_B", b, (("n_splits", q), ("n_skills", s), ("r", r), ("out/n_splits", None))),
            ("module_logits", lg, (("n_tasks", t), ("n_splits*n_skills", q * s))),
        ):
            bad = [f"{name}={want} in the config but {got} in the tensor"
                   for (name, want), got in zip(dims, shape) if want is not None and got != want]
            if bad:
                says = ", ".join(name if want is None else f"{name}={want}" for name, want in dims)
                raise AdapterError(f"module {module!r}: {label} has shape {list(shape)}, config says ({says}): {'; '.join(bad)}", file)
        for kind, key in kinds.items():
            arr = tensors.float_array(key, np.float32)
            if not np.isfinite(arr).all():
                bad = "NaN" if np.isnan(arr).any() else "Inf"
                raise AdapterError(f"module {module!r}: {SUFFIXES[kind][1:]} contains {bad}", file)
        adapter.modules.append(AdapterModule(module, q * a[2], q * b[3]))


def load_adapter(path: str | Path, adapter_name: str | None = None, revision: str | None = None) -> PolyAdapter:
    """Open and fully validate a Poly/MHR adapter directory (or its named-adapter subfolder); `path` may be a
    hub id (`org/name`, `org/name@revision`), read from the Hugging Face cache or downloaded (formats/hub.py)."""
    directory = _find_config(input_path(path, revision, "adapter directory"), adapter_name)
    config = _read_config(directory / CONFIG_NAME)
    tensors, weights_file = _open_weights(directory)
    adapter = PolyAdapter(directory, config, tensors, weights_file)
    _validate(adapter, tensors, weights_file)
    return adapter
