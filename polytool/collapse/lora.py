"""One task of a Poly/MHR adapter -> a plain PEFT LoRA directory (numpy and our own writer, no torch).

    adapter_config.json        peft_type LORA, r, lora_alpha = LORA_ALPHA (scaling 1/r: exactly Poly's)
    adapter_model.safetensors  base_model.model.<path>.lora_A.weight (r, in), .lora_B.weight (out, r),
                               metadata: format pt + provenance (source sha256, task, routing weights)
    README.md                  where it came from and how to load it

`--task all` writes one such directory per task under OUT/task-<id>/ plus OUT/polytool_tasks.json.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.collapse import LORA_ALPHA, collapse_adapter, lora_weights
from ..core.lowrank import Truncation, check_rank_options, truncate_factored
from ..core.taskspec import TaskSpec, spec_label
from ..errors import PolytoolError
from ..formats.adapter import PolyAdapter
from ..formats.atomic import atomic_output_dir, check_output
from ..formats.cards import lora_card
from ..formats.jsonfile import write_json
from ..formats.manifest import MANIFEST_JSON, MANIFEST_MD, write_manifest
from ..formats.adapter_dir import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from ..formats.provenance import TASKS_INDEX, TRUNCATION_KEY, provenance, truncation_record, write_tasks_index
from ..formats.safetensors import cast_float
from ..formats.safetensors_writer import SafetensorsWriter, TensorSpec
from .fit import WRAPPER_COPIES, check_collapsible, embedding_rows, whole_embeddings

LORA_DTYPES = ("F32", "F16", "BF16")


def lora_config(adapter: PolyAdapter, fan_in_fan_out: bool) -> dict:
    """adapter_config.json of the collapsed LoRA: only keys PEFT's LoraConfig knows (no warnings)."""
    return {
        "peft_type": "LORA",
        "task_type": adapter.task_type,
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "revision": adapter.config.get("revision"),
        "r": adapter.r,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "target_modules": adapter.config.get("target_modules"),
        "exclude_modules": adapter.config.get("exclude_modules"),
        "modules_to_save": _modules_to_save(adapter),
        "inference_mode": True,
    }


def _modules_to_save(adapter: PolyAdapter) -> list[str] | None:
    """The adapter's modules_to_save (where it saved any), plus the embedding layers it saved whole (a resized
    vocabulary): PEFT loads those into its modules_to_save copies, onto a base resized the same way."""
    saved = adapter.config.get("modules_to_save") if adapter.saved_modules else None
    saved = [saved] if isinstance(saved, str) else list(saved or [])
    saved += [m for m in whole_embeddings(adapter) if m not in saved]
    return saved or None


# ---- rank control: LoRAs of any per-module rank, from factors ---------------------------------


