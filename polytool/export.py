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

import numpy as np

from . import __version__
from .adapter import PREFIX, PolyAdapter
from .basemodel import (CONV1D_MODEL_TYPES, INDEX_NAME, SINGLE_NAME, BaseCheckpoint, find_tensor, match_targets,
                        open_base, read_config, resolve_base_dir)
from .checkpoint import SafetensorsFile, SafetensorsWriter, TensorSpec, cast_float, write_json
from .outdir import atomic_output_dir, check_output
from .collapse import LORA_ALPHA, collapse_adapter, lora_weights
from .errors import AdapterError, CheckpointError, PolytoolError
from .lowrank import Truncation, check_rank_options, truncate_factored
from .routing import TaskSpec, spec_label

TASKS_INDEX = "polytool_tasks.json"
LORA_DTYPES = ("F32", "F16", "BF16")
AUTO_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
                "SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
                "QUESTION_ANS": "AutoModelForQuestionAnswering"}


def check_collapsible(adapter: PolyAdapter, base: BaseCheckpoint | None = None) -> None:
    """Embedding layers PEFT saved whole (a tied lm_head target's weight) must equal the base's: they are
    carried only as a check. Without a base at hand they cannot be checked and are taken as the base's."""
    if base is None:
        return
    for module, key in adapter.saved_embeddings.items():
        name = key[len(PREFIX):].replace(".base_layer.weight", ".weight")
        found = find_tensor(name, base.tensors)
        if found is None and module in {m.name for m in adapter.modules}:
            found = next((t.source for t in match_targets(base, [m for m in adapter.modules if m.name == module],
                                                          untie=True)), None)
        if found is None:
            raise CheckpointError(f"the adapter saves embedding weight {key!r}, which the base has no tensor for: "
                                  "wrong base model?", base.directory)
        with SafetensorsFile(base.directory / base.tensors[found].shard) as st:
            same = st.shape(found) == adapter.tensor_shape(key) and np.array_equal(
                st.float_array(found, np.float32), adapter.tensor(key, np.float32))
        if not same:
            raise AdapterError(f"the adapter carries a changed copy of {found} (saved as {key!r}: embeddings trained "
                               "or resized): collapsing it is not supported", adapter.weights_file)


def saved_module_keys(adapter: PolyAdapter, base: BaseCheckpoint) -> dict[str, str]:
    """{base checkpoint key: adapter key} of every modules_to_save tensor (a trained head), shapes checked."""
    pairs = {}
    for module, params in adapter.saved_modules.items():
        for param, key in params.items():
            found = find_tensor(f"{module}.{param}", base.tensors)
            if found is None:
                raise CheckpointError(f"has no tensor for {module}.{param}, which the adapter trains (modules_to_save): "
                                      "save the base with the head class the adapter was trained with", base.directory)
            if base.tensors[found].shape != adapter.tensor_shape(key):
                raise CheckpointError(f"{found} has shape {list(base.tensors[found].shape)}, the adapter's trained "
                                      f"copy {list(adapter.tensor_shape(key))}: wrong base model?", base.directory)
            pairs[found] = key
    return pairs


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
    check_collapsible(adapter, base)
    if adapter.saved_modules:
        saved_module_keys(adapter, base)  # the trained heads fit the base's
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
        "modules_to_save": adapter.config.get("modules_to_save") if adapter.saved_modules else None,
        "inference_mode": True,
    }


# provenance keys in an artifact's safetensors metadata (LoRA file, every dense shard)
SHA_KEY, TASK_KEY = "polytool.source_sha256", "polytool.task"
TRUNCATION_KEY = "polytool.truncation"  # JSON: the rank control asked for, and per module what was kept


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


def model_card(adapter: PolyAdapter, spec: TaskSpec, truncated: str = "") -> str:
    base = adapter.base_model_name_or_path or "BASE_MODEL"
    auto = AUTO_CLASSES.get(adapter.task_type or "", "AutoModel")
    what = {"uniform": "uniform skill weights (MHR-mu)", "mean": "the mean over tasks of the routing weights"}
    chosen = what.get(str(spec), f"task {spec}")
    exact = (f"With its routing fixed, the Poly adapter is\nexactly this LoRA: lora_alpha {LORA_ALPHA} and r {adapter.r} "
             "give PEFT's scaling 1/r, the same as Poly's.")
    return f"""---
library_name: peft
base_model: {base}
tags: [lora, poly, polytool]
---
# LoRA collapsed from a Poly/MHR adapter: {spec_label(spec)}

Written by polytool {__version__} from the Poly/MHR adapter `{adapter.directory}`
(`{adapter.weights_file.name}` sha256 `{adapter.sha256}`, {adapter.n_tasks} tasks, {adapter.n_skills} skills,
{adapter.n_splits} splits, r {adapter.r}) for {chosen}. {truncated or exact}
The routing weights of every module are recorded in the safetensors metadata (`polytool.routing`).

```python
from transformers import {auto}
from peft import PeftModel

base = {auto}.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "path/to/this/directory")
```
"""


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
    with SafetensorsWriter(path / "adapter_model.safetensors", specs, metadata) as writer:
        for m, (A, B) in tensors.items():
            writer.write(f"{PREFIX}{m}.lora_A.weight", A)  # (k, in)
            writer.write(f"{PREFIX}{m}.lora_B.weight", B)  # (out, k)
    config = {**config, "r": r, "lora_alpha": LORA_ALPHA, "rank_pattern": {m: k for m, k in ranks.items() if k != r},
              "alpha_pattern": {}}
    write_json(path / "adapter_config.json", config)
    return config


