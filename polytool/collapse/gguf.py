"""One task of a Poly/MHR adapter -> a GGUF LoRA adapter for llama.cpp (and Ollama), with `gguf`.

`gguf` is llama.cpp's own Python library (the optional extra `polytool[gguf]`). The file is what
llama.cpp's `convert_lora_to_gguf.py` writes from the same LoRA (tests/test_gguf.py compares them
tensor for tensor), without a detour through a PEFT directory:

    general.architecture   the base's llama.cpp architecture ("llama", "qwen2", "phi3", ...)
    general.type           "adapter";  adapter.type "lora";  adapter.lora.alpha = LORA_ALPHA
    adapter.lora.task_name "task-<id>" (or uniform / mean)
    polytool.*             provenance: version, source sha256, task, n_tasks, routing weights
    <gguf name>.lora_a     (r, in)   numpy order; ggml shape [in, r]
    <gguf name>.lora_b     (out, r)  numpy order; ggml shape [r, out]

Tensor names come from the package's name map (gguf.get_tensor_name_map for the base's
architecture), not from a table of ours. llama.cpp scales each pair by alpha / rank (rank read
from lora_b), so LORA_ALPHA = 1 gives Poly's 1/r. What the converter changes beyond names:
for llama.cpp's "llama" architecture (Llama, Mistral) it permutes the rows of q and k for
llama.cpp's RoPE layout (conversion/llama.py, LlamaModel.permute); on a LoRA that is a
permutation of lora_b's rows (`permute_rows`). The factors are the collapsed ones from
`collapse_adapter` + `lora_weights` (the one formula), rounded once to the output dtype.

What llama.cpp cannot apply is refused before anything is written: modules_to_save copies, a
target the architecture's name map does not know, embeddings, and an lm_head tied to the input
embeddings (llama.cpp then has no output tensor to adapt).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..architectures import GGUF_ALWAYS_TIED, GGUF_ARCHITECTURES
from ..core.collapse import LORA_ALPHA, collapse_adapter, lora_weights
from ..core.taskspec import TaskSpec, spec_label
from ..errors import PolytoolError
from ..formats.adapter import PolyAdapter
from ..formats.atomic import atomic_output_dir, atomic_output_file, check_output
from ..formats.base import open_base, read_config
from ..formats.gguf import GGUF_DTYPES, import_gguf
from ..formats.cards import gguf_card
from ..formats.manifest import MANIFEST_JSON, MANIFEST_MD, write_manifest
from ..formats.provenance import TASKS_INDEX, provenance, write_tasks_index
from ..formats.safetensors import cast_float
from .fit import check_collapsible


@dataclass(frozen=True)
class GgufTarget:
    module: str  # the adapter's module path
    name: str  # llama.cpp's tensor name, e.g. blk.0.attn_q.weight
    permute_heads: int | None  # heads for the q/k row permutation, or None


@dataclass(frozen=True)
class GgufPlan:
    arch: str  # llama.cpp's architecture name, e.g. "llama"
    hf_arch: str
    targets: list[GgufTarget]


def _base_arch(config: dict, where: Path) -> str:
    archs = config.get("architectures") or []
    known = [a for a in archs if a in GGUF_ARCHITECTURES]
    if not known:
        raise PolytoolError(f"the base's architecture {archs or config.get('model_type')!r} has no GGUF LoRA "
                            f"support in polytool (supported: {', '.join(sorted(GGUF_ARCHITECTURES))})", where)
    return known[0]


def _heads(config: dict) -> tuple[int, int]:
    n_head = config.get("num_attention_heads") or config.get("n_head")
    return n_head, config.get("num_key_value_heads") or n_head


def plan_gguf(adapter: PolyAdapter, base_dir: Path) -> GgufPlan:
    """Map every adapted module to llama.cpp's tensor name for the base (config.json only is read);
    refuse what llama.cpp cannot apply."""
    gguf = import_gguf()
    if adapter.saved_modules:  # llama.cpp's converter refuses those tensors too
        raise PolytoolError(f"the adapter trains whole modules (modules_to_save: {', '.join(adapter.saved_modules)}), "
                            "which a llama.cpp LoRA cannot carry: merge with --to dense instead", adapter.directory)
    try:
        base = open_base(base_dir)
    except PolytoolError:
        base = None  # config.json only (e.g. .bin weights): saved embeddings cannot be compared
    check_collapsible(adapter, base)  # saved embedding copies must equal the base's
    config = read_config(base_dir)
    hf_arch = _base_arch(config, base_dir / "config.json")
    arch_name, permute_qk = GGUF_ARCHITECTURES[hf_arch]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    n_layers = config.get("num_hidden_layers") or config.get("n_layer")
    names = gguf.get_tensor_name_map(arch, n_layers)
    tied = config.get("tie_word_embeddings", True) is not False  # transformers' default is tied
    n_head, n_kv_head = _heads(config)
    targets = []
    for m in adapter.modules:
        found = names.get_type_and_name(f"{m.name}.weight", try_suffixes=(".weight",))
        if found is None:
            raise PolytoolError(f"module {m.name!r} has no tensor in llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]!r} "
                                "architecture: llama.cpp cannot apply a LoRA there", adapter.directory)
        kind, name = found
        if kind == gguf.MODEL_TENSOR.TOKEN_EMBD:
            raise PolytoolError(f"module {m.name!r} is the token embedding: GGUF LoRA export covers Linear "
                                "targets only", adapter.directory)
        if kind == gguf.MODEL_TENSOR.OUTPUT and (tied or hf_arch in GGUF_ALWAYS_TIED):
            raise PolytoolError(f"module {m.name!r} is an lm_head tied to the input embeddings: llama.cpp has no "
                                "output tensor to apply it to (its converter refuses it too); collapse without "
                                "it or untie the base", adapter.directory)
        heads = None
        if permute_qk and kind == gguf.MODEL_TENSOR.ATTN_Q:
            heads = n_head
        elif permute_qk and kind == gguf.MODEL_TENSOR.ATTN_K:
            heads = n_kv_head
        targets.append(GgufTarget(m.name, name, heads))
    return GgufPlan(gguf.MODEL_ARCH_NAMES[arch], hf_arch, targets)


def permute_rows(lora_b: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation applied to a LoRA: only lora_b's output rows move.

    lora_b (out, r), out = n_head * head_dim; within each head the rows of the two RoPE halves
    are interleaved: (n_head, 2, head_dim/2, r) -> swap axes 1, 2 -> (n_head, head_dim/2, 2, r).
    """
    out, r = lora_b.shape
    return (lora_b.reshape(n_head, 2, out // n_head // 2, r)  # (h, 2, d/2, r)
            .swapaxes(1, 2)  # (h, d/2, 2, r)
            .reshape(out, r))


def _encode(x: np.ndarray, dtype: str, gguf: Any) -> tuple[np.ndarray, Any, tuple[int, ...] | None]:
    """float64 -> (array, ggml type, the logical shape to declare), rounded once. Q8_0 as llama.cpp's converter
    does it: blocks of 32 along a row, and F16 for a tensor whose rows do not split into blocks (lora_b, r < 32)."""
    q = gguf.GGMLQuantizationType
    if dtype == "Q8_0":
        try:
            return gguf.quants.quantize(x.astype(np.float32), q.Q8_0), q.Q8_0, None  # bytes: the writer derives the shape
        except gguf.quants.QuantError:
            dtype = "F16"
    if dtype == "BF16":
        return cast_float(x, "BF16"), q.BF16, x.shape  # uint16 bit patterns
    return np.ascontiguousarray(cast_float(x, dtype)), q.F32 if dtype == "F32" else q.F16, x.shape


def gguf_tensors(adapter: PolyAdapter, spec: TaskSpec, plan: GgufPlan) -> Iterator[tuple[str, np.ndarray]]:
    """(llama.cpp name + .lora_a / .lora_b, float64 array) in module order."""
    targets = {t.module: t for t in plan.targets}
    for module, A, B in collapse_adapter(adapter, spec):  # A (in, r), B (r, out), float64
        lora_a, lora_b = lora_weights(A, B)  # (r, in), (out, r)
        target = targets[module.name]
        if target.permute_heads is not None:
            lora_b = permute_rows(lora_b, target.permute_heads)
        yield f"{target.name}.lora_a", lora_a
        yield f"{target.name}.lora_b", lora_b


def write_gguf(adapter: PolyAdapter, spec: TaskSpec, plan: GgufPlan, path: Path, dtype: str = "F32",
               request: str | None = None) -> dict:
    """Write one task's GGUF LoRA to `path` (a new file); returns tensors and bytes."""
    gguf = import_gguf()
    writer = gguf.GGUFWriter(path, plan.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(LORA_ALPHA))
    writer.add_string("adapter.lora.task_name", spec_label(spec))
    writer.add_name(f"polytool {spec_label(spec)}")
    for key, value in provenance(adapter, spec, request=request).items():
        if key != "format":
            writer.add_string(key, value)
    n = 0
    for name, x in gguf_tensors(adapter, spec, plan):
        data, qtype, shape = _encode(x, dtype, gguf)
        writer.add_tensor(name, data, raw_shape=shape, raw_dtype=qtype)
        n += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors": n, "bytes": path.stat().st_size}


def export_gguf(adapter: PolyAdapter, spec: TaskSpec, base_dir: Path, out: Path, dtype: str = "F32",
                force: bool = False, request: str | None = None) -> dict:
    """`spec` as OUT (a .gguf file), or "all": OUT/task-<id>.gguf per task + the task index."""
    if dtype not in GGUF_DTYPES:
        raise PolytoolError(f"GGUF dtype {dtype!r} is not allowed: {', '.join(GGUF_DTYPES)}")
    plan = plan_gguf(adapter, base_dir)
    check_output(out, force, inputs=[adapter.directory, base_dir])
    if spec != "all":
        with atomic_output_file(out, force) as tmp:
            one = write_gguf(adapter, spec, plan, tmp, dtype, request)
        return {"files": [out.name], "arch": plan.arch, **one}
    written = {"files": [], "tensors": 0, "bytes": 0, "arch": plan.arch}
    with atomic_output_dir(out, force) as tmp:
        tasks = {}
        for task in range(adapter.n_tasks):
            name = f"{spec_label(task)}.gguf"
            one = write_gguf(adapter, task, plan, tmp / name, dtype, request)
            written["files"].append(name)
            written["tensors"] += one["tensors"]
            written["bytes"] += one["bytes"]
            tasks[str(task)] = name
        write_tasks_index(tmp, adapter, tasks, format="gguf")
        written["files"].append(TASKS_INDEX)
        written["manifest"] = write_manifest(tmp, out, adapter, tasks, kind="gguf")
        (tmp / "README.md").write_text(gguf_card(adapter, base_dir, written["files"]), encoding="utf-8",
                                       errors="backslashreplace")
        written["files"] += [MANIFEST_JSON, MANIFEST_MD, "README.md"]  # every file written, counted
        written["bytes"] = sum((tmp / f).stat().st_size for f in written["files"])
    return written
