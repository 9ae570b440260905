"""One task of a Poly/MHR adapter -> a plain PEFT LoRA directory (numpy and our own writer, no torch).

    adapter_config.json        peft_type LORA, r, lora_alpha = LORA_ALPHA (scaling 1/r: exactly Poly's)
    adapter_model.safetensors  base_model.model.<path>.lora_A.weight (r, in), .lora_B.weight (out, r),
                               metadata: format pt + provenance (source sha256, task, routing weights)
    README.md                  where it came from and how to load it

`--task all` writes one such directory per task under OUT/task-<id>/ plus OUT/polytool_tasks.json.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import __version__
from .adapter import PREFIX, PolyAdapter
from .basemodel import (CONV1D_MODEL_TYPES, INDEX_NAME, SINGLE_NAME, match_targets, open_base, read_config,
                        resolve_base_dir)
from .checkpoint import TensorSpec, SafetensorsWriter, atomic_output_dir, cast_float, check_output, write_json
from .collapse import LORA_ALPHA, collapse_adapter, lora_weights
from .errors import AdapterError, CheckpointError, PolytoolError
from .routing import TaskSpec, spec_label

TASKS_INDEX = "polytool_tasks.json"
LORA_DTYPES = ("F32", "F16", "BF16")
AUTO_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
                "SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
                "QUESTION_ANS": "AutoModelForQuestionAnswering"}


def check_collapsible(adapter: PolyAdapter) -> None:
    """Refuse adapters that carry more than Poly layers (modules_to_save copies have no collapse)."""
    extra = [k for k in adapter.tensor_names() if not k.endswith((".poly_lora_A", ".poly_lora_B", ".poly_router.module_logits"))]
    if extra:
        raise AdapterError(f"carries modules_to_save tensors ({extra[0]!r}, ...): collapsing those is not supported", adapter.weights_file)


def lora_base(adapter: PolyAdapter, base_dir: Path | None) -> Path | None:
    """The base a LoRA export reads for its checks (an input, never written): --base, or the adapter's
    base_model_name_or_path when it is found locally; None when there is none at hand."""
    try:
        return resolve_base_dir(base_dir, adapter.base_model_name_or_path, adapter.config.get("revision"))
    except CheckpointError:
        if base_dir is not None:
            raise
        return None


def base_uses_conv1d(adapter: PolyAdapter, base_dir: Path | None) -> bool:
    """Whether the base stores its targets as Conv1D (fan_in_fan_out). With --base (or a base found
    locally), the adapter's modules are also checked against the base's weights."""
    directory = lora_base(adapter, base_dir)
    if directory is None:
        return False  # no base at hand: a Linear model (PEFT corrects Conv1D targets itself, with a warning)
    try:
        base = open_base(directory)
    except CheckpointError:
        if base_dir is not None and any((directory / name).is_file() for name in (SINGLE_NAME, INDEX_NAME)):
            raise  # --base names a broken safetensors checkpoint
        return read_config(directory).get("model_type") in CONV1D_MODEL_TYPES  # e.g. .bin weights: the config tells
    match_targets(base, adapter.modules, untie=True)  # shapes checked; tying does not matter to a LoRA
    return base.conv1d


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
        "modules_to_save": None,
        "inference_mode": True,
    }


# provenance keys in an artifact's safetensors metadata (LoRA file, every dense shard)
SHA_KEY, TASK_KEY = "polytool.source_sha256", "polytool.task"


def provenance(adapter: PolyAdapter, spec: TaskSpec, routing: bool = True) -> dict[str, str]:
    """safetensors metadata: format pt, and where these factors came from (routing: per-module weights)."""
    meta = {
        "format": "pt",
        "polytool.version": __version__,
        SHA_KEY: adapter.sha256,
        TASK_KEY: str(spec),
        "polytool.n_tasks": str(adapter.n_tasks),
    }
    if routing:
        weights = {m.name: adapter.spec_weights(m.name, spec).tolist() for m in adapter.modules}  # (q, s) each
        meta["polytool.routing"] = json.dumps(weights, separators=(",", ":"))
    return meta


def model_card(adapter: PolyAdapter, spec: TaskSpec) -> str:
    base = adapter.base_model_name_or_path or "BASE_MODEL"
    auto = AUTO_CLASSES.get(adapter.task_type or "", "AutoModel")
    what = {"uniform": "uniform skill weights (MHR-mu)", "mean": "the mean over tasks of the routing weights"}
    chosen = what.get(str(spec), f"task {spec}")
    return f"""---
