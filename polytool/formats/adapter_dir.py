"""PEFT's adapter directory format: file names, the key prefix, and reading adapter_config.json.

    adapter_config.json         peft_type ("POLY", "LORA", ...) + the tuner's config fields
    adapter_model.safetensors   base_model.model.<module path>.<tensor>   (keys without the adapter name)
    adapter_model.bin           the same as a pickled state dict (older PEFT)

Shared by the Poly reader (adapter.py), the LoRA reader (lora.py), the writers and the model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .jsonfile import parse_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."  # saved keys: PREFIX + module path + tensor name
# adapter_model.bin is a pickle: read (with torch.load(weights_only=True)) only when the user says so
ALLOW_PICKLE = "POLYTOOL_ALLOW_PICKLE"


def pickle_allowed() -> bool:
    import os

    return os.environ.get(ALLOW_PICKLE) == "1"


PICKLE_REFUSED = (f"holds {BIN_NAME} only, a pickle, which polytool does not unpickle unless told to: convert it "
                  f"to {WEIGHTS_NAME} with the safetensors tools, or set {ALLOW_PICKLE}=1 to read it with "
                  "torch.load(weights_only=True)")


def peft_type(directory: Path) -> Any:
    """The peft_type adapter_config.json declares, or None when it cannot be read (the readers say why)."""
    try:
        config = parse_json((Path(directory) / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return config.get("peft_type") if isinstance(config, dict) else None


def saved_owner(path: str, owners: list[str]) -> str | None:
    """The modules_to_save module a tensor path belongs to: PEFT wraps the outermost module whose
    name (base_model.model.<module>) ends with an entry, as its _set_trainable matches."""
    parts = path.split(".")
    for i in range(1, len(parts)):
        module = ".".join(parts[:i])
        if any((PREFIX + module).endswith(m) for m in owners):
            return module
    return None
