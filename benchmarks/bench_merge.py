"""Dense merge speed and memory: `polytool collapse --to dense` beside the PEFT route and `cp -r`.

Generates Llama-shaped bfloat16 bases (8 layers, 100 MB shards, written with numpy and polytool's
own writer: no torch) and a Poly adapter on all 7 projections (r 8, 8 skills, 4 splits) into
benchmarks/_work/, then times each route in a child process and reads its peak RSS from /usr/bin/time:

    polytool   polytool collapse ADAPTER --task 0 --to dense
    peft       polytool collapse --to lora, then transformers from_pretrained + PeftModel.from_pretrained
               + merge_and_unload + save_pretrained (the LoRA step's time is included)
    cp         cp -r of the base directory

Each route runs --repeat times (the file cache is warm after the first); the best time and the
largest peak RSS are reported. Usage: python benchmarks/bench_merge.py [--sizes small,large] [--keep]
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

from polytool.checkpoint import TensorSpec, SafetensorsWriter, save_file, write_json  # noqa: E402

SIZES = {  # name -> (hidden, intermediate, vocab): about 259 MB and 1.08 GB in bfloat16
    "small": (1024, 2816, 13000),
    "large": (2048, 5632, 32000),
}
LAYERS, SHARD_BYTES = 8, 100 * 10**6
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
R, SKILLS, SPLITS, TASKS = 8, 8, 4, 4
PEFT_ROUTE = """
import sys, torch, transformers as tf
from peft import PeftModel
base = tf.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model = PeftModel.from_pretrained(base, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3])
"""


def llama_tensors(hidden: int, inter: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in transformers' order for a LlamaForCausalLM without tied embeddings."""
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden), "o_proj": (hidden, hidden),
              "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
        out += [(p + ("self_attn." if k.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp.") + k + ".weight", s)
                for k, s in shapes.items()]
    return out + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def random_bf16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random bfloat16 bit patterns in +-[2^-7, 2^-6): weight-like, finite."""
    if len(shape) == 1:
        return np.full(shape, 0x3F80, np.uint16)  # norms: 1.0
    return (rng.integers(0, 1 << 16, size=shape, dtype=np.uint16) & 0x807F) | 0x3C00


def write_base(directory: Path, hidden: int, inter: int, vocab: int) -> int:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    tensors = llama_tensors(hidden, inter, vocab)
    shards, size = [[]], 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map = {}
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with SafetensorsWriter(directory / fname, [TensorSpec(n, "BF16", s) for n, s in group], {"format": "pt"}) as w:
            for name, shape in group:
                w.write(name, random_bf16(rng, shape))
                weight_map[name] = fname
    total = sum(int(np.prod(s)) * 2 for _, s in tensors)
    write_json(directory / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(directory / "config.json", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": LAYERS, "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64,
        "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "dtype": "bfloat16", "hidden_act": "silu", "rope_theta": 10000.0})
    return total


def write_adapter(directory: Path, base: Path, hidden: int, inter: int) -> None:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(1)
    tensors = {}
    for name, (d_out, d_in) in ((n, s) for n, s in llama_tensors(hidden, inter, 1) if n.endswith(tuple(p + ".weight" for p in PROJ))):
        key = "base_model.model." + name[: -len(".weight")]
        tensors[key + ".poly_lora_A"] = (rng.standard_normal((SPLITS, SKILLS, d_in // SPLITS, R)) * 0.01).astype(np.float32)
        tensors[key + ".poly_lora_B"] = (rng.standard_normal((SPLITS, SKILLS, R, d_out // SPLITS)) * 0.01).astype(np.float32)
        tensors[key + ".poly_router.module_logits"] = rng.standard_normal((TASKS, SPLITS * SKILLS)).astype(np.float32)
    save_file(directory / "adapter_model.safetensors", tensors, {"format": "pt"})
    write_json(directory / "adapter_config.json", {
        "peft_type": "POLY", "poly_type": "poly", "task_type": "CAUSAL_LM", "r": R, "n_tasks": TASKS, "n_skills": SKILLS,
        "n_splits": SPLITS, "target_modules": list(PROJ), "base_model_name_or_path": str(base)})


def measure(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one command, from /usr/bin/time (a child spawned from this
    Python process would count this process's pages in its own peak RSS), after a sync so that
    earlier runs' writeback does not land on this one."""
    os.sync()
    report = ROOT / "_work" / "time.txt"
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(report), *cmd], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.decode()[-2000:]}")
    return elapsed, int(report.read_text().split()[-1]) / 1024