def lora_pair(B: np.ndarray, A: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Factors B (out, k), A (k, in) of a delta B @ A -> lora_A (k, in), lora_B = k * B (out, k), each rounded
    once to `dtype`: under lora_alpha LORA_ALPHA and rank k, PEFT's scaling 1/k undoes the k folded into B."""
    return cast_float(np.ascontiguousarray(A), dtype), cast_float(np.ascontiguousarray(B * A.shape[0]), dtype)


def write_factors(path: Path, tensors: dict[str, tuple[np.ndarray, np.ndarray]], dtype: str, metadata: dict,
                  config: dict) -> dict:
    """tensors[module] = lora_pair(...) -> `path`/adapter_model.safetensors and adapter_config.json with r (the
    largest rank), rank_pattern (the modules of another rank: only when ranks differ) and lora_alpha LORA_ALPHA.
    Returns the config written."""
    ranks = {m: A.shape[0] for m, (A, B) in tensors.items()}
    r = max(ranks.values())
    specs = []
    for m, (A, B) in tensors.items():
        specs += [TensorSpec(f"{PREFIX}{m}.lora_A.weight", dtype, A.shape), TensorSpec(f"{PREFIX}{m}.lora_B.weight", dtype, B.shape)]
    with SafetensorsWriter(path / WEIGHTS_NAME, specs, metadata) as writer:
        for m, (A, B) in tensors.items():
            writer.write(f"{PREFIX}{m}.lora_A.weight", A)  # (k, in)
            writer.write(f"{PREFIX}{m}.lora_B.weight", B)  # (out, k)
    config = {**config, "r": r, "lora_alpha": LORA_ALPHA, "rank_pattern": {m: k for m, k in ranks.items() if k != r},
              "alpha_pattern": {}}
    write_json(path / CONFIG_NAME, config)
    return config


def truncation_report(kept: dict[str, Truncation]) -> list[dict]:
    """Per module, for --json: module, rank kept, retained energy, relative Frobenius error."""
    return [{"module": m, **t.as_dict()} for m, t in kept.items()]


@dataclass(frozen=True)
class LoraOptions:
    """How a LoRA output is written: its dtype, the Conv1D layout (`fan_in_fan_out`), a rank control (`rank` or
    `energy`, at most one), an existing output replaced (`force`), and the task as the user asked for it
    (`request`, recorded in the provenance for verify)."""

    dtype: str = "F32"
    fan_in_fan_out: bool = False
    rank: int | None = None
    energy: float | None = None
    force: bool = False
    request: str | None = None


def write_truncated(adapter: PolyAdapter, spec: TaskSpec, directory: Path, o: LoraOptions) -> dict:
    """The best rank-`rank` (or `energy`) LoRA of the collapsed task, per module, from the rank-r factors."""
    dtype, rank, energy = o.dtype, o.rank, o.energy
    factors, kept = {}, {}
    for module, A, B in collapse_adapter(adapter, spec):  # A (in, r), B (r, out): delta B.T A.T / r
        Bk, Ak, kept[module.name] = truncate_factored(B.T / adapter.r, A.T, rank, energy)  # (out, k), (k, in)
        factors[module.name] = lora_pair(Bk, Ak, dtype)
    what = f"rank {rank}" if rank is not None else f"energy {energy}"
    note = (f"This is the best {what} approximation of that task's LoRA, module by module (truncated SVD): "
            f"per-module ranks and errors are in the safetensors metadata (`{TRUNCATION_KEY}`).")
    meta = {**provenance(adapter, spec, request=o.request), TRUNCATION_KEY: truncation_record(rank, energy, kept)}
    write_factors(directory, factors, dtype, meta, lora_config(adapter, o.fan_in_fan_out))
    (directory / "README.md").write_text(lora_card(adapter, spec, note), encoding="utf-8", errors="backslashreplace")
    files = [CONFIG_NAME, WEIGHTS_NAME, "README.md"]
    return {"files": files, "tensors": 2 * len(factors), "bytes": sum((directory / f).stat().st_size for f in files),
            "truncation": truncation_report(kept)}


def write_lora(adapter: PolyAdapter, spec: TaskSpec, directory: Path, o: LoraOptions = LoraOptions()) -> dict:
    """Write one collapsed LoRA into the existing empty `directory`; returns files, tensors, bytes
    (and, with `rank` or `energy`, the per-module truncation)."""
    if o.rank is not None or o.energy is not None:
        return write_truncated(adapter, spec, directory, o)
    dtype = o.dtype
    specs = []
    for m in adapter.modules:
        specs += [TensorSpec(f"{PREFIX}{m.name}.lora_A.weight", dtype, (adapter.r, m.in_features)),
                  TensorSpec(f"{PREFIX}{m.name}.lora_B.weight", dtype, (m.out_features, adapter.r))]
    saved = [key for params in adapter.saved_modules.values() for param, key in params.items()
             if not param.startswith(WRAPPER_COPIES)]  # PEFT loads the trained copy alone, as it saves it
    saved += list(whole_embeddings(adapter).values())
    specs += [TensorSpec(key, dtype, adapter.tensor_shape(key)) for key in saved]
    with SafetensorsWriter(directory / WEIGHTS_NAME, specs, provenance(adapter, spec, request=o.request)) as writer:
        for module, A, B in collapse_adapter(adapter, spec):  # in module order, float64
            lora_A, lora_B = lora_weights(A, B)  # (r, in), (out, r)
            writer.write(f"{PREFIX}{module.name}.lora_A.weight", cast_float(lora_A, dtype))
            writer.write(f"{PREFIX}{module.name}.lora_B.weight", cast_float(lora_B, dtype))
        for key in saved:  # trained heads (modules_to_save), resized embeddings, under the keys PEFT saves them with
            writer.write(key, cast_float(adapter.tensor(key, np.float64), dtype))
    write_json(directory / CONFIG_NAME, lora_config(adapter, o.fan_in_fan_out))
    # backslashreplace: a path that is not valid UTF-8 is shown escaped, not refused
    rows = embedding_rows(adapter)
    (directory / "README.md").write_text(lora_card(adapter, spec, resize=rows), encoding="utf-8",
                                         errors="backslashreplace")
    files = [CONFIG_NAME, WEIGHTS_NAME, "README.md"]
    written = {"files": files, "tensors": len(specs), "bytes": sum((directory / f).stat().st_size for f in files)}
    return written if rows is None else {**written, "embedding_rows": rows}


def export_lora(adapter: PolyAdapter, spec: TaskSpec, out: Path, o: LoraOptions = LoraOptions()) -> dict:
    """Collapse `spec` ("all": every task, one subdirectory each) into LoRA directories at `out`, atomically.
    `rank` / `energy`: the best rank-K LoRA per module, or the smallest rank keeping that share (lowrank.py)."""
    if o.dtype not in LORA_DTYPES:
        raise PolytoolError(f"LoRA dtype {o.dtype!r} is not allowed: {', '.join(LORA_DTYPES)}")
    check_rank_options(o.rank, o.energy)
    check_collapsible(adapter)
    check_output(out, o.force, inputs=[adapter.directory])
    with atomic_output_dir(out, o.force) as tmp:
        if spec != "all":
            written = write_lora(adapter, spec, tmp, o)
        else:
            written = {"files": [], "tensors": 0, "bytes": 0}
            tasks = {}
            for task in range(adapter.n_tasks):
                sub = spec_label(task)
                (tmp / sub).mkdir()
                one = write_lora(adapter, task, tmp / sub, o)
                if "truncation" in one:
                    written.setdefault("truncation", []).extend({"task": task, **t} for t in one.pop("truncation"))
                written.update({"files": written["files"] + [f"{sub}/{f}" for f in one["files"]],
                                "tensors": written["tensors"] + one["tensors"], "bytes": written["bytes"] + one["bytes"]})
                tasks[str(task)] = sub
            write_tasks_index(tmp, adapter, tasks)
            written["files"].append(TASKS_INDEX)
            written["bytes"] += (tmp / TASKS_INDEX).stat().st_size
            written["manifest"] = write_manifest(tmp, out, adapter, tasks, "lora")
            written["files"] += [MANIFEST_JSON, MANIFEST_MD]
            written["bytes"] += sum((tmp / f).stat().st_size for f in (MANIFEST_JSON, MANIFEST_MD))
    return written