library_name: peft
base_model: {base}
tags: [lora, poly, polytool]
---
# LoRA collapsed from a Poly/MHR adapter: {spec_label(spec)}

Written by polytool {__version__} from the Poly/MHR adapter `{adapter.directory}`
(`{adapter.weights_file.name}` sha256 `{adapter.sha256}`, {adapter.n_tasks} tasks, {adapter.n_skills} skills,
{adapter.n_splits} splits, r {adapter.r}) for {chosen}. With its routing fixed, the Poly adapter is
exactly this LoRA: lora_alpha {LORA_ALPHA} and r {adapter.r} give PEFT's scaling 1/r, the same as Poly's.
The routing weights of every module are recorded in the safetensors metadata (`polytool.routing`).

```python
from transformers import {auto}
from peft import PeftModel

base = {auto}.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "path/to/this/directory")
```
"""


def write_lora(adapter: PolyAdapter, spec: TaskSpec, directory: Path, dtype: str = "F32",
               fan_in_fan_out: bool = False) -> dict:
    """Write one collapsed LoRA into the existing empty `directory`; returns files, tensors, bytes."""
    specs = []
    for m in adapter.modules:
        specs += [TensorSpec(f"{PREFIX}{m.name}.lora_A.weight", dtype, (adapter.r, m.in_features)),
                  TensorSpec(f"{PREFIX}{m.name}.lora_B.weight", dtype, (m.out_features, adapter.r))]
    with SafetensorsWriter(directory / "adapter_model.safetensors", specs, provenance(adapter, spec)) as writer:
        for module, A, B in collapse_adapter(adapter, spec):  # in module order, float64
            lora_A, lora_B = lora_weights(A, B)  # (r, in), (out, r)
            writer.write(f"{PREFIX}{module.name}.lora_A.weight", cast_float(lora_A, dtype))
            writer.write(f"{PREFIX}{module.name}.lora_B.weight", cast_float(lora_B, dtype))
    write_json(directory / "adapter_config.json", lora_config(adapter, fan_in_fan_out))
    # backslashreplace: a path that is not valid UTF-8 is shown escaped, not refused
    (directory / "README.md").write_text(model_card(adapter, spec), encoding="utf-8", errors="backslashreplace")
    files = ["adapter_config.json", "adapter_model.safetensors", "README.md"]
    return {"files": files, "tensors": len(specs), "bytes": sum((directory / f).stat().st_size for f in files)}


def export_lora(adapter: PolyAdapter, spec: TaskSpec, out: Path, dtype: str = "F32", fan_in_fan_out: bool = False,
                force: bool = False) -> dict:
    """Collapse `spec` ("all": every task, one subdirectory each) into LoRA directories at `out`, atomically."""
    if dtype not in LORA_DTYPES:
        raise PolytoolError(f"LoRA dtype {dtype!r} is not allowed: {', '.join(LORA_DTYPES)}")
    check_collapsible(adapter)
    check_output(out, force, inputs=[adapter.directory])
    with atomic_output_dir(out, force) as tmp:
        if spec != "all":
            written = write_lora(adapter, spec, tmp, dtype, fan_in_fan_out)
        else:
            written = {"files": [], "tensors": 0, "bytes": 0}
            tasks = {}
            for task in range(adapter.n_tasks):
                sub = spec_label(task)
                (tmp / sub).mkdir()
                one = write_lora(adapter, task, tmp / sub, dtype, fan_in_fan_out)
                written = {"files": written["files"] + [f"{sub}/{f}" for f in one["files"]],
                           "tensors": written["tensors"] + one["tensors"], "bytes": written["bytes"] + one["bytes"]}
                tasks[str(task)] = sub
            write_json(tmp / TASKS_INDEX, {"polytool_version": __version__, "source": str(adapter.directory),
                                           "source_sha256": adapter.sha256, "n_tasks": adapter.n_tasks, "tasks": tasks})
            written["files"].append(TASKS_INDEX)
            written["bytes"] += (tmp / TASKS_INDEX).stat().st_size
            from .manifest import MANIFEST_JSON, MANIFEST_MD, write_manifest  # the lines users paste (vLLM, TGI)

            written["manifest"] = write_manifest(tmp, out, adapter, tasks, "lora")
            written["files"] += [MANIFEST_JSON, MANIFEST_MD]
            written["bytes"] += sum((tmp / f).stat().st_size for f in (MANIFEST_JSON, MANIFEST_MD))
    return written