def truncation_record(rank: int | None, energy: float | None, kept: dict[str, Truncation]) -> str:
    """TRUNCATION_KEY's value: {"rank": K, "energy": E, "modules": {module: [rank, energy, error]}}."""
    modules = {m: [t.rank, t.energy, t.error] for m, t in kept.items()}
    return json.dumps({"rank": rank, "energy": energy, "modules": modules}, separators=(",", ":"))


def truncation_report(kept: dict[str, Truncation]) -> list[dict]:
    """Per module, for --json: module, rank kept, retained energy, relative Frobenius error."""
    return [{"module": m, **t.as_dict()} for m, t in kept.items()]


def write_truncated(adapter: PolyAdapter, spec: TaskSpec, directory: Path, dtype: str, fan_in_fan_out: bool,
                    rank: int | None, energy: float | None) -> dict:
    """The best rank-`rank` (or `energy`) LoRA of the collapsed task, per module, from the rank-r factors."""
    factors, kept = {}, {}
    for module, A, B in collapse_adapter(adapter, spec):  # A (in, r), B (r, out): delta B.T A.T / r
        Bk, Ak, kept[module.name] = truncate_factored(B.T / adapter.r, A.T, rank, energy)  # (out, k), (k, in)
        factors[module.name] = lora_pair(Bk, Ak, dtype)
    what = f"rank {rank}" if rank is not None else f"energy {energy}"
    note = (f"This is the best {what} approximation of that task's LoRA, module by module (truncated SVD): "
            f"per-module ranks and errors are in the safetensors metadata (`{TRUNCATION_KEY}`).")
    meta = {**provenance(adapter, spec), TRUNCATION_KEY: truncation_record(rank, energy, kept)}
    write_factors(directory, factors, dtype, meta, lora_config(adapter, fan_in_fan_out))
    (directory / "README.md").write_text(model_card(adapter, spec, note), encoding="utf-8", errors="backslashreplace")
    files = ["adapter_config.json", "adapter_model.safetensors", "README.md"]
    return {"files": files, "tensors": 2 * len(factors), "bytes": sum((directory / f).stat().st_size for f in files),
            "truncation": truncation_report(kept)}


def write_lora(adapter: PolyAdapter, spec: TaskSpec, directory: Path, dtype: str = "F32",
               fan_in_fan_out: bool = False, rank: int | None = None, energy: float | None = None) -> dict:
    """Write one collapsed LoRA into the existing empty `directory`; returns files, tensors, bytes
    (and, with `rank` or `energy`, the per-module truncation)."""
    if rank is not None or energy is not None:
        return write_truncated(adapter, spec, directory, dtype, fan_in_fan_out, rank, energy)
    specs = []
    for m in adapter.modules:
        specs += [TensorSpec(f"{PREFIX}{m.name}.lora_A.weight", dtype, (adapter.r, m.in_features)),
                  TensorSpec(f"{PREFIX}{m.name}.lora_B.weight", dtype, (m.out_features, adapter.r))]
    saved = [key for params in adapter.saved_modules.values() for key in params.values()]
    specs += [TensorSpec(key, dtype, adapter.tensor_shape(key)) for key in saved]
    with SafetensorsWriter(directory / "adapter_model.safetensors", specs, provenance(adapter, spec)) as writer:
        for module, A, B in collapse_adapter(adapter, spec):  # in module order, float64
            lora_A, lora_B = lora_weights(A, B)  # (r, in), (out, r)
            writer.write(f"{PREFIX}{module.name}.lora_A.weight", cast_float(lora_A, dtype))
            writer.write(f"{PREFIX}{module.name}.lora_B.weight", cast_float(lora_B, dtype))
        for key in saved:  # trained heads (modules_to_save), under the keys PEFT saves them with
            writer.write(key, cast_float(adapter.tensor(key, np.float64), dtype))
    write_json(directory / "adapter_config.json", lora_config(adapter, fan_in_fan_out))
    # backslashreplace: a path that is not valid UTF-8 is shown escaped, not refused
    (directory / "README.md").write_text(model_card(adapter, spec), encoding="utf-8", errors="backslashreplace")
    files = ["adapter_config.json", "adapter_model.safetensors", "README.md"]
    return {"files": files, "tensors": len(specs), "bytes": sum((directory / f).stat().st_size for f in files)}


def export_lora(adapter: PolyAdapter, spec: TaskSpec, out: Path, dtype: str = "F32", fan_in_fan_out: bool = False,
                force: bool = False, rank: int | None = None, energy: float | None = None) -> dict:
    """Collapse `spec` ("all": every task, one subdirectory each) into LoRA directories at `out`, atomically.
    `rank` / `energy`: the best rank-K LoRA per module, or the smallest rank keeping that share (lowrank.py)."""
    if dtype not in LORA_DTYPES:
        raise PolytoolError(f"LoRA dtype {dtype!r} is not allowed: {', '.join(LORA_DTYPES)}")
    check_rank_options(rank, energy)
    check_collapsible(adapter)
    check_output(out, force, inputs=[adapter.directory])
    with atomic_output_dir(out, force) as tmp:
        if spec != "all":
            written = write_lora(adapter, spec, tmp, dtype, fan_in_fan_out, rank, energy)
        else:
            written = {"files": [], "tensors": 0, "bytes": 0}
            tasks = {}
            for task in range(adapter.n_tasks):
                sub = spec_label(task)
                (tmp / sub).mkdir()
                one = write_lora(adapter, task, tmp / sub, dtype, fan_in_fan_out, rank, energy)
                if "truncation" in one:
                    written.setdefault("truncation", []).extend({"task": task, **t} for t in one.pop("truncation"))
                written.update({"files": written["files"] + [f"{sub}/{f}" for f in one["files"]],
                                "tensors": written["tensors"] + one["tensors"], "bytes": written["bytes"] + one["bytes"]})
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
