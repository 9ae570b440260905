"""Dense merge at scale: wall time and peak RSS of `polytool collapse --to dense` for multi-GB bases.

For each size, generates (numpy and polytool's own writer, no torch) a Llama-shaped bfloat16 base of
hidden 2048, intermediate 5632, vocab 32000 with as many layers as the size needs, in shards of
--shard-mb, and two Poly adapters on q_proj and v_proj (r 8, 4 skills, 2 splits, 4 tasks):

    all-layers   adapts every layer: the adapter grows with the model (as real adapters do)
    8-layers     adapts the first 8 layers only: the same adapter at every size

Then runs the merge in a child process under /usr/bin/time (peak RSS: %M), after a `sync`, and
`cp -r` of the base for reference. Peak RSS of the merge is one block of rows plus the adapter
(mapped and read once to validate it), so it should stay flat for the fixed adapter and grow only
by the adapter's own size for the other. Everything is written under --work (default
benchmarks/_work/scale/) and removed afterwards.

    python benchmarks/bench_scale.py [--sizes 1,2,4] [--shard-mb 500] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from polytool.checkpoint import SafetensorsWriter, TensorSpec, save_file, write_json  # noqa: E402

HIDDEN, INTER, VOCAB = 2048, 5632, 32000
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
          "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}
TARGETS = ("q_proj", "v_proj")
R, SKILLS, SPLITS, TASKS = 8, 4, 2, 4
CHUNK = 1 << 24  # elements generated at once


def tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of a LlamaForCausalLM without tied embeddings, in transformers' order."""
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        out += [(f"model.layers.{i}.input_layernorm.weight", (HIDDEN,)), (f"model.layers.{i}.post_attention_layernorm.weight", (HIDDEN,))]
        out += [(f"model.layers.{i}.{'self_attn' if k[0] in 'qkvo' else 'mlp'}.{k}.weight", s) for k, s in SHAPES.items()]
    return out + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def layers_for(gb: float) -> int:
    per_layer = sum(a * b for a, b in SHAPES.values()) * 2
    return max(1, round((gb * 1e9 - 2 * VOCAB * HIDDEN * 2) / per_layer))


def bf16_chunks(rng: np.random.Generator, shape: tuple[int, ...]):
    """Random weight-like bfloat16 bit patterns (+-[2^-7, 2^-6)), CHUNK elements at a time; norms are 1.0."""
    n = int(np.prod(shape))
    if len(shape) == 1:
        yield np.full(n, 0x3F80, np.uint16)
        return
    for lo in range(0, n, CHUNK):
        yield (rng.integers(0, 1 << 16, size=min(CHUNK, n - lo), dtype=np.uint16) & 0x807F) | 0x3C00


def write_base(directory: Path, layers: int, shard_bytes: int) -> int:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    groups, size = [[]], 0
    for name, shape in tensors(layers):
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
    total = sum(int(np.prod(s)) * 2 for _, s in tensors(layers))
    write_json(directory / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(directory / "config.json", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTER,
        "num_hidden_layers": layers, "num_attention_heads": HIDDEN // 128, "num_key_value_heads": HIDDEN // 128,
        "vocab_size": VOCAB, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "dtype": "bfloat16", "hidden_act": "silu"})
    return total


def write_adapter(directory: Path, base: Path, layers: int) -> int:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(1)
    poly = {}
    for name, (d_out, d_in) in (t for t in tensors(layers) if t[0].endswith(tuple(f"{k}.weight" for k in TARGETS))):
        key = "base_model.model." + name.removesuffix(".weight")
        poly[key + ".poly_lora_A"] = rng.standard_normal((SPLITS, SKILLS, d_in // SPLITS, R), dtype=np.float32) * 0.01
        poly[key + ".poly_lora_B"] = rng.standard_normal((SPLITS, SKILLS, R, d_out // SPLITS), dtype=np.float32) * 0.01
        poly[key + ".poly_router.module_logits"] = rng.standard_normal((TASKS, SPLITS * SKILLS), dtype=np.float32)
    save_file(directory / "adapter_model.safetensors", poly, {"format": "pt"})
    write_json(directory / "adapter_config.json", {
        "peft_type": "POLY", "poly_type": "poly", "task_type": "CAUSAL_LM", "r": R, "n_tasks": TASKS, "n_skills": SKILLS,
        "n_splits": SPLITS, "target_modules": list(TARGETS), "base_model_name_or_path": str(base)})
    return (directory / "adapter_model.safetensors").stat().st_size


def measure(cmd: list[str], report: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of `cmd` under /usr/bin/time, after a sync."""
    os.sync()
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(report), *cmd], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return elapsed, int(report.read_text().split()[-1]) / 1024


def run_size(work: Path, gb: float, shard_bytes: int) -> dict:
    layers = layers_for(gb)
    base, out = work / "base", work / "out"
    t = time.perf_counter()
    total = write_base(base, layers, shard_bytes)
    row = {"size_gb": round(total / 1e9, 2), "layers": layers, "shards": len(list(base.glob("*.safetensors"))),
           "generate_s": round(time.perf_counter() - t, 1)}
    polytool = str(Path(sys.executable).parent / "polytool")
    for label, adapted in (("all-layers", layers), ("8-layers", min(8, layers))):
        adapter = work / f"adapter-{label}"
        adapter_mb = write_adapter(adapter, base, adapted) / 1e6
        seconds, rss = measure([polytool, "collapse", str(adapter), "--task", "0", "--to", "dense", "--out", str(out)],
                               work / "time.txt")
        row[label] = {"adapter_mb": round(adapter_mb, 1), "seconds": round(seconds, 2), "peak_rss_mb": round(rss),
                      "gb_per_s": round(total / 1e9 / seconds, 2)}
        shutil.rmtree(out)
        shutil.rmtree(adapter)
    seconds, _ = measure(["cp", "-r", str(base), str(out)], work / "time.txt")
    row["cp_seconds"] = round(seconds, 2)
    shutil.rmtree(out)
    shutil.rmtree(base)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,2,4", help="base sizes in GB, comma-separated")
    parser.add_argument("--shard-mb", type=int, default=500)
    parser.add_argument("--work", type=Path, default=ROOT / "_work" / "scale")
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    need = 2.2 * max(sizes) * 1e9
    args.work.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(args.work).free < need:
        raise SystemExit(f"need about {need / 1e9:.0f} GB free under {args.work}")
    rows = []
    try:
        for gb in sizes:
            rows.append(run_size(args.work, gb, args.shard_mb * 10**6))
            r = rows[-1]
            print(f"{r['size_gb']:5.2f} GB ({r['layers']} layers, {r['shards']} shards): "
                  + "; ".join(f"{k} adapter {r[k]['adapter_mb']:.0f} MB -> {r[k]['seconds']:.2f} s, "
                              f"{r[k]['peak_rss_mb']} MB peak RSS" for k in ("all-layers", "8-layers"))
                  + f"; cp -r {r['cp_seconds']:.2f} s", flush=True)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
