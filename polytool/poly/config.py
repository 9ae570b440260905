"""PolyConfig: the one dataclass that describes a Poly/MHR adapter, read and written as PEFT does.

adapter_config.json is PEFT 0.21's file: every field below plus "peft_type": "POLY" and
"peft_version", written with sorted keys and indent 2 (no trailing newline), so PEFT loads what
polytool writes and the other way round. Values are validated once, at construction.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional, Union

from ..architectures import DEFAULT_TARGET_MODULES
from ..formats.adapter_dir import CONFIG_NAME
from ..errors import PolytoolError

PEFT_TYPE = "POLY"
# The PEFT release whose adapter format polytool writes (PEFT fills a missing value silently).
PEFT_FORMAT_VERSION = "0.21.2"



class PolyValueError(PolytoolError, ValueError):
    """A bad Poly setting or input (config value, task id, layer shape): a ValueError, as in PEFT."""


def _names(value: Union[str, list, tuple, set, None]) -> Union[str, list[str], None]:
    """A module-name spec as stored: None, a regex str, or a sorted list of unique names."""
    if value is None or isinstance(value, str):
        return value
    return sorted(set(value))


@dataclass
class PolyConfig:
    """Poly (n_splits = 1) / MHR (n_splits > 1) adapter settings; field names and meaning as in PEFT."""

    r: int = 8
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    init_weights: bool = True
    poly_type: str = "poly"
    n_tasks: int = 1
    n_skills: int = 4
    n_splits: int = 1
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    auto_mapping: Optional[dict] = None

    def __post_init__(self) -> None:
        for name in ("r", "n_tasks", "n_skills", "n_splits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PolyValueError(f"PolyConfig.{name} must be an integer >= 1, got {value!r}")
        if self.poly_type != "poly":
            raise PolyValueError(f"PolyConfig.poly_type must be 'poly', got {self.poly_type!r}")
        self.target_modules = _names(self.target_modules)
        self.exclude_modules = _names(self.exclude_modules)
        self.modules_to_save = None if self.modules_to_save is None else list(self.modules_to_save)

    @property
    def peft_type(self) -> str:
        return PEFT_TYPE

    def to_dict(self) -> dict:
        """The adapter_config.json object (PEFT's key set)."""
        return {**asdict(self), "peft_type": PEFT_TYPE, "peft_version": PEFT_FORMAT_VERSION}

    @classmethod
    def from_dict(cls, data: dict) -> "PolyConfig":
        """Build from a loaded adapter_config.json: peft_type must be POLY; unknown keys warn and are ignored."""
        peft_type = data.get("peft_type", PEFT_TYPE)
        if peft_type != PEFT_TYPE:
            raise PolyValueError(f"peft_type is {peft_type!r}, not {PEFT_TYPE!r}: not a Poly/MHR adapter config")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"peft_type", "peft_version"})
        if unknown:
            warnings.warn(f"ignoring unknown keys in the Poly adapter config: {', '.join(unknown)}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})

    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        """Write <directory>/adapter_config.json exactly as PEFT formats it; returns the file."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True), encoding="utf-8")
        return path

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path]) -> "PolyConfig":
        """Read <directory>/adapter_config.json."""
        path = Path(directory) / CONFIG_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise PolytoolError(f"cannot read the adapter config ({exc.__class__.__name__}: {exc})", path) from None
        if not isinstance(data, dict):
            raise PolytoolError("invalid adapter config: expected a JSON object", path)
        return cls.from_dict(data)


def default_target_modules(model_type: Optional[str]) -> list[str]:
    """The default target modules for a transformers model_type; ValueError when there is none."""
    if model_type not in DEFAULT_TARGET_MODULES:
        raise PolyValueError(
            f"no default target modules for model type {model_type!r}: set PolyConfig.target_modules "
            f"(defaults exist for {', '.join(sorted(DEFAULT_TARGET_MODULES))})"
        )
    return list(DEFAULT_TARGET_MODULES[model_type])
