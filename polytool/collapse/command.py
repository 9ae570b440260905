"""`polytool collapse`: one task spec of an adapter to a LoRA, a GGUF LoRA or a dense model (torch-free).

`collapse(options)` validates the request, dispatches to the writer of the output kind (lora.py, gguf.py,
dense.py) and returns what was written as a JSON-ready dict (keys: docs/collapse.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..core.taskspec import TaskSpec, parse_task_spec, spec_label
from ..core.units import parse_size
from ..errors import PolytoolError
from ..formats.adapter import PolyAdapter, load_adapter
from ..formats.atomic import check_output
from ..formats.base import resolve_base_dir
from ..formats.safetensors import OUTPUT_DTYPES


@dataclass(frozen=True)
class CollapseOptions:
    """Everything `polytool collapse` takes (the CLI's options, one field each)."""

    adapter_dir: Path
    task: str
    out: Path
    kind: str = "lora"  # lora, dense or gguf
    base_dir: Path | None = None
    dtype: str = "auto"  # a key of OUTPUT_DTYPES
    max_shard_size: str | None = None
    untie: bool = False
    rank: int | None = None
    energy: float | None = None
    stack: str | None = None  # --for: run check's rules for this serving stack first
    force: bool = False
    revision: str | None = None  # of the adapter, when adapter_dir is a hub id


def collapse(o: CollapseOptions, warn: Callable[[str], None] = lambda _: None, progress=None) -> dict:
    """Write the output `o` asks for; returns the result shown by the CLI."""
    adapter = load_adapter(o.adapter_dir, revision=o.revision)
    spec = parse_task_spec(o.task, adapter.n_tasks, allow_all=True)
    if o.stack is not None and (o.kind == "dense" or (o.kind == "gguf") != (o.stack == "llama.cpp")):
        raise PolytoolError(f"--for {o.stack} does not fit --to {o.kind}: llama.cpp takes --to gguf; vllm, tgi and peft "
                            "take --to lora")
    if o.kind != "dense" and (o.max_shard_size or o.untie):
        raise PolytoolError("--max-shard-size and --untie apply to --to dense only")
    write = {"gguf": _to_gguf, "lora": _to_lora, "dense": _to_dense}[o.kind]
    data = write(o, adapter, spec, warn, progress)
    return {"out": str(o.out), "kind": o.kind, "task": spec if isinstance(spec, int) else spec_label(spec),
            "adapter": str(adapter.directory), **data}


def _base(o: CollapseOptions, adapter: PolyAdapter) -> Path:
    return resolve_base_dir(o.base_dir, adapter.base_model_name_or_path, adapter.config.get("revision"))


def _to_gguf(o: CollapseOptions, adapter: PolyAdapter, spec: TaskSpec, warn, progress) -> dict:
    from .gguf import export_gguf

    data = export_gguf(adapter, spec, _base(o, adapter), o.out, OUTPUT_DTYPES[o.dtype] or "F32", o.force, o.task)
    return {**data, "dtype": o.dtype if o.dtype != "auto" else "float32"}


def _to_lora(o: CollapseOptions, adapter: PolyAdapter, spec: TaskSpec, warn, progress) -> dict:
    from .fit import base_uses_conv1d, lora_base
    from .lora import LoraOptions, export_lora, lora_config

    base = lora_base(adapter, o.base_dir)  # read for its checks even without --base: never written
    check_output(o.out, o.force, inputs=[adapter.directory] + ([base] if base else []))
    if base is None:
        warn(f"no base at hand ({adapter.base_model_name_or_path or 'none recorded'} is not found locally): module "
             "names and shapes, trained heads and saved embeddings were not checked against it, and the targets "
             "are taken as Linear (fan_in_fan_out false; GPT-2's Conv1D needs it true): pass --base DIR to check")
    conv1d = base_uses_conv1d(adapter, o.base_dir)
    dtype = OUTPUT_DTYPES[o.dtype] or "F32"
    if o.stack is not None:
        from ..check.rules import collapse_facts, refuse_problems, report
        from ..formats.base import open_base

        facts = collapse_facts(adapter, lora_config(adapter, conv1d), dtype)
        refuse_problems(report(facts, o.stack, open_base(base) if base else None))
    data = export_lora(adapter, spec, o.out, LoraOptions(dtype, conv1d, o.rank, o.energy, o.force, o.task))
    return {**data, "dtype": o.dtype if o.dtype != "auto" else "float32", "n_tasks": adapter.n_tasks}


def _to_dense(o: CollapseOptions, adapter: PolyAdapter, spec: TaskSpec, warn, progress) -> dict:
    from .dense import DenseOptions, check_dense_spec, merge_dense

    check_dense_spec(spec)
    if o.rank is not None or o.energy is not None:
        raise PolytoolError("--rank and --energy apply to a LoRA output: a dense merge adds the exact delta")
    size = None if o.max_shard_size is None else parse_size(o.max_shard_size)
    dense = DenseOptions(OUTPUT_DTYPES[o.dtype], o.untie, size, o.force, o.task)
    return merge_dense(adapter, spec, _base(o, adapter), o.out, dense, progress)