def run_routes(work: Path, name: str, repeat: int, skip_peft: bool) -> dict:
    base, adapter, out = work / f"base-{name}", work / f"adapter-{name}", work / f"out-{name}"
    polytool = str(Path(sys.executable).parent / "polytool")
    routes = {
        "cp": lambda: [measure(["cp", "-r", str(base), str(out)])],
        "polytool": lambda: [measure([polytool, "collapse", str(adapter), "--task", "0", "--to", "dense", "--out", str(out)])],
        "peft": lambda: [measure([polytool, "collapse", str(adapter), "--task", "0", "--out", str(work / "lora")]),
                         measure([sys.executable, "-c", PEFT_ROUTE, str(base), str(work / "lora"), str(out)])],
    }
    results = {}
    for route, fn in routes.items():
        if route == "peft" and skip_peft:
            continue
        best_t, worst_rss = float("inf"), 0.0
        for _ in range(repeat):
            for p in (out, work / "lora"):
                shutil.rmtree(p, ignore_errors=True)
            parts = fn()
            best_t = min(best_t, sum(t for t, _ in parts))
            worst_rss = max(worst_rss, max(m for _, m in parts))
        results[route] = {"seconds": best_t, "peak_rss_mb": worst_rss}
        print(f"  {name:<6} {route:<9} {best_t:7.2f} s  {worst_rss:8.0f} MB", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work / "lora", ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,large")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--work", type=Path, default=ROOT / "_work")
    parser.add_argument("--keep", action="store_true", help="keep the generated bases for another run")
    parser.add_argument("--skip-peft", action="store_true")
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    res = {}
    try:
        for name in sizes:
            hidden, inter, vocab = SIZES[name]
            base, adapter = args.work / f"base-{name}", args.work / f"adapter-{name}"
            if not base.exists():
                t = time.perf_counter()
                total = write_base(base, hidden, inter, vocab)
                write_adapter(adapter, base, hidden, inter)
                print(f"generated {name}: {total / 1e6:.0f} MB bf16 in {time.perf_counter() - t:.1f} s", flush=True)
            res[name] = run_routes(args.work, name, args.repeat, args.skip_peft)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    print(json.dumps(res, indent=1))
    report(res)


def report(res: dict) -> None:
    for name, r in res.items():
        p, c = r["polytool"], r["cp"]
        line = f"{name}: polytool {p['seconds']:.2f} s / {p['peak_rss_mb']:.0f} MB, cp {c['seconds']:.2f} s"
        if "peft" in r:
            f = r["peft"]
            line += (f", PEFT route {f['seconds']:.2f} s / {f['peak_rss_mb']:.0f} MB: "
                     f"{f['seconds'] / p['seconds']:.1f}x faster, {p['peak_rss_mb'] / f['peak_rss_mb']:.2f}x the RSS")
        print(line)
    if {"small", "large"} <= res.keys():
        s, l = res["small"], res["large"]
        dp = l["polytool"]["seconds"] - s["polytool"]["seconds"]
        dc = l["cp"]["seconds"] - s["cp"]["seconds"]
        drss = l["polytool"]["peak_rss_mb"] - s["polytool"]["peak_rss_mb"]
        print(f"marginal cost small -> large: polytool {dp:.2f} s, cp {dc:.2f} s ({dp / max(dc, 1e-9):.1f}x); "
              f"polytool peak RSS +{drss:.0f} MB")
        speed = l["peft"]["seconds"] / l["polytool"]["seconds"] if "peft" in l else float("nan")
        rss = l["polytool"]["peak_rss_mb"] / l["peft"]["peak_rss_mb"] if "peft" in l else float("nan")
        print(f"SUMMARY 1.08 GB bf16: {speed:.1f}x faster than PEFT at {rss:.2f}x its peak RSS; "
              f"marginal {dp / max(dc, 1e-9):.1f}x cp's; RSS +{drss:.0f} MB over the 259 MB run")


if __name__ == "__main__":
    main()
