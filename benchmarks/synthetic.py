"""Synthetic Llama-shaped checkpoints and Poly adapters for the merge benchmarks, and a timer.

Everything is written with numpy and polytool's own safetensors writer (no torch), so generating a
multi-GB base costs seconds and little memory. Used by bench_merge.py and bench_scale.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from polytool.formats.safetensors_writer import SafetensorsWriter, TensorSpec, save_file  # noqa: E402
from polytool.formats.jsonfile import write_json

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHUNK = 1 << 24  # elements generated at once
Tensors = list[tuple[str, tuple[int, ...]]]


def llama_tensors(hidden: int, inter: int, vocab: int, layers: int) -> Tensors:
    """(name, shape) in transformers' order for a LlamaForCausalLM without tied embeddings."""
    shapes = dict(zip(PROJ, [(hidden, hidden)] * 4 + [(inter, hidden), (inter, hidden), (hidden, inter)]))
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
        out += [(p + ("self_attn." if k[0] in "qkvo" else "mlp.") + k + ".weight", s) for k, s in shapes.items()]
    return out + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def bf16_chunks(rng: np.random.Generator, shape: tuple[int, ...]) -> Iterator[np.ndarray]:
    """Random weight-like bfloat16 bit patterns (+-[2^-7, 2^-6): finite), CHUNK at a time; norms are 1.0."""
    n = int(np.prod(shape))
    if len(shape) == 1:
        yield np.full(n, 0x3F80, np.uint16)
        return
    for lo in range(0, n, CHUNK):
        yield (rng.integers(0, 1 << 16, size=min(CHUNK, n - lo), dtype=np.uint16) & 0x807F) | 0x3C00


def write_base(directory: Path, hidden: int, inter: int, vocab: int, layers: int, shard_bytes: int) -> int:
    """A bfloat16 Llama checkpoint in shards of at most `shard_bytes`, with index and config; its size in bytes."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    tensors = llama_tensors(hidden, inter, vocab, layers)
    groups, size = [[]], 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * 2
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        with SafetensorsWriter(directory / fname, [TensorSpec(n, "BF16", s) for n, s in group], {"format": "pt"}) as w:
            for name, shape in group:
                w.write(name, bf16_chunks(rng, shape))
                weight_map[name] = fname
    total = sum(int(np.prod(s)) * 2 for _, s in tensors)
    write_json(directory / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(directory / "config.json", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": hidden // 128, "num_key_value_heads": hidden // 128,
        "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "dtype": "bfloat16", "hidden_act": "silu", "rope_theta": 10000.0})
    return total


def write_adapter(directory: Path, base: Path, tensors: Tensors, targets: tuple[str, ...],
                  r: int, skills: int, splits: int, tasks: int) -> int:
    """A random Poly adapter on the `targets` projections among `tensors`; its file size in bytes."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(1)
    poly = {}
    for name, (d_out, d_in) in ((n, s) for n, s in tensors if n.endswith(tuple(f".{k}.weight" for k in targets))):
        key = "base_model.model." + name.removesuffix(".weight")
        poly[key + ".poly_lora_A"] = rng.standard_normal((splits, skills, d_in // splits, r), dtype=np.float32) * 0.01
        poly[key + ".poly_lora_B"] = rng.standard_normal((splits, skills, r, d_out // splits), dtype=np.float32) * 0.01
        poly[key + ".poly_router.module_logits"] = rng.standard_normal((tasks, splits * skills), dtype=np.float32)
    save_file(directory / "adapter_model.safetensors", poly, {"format": "pt"})
    write_json(directory / "adapter_config.json", {
        "peft_type": "POLY", "poly_type": "poly", "task_type": "CAUSAL_LM", "r": r, "n_tasks": tasks, "n_skills": skills,
        "n_splits": splits, "target_modules": list(targets), "base_model_name_or_path": str(base)})
    return (directory / "adapter_model.safetensors").stat().st_size


def measure(cmd: list[str], report: Path, env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one command under /usr/bin/time (a child spawned from this
    Python process would count this process's pages in its own peak RSS), after a sync so that
    earlier runs' writeback does not land on this one. `env`: variables set for the command."""
    os.sync()
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(report), *cmd], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env=None if env is None else {**os.environ, **env})
    elapsed = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return elapsed, int(report.read_text().split()[-1]) / 1024


def tree_env(tree: Path | None) -> dict | None:
    """The environment that runs the polytool of source tree `tree` (this checkout for the benchmarks' own
    route; `--before DIR`, e.g. a `git worktree` of the commit to compare with) with this interpreter: its
    directory first on PYTHONPATH."""
    if tree is None:
        return None
    if not (tree / "polytool" / "__init__.py").is_file():
        raise SystemExit(f"--before {tree}: no polytool/__init__.py there (give a source tree of polytool)")
    return {"PYTHONPATH": os.pathsep.join([str(tree.resolve()), *filter(None, [os.environ.get("PYTHONPATH")])])}
