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
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent

from synthetic import PROJ, llama_tensors, measure, write_adapter, write_base  # noqa: E402

SIZES = {  # name -> (hidden, intermediate, vocab): about 259 MB and 1.08 GB in bfloat16
    "small": (1024, 2816, 13000),
    "large": (2048, 5632, 32000),
}
LAYERS, SHARD_BYTES = 8, 100 * 10**6
R, SKILLS, SPLITS, TASKS = 8, 8, 4, 4
PEFT_ROUTE = """
import sys, torch, transformers as tf
from peft import PeftModel
base = tf.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model = PeftModel.from_pretrained(base, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3])
"""


def run_routes(work: Path, name: str, repeat: int, skip_peft: bool) -> dict:
    base, adapter, out = work / f"base-{name}", work / f"adapter-{name}", work / f"out-{name}"
    polytool = str(Path(sys.executable).parent / "polytool")
    report = work / "time.txt"
    routes = {
        "cp": lambda: [measure(["cp", "-r", str(base), str(out)], report)],
        "polytool": lambda: [measure([polytool, "collapse", str(adapter), "--task", "0", "--to", "dense",
                                      "--out", str(out)], report)],
        "peft": lambda: [measure([polytool, "collapse", str(adapter), "--task", "0", "--out", str(work / "lora")], report),
                         measure([sys.executable, "-c", PEFT_ROUTE, str(base), str(work / "lora"), str(out)], report)],
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
                total = write_base(base, hidden, inter, vocab, LAYERS, SHARD_BYTES)
                write_adapter(adapter, base, llama_tensors(hidden, inter, vocab, LAYERS), PROJ, R, SKILLS, SPLITS, TASKS)
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
