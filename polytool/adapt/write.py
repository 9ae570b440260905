"""Writing what `polytool adapt` learned: the input adapter with one more task, as a PEFT-format Poly adapter.

    adapter_config.json         the input's config, n_tasks + 1 (PEFT's formatting: sorted keys, indent 2)
    adapter_model.safetensors   every tensor of the input in its order and dtype; each module_logits gains
                                the new row (the old rows' bytes copied as they were); with --train all,
                                poly_lora_A / poly_lora_B are the trained skills. Metadata: format pt,
                                polytool.version, polytool.adapt (the record below, compact JSON)
    polytool_adapt.json         the record: source and its sha256, the data file and its sha256, what was
                                trained, steps, lr, batch size, seed, init, held-out losses, changed tasks

Written into a temporary directory beside the output and renamed into place (formats/atomic.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import AdapterError
from ..formats.adapter import SUFFIXES, PolyAdapter
from ..formats.atomic import atomic_output_dir
from ..formats.jsonfile import write_json
from ..formats.adapter_dir import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from ..formats.safetensors import SafetensorsFile, cast_float
from ..formats.safetensors_writer import SafetensorsWriter, TensorSpec

RECORD_NAME = "polytool_adapt.json"
RECORD_KEY = "polytool.adapt"


def _new_tensors(adapter: PolyAdapter, source: SafetensorsFile, trained: dict[str, np.ndarray]) -> dict:
    """Saved key -> (dtype, shape, chunks) of every tensor the output holds, in the input's order."""
    out = {}
    for key in source.keys():
        dtype, shape, chunks = source.dtype(key), tuple(source.shape(key)), [source.raw(key)]
        module, kind = None, None
        for k, suffix in SUFFIXES.items():
            if key.startswith(PREFIX) and key.endswith(suffix):
                module, kind = key[len(PREFIX): -len(suffix)], k
        if kind == "logits":
            row = cast_float(trained[f"{module}:logits"].reshape(1, -1), dtype)  # (1, q*s)
            shape, chunks = (shape[0] + 1, shape[1]), [source.raw(key), row]  # (t+1, q*s)
        elif kind in ("A", "B") and f"{module}:{kind}" in trained:
            chunks = [cast_float(trained[f"{module}:{kind}"], dtype)]
        out[key] = (dtype, shape, chunks)
    return out


def check_source(adapter: PolyAdapter) -> None:
    """The input's tensors are copied byte for byte from its safetensors file: a .bin adapter is refused."""
    if adapter.weights_file.name != WEIGHTS_NAME:
        raise AdapterError(f"adapt copies the tensors of {WEIGHTS_NAME}; this adapter has "
                           f"{adapter.weights_file.name}: save it as safetensors first", adapter.directory)


def write_adapter(adapter: PolyAdapter, trained: dict[str, np.ndarray], record: dict, out: Path,
                  force: bool) -> list[str]:
    """Write the grown adapter to `out` atomically; returns the files written."""
    check_source(adapter)
    config = dict(adapter.config, n_tasks=adapter.n_tasks + 1)
    metadata = {"format": "pt", "polytool.version": __version__,
                RECORD_KEY: json.dumps(record, separators=(",", ":"), sort_keys=True)}
    with SafetensorsFile(adapter.weights_file) as source, atomic_output_dir(out, force) as tmp:
        tensors = _new_tensors(adapter, source, trained)
        specs = [TensorSpec(k, dtype, shape) for k, (dtype, shape, _) in tensors.items()]
        with SafetensorsWriter(tmp / WEIGHTS_NAME, specs, metadata) as writer:
            for key, (_, _, chunks) in tensors.items():
                writer.write(key, chunks)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        write_json(tmp / RECORD_NAME, record)
    return [CONFIG_NAME, WEIGHTS_NAME, RECORD_NAME]
