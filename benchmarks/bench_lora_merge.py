"""Merging 4 tasks of a Poly adapter into one rank-16 LoRA: `polytool merge` beside the PEFT route.

Generates a Llama-shaped bfloat16 base (8 layers, 100 MB shards; numpy and polytool's own writer) and a
Poly adapter on all 7 projections (r 8, 8 skills, 4 splits, 4 tasks) into benchmarks/_work/, then times
each route in a child process and reads its peak RSS from /usr/bin/time, once:

    polytool      polytool merge ADAPTER:0 ... ADAPTER:3 --rank 16 --out OUT   (linear: factored, no model)
    peft          transformers from_pretrained (float32) + PeftModel with the 4 tasks' LoRAs (written by
                  `polytool collapse`, timed apart as `collapse x4`) + add_weighted_adapter(..., "svd",
                  svd_rank=16) + save_pretrained of the merged adapter
    polytool-ties polytool merge ... --method ties --density 0.5 --rank 16
    peft-ties     the PEFT route with combination_type "ties_svd", density 0.5

Both sides weight the tasks alike (0.25 each for linear, 1 each for TIES, polytool's defaults).
Usage: python benchmarks/bench_lora_merge.py [--size small|large] [--skip-ties] [--keep]
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

SIZES = {"small": (1024, 2816, 13000), "large": (2048, 5632, 32000)}  # about 259 MB and 1.08 GB in bfloat16
LAYERS, SHARD_BYTES = 8, 100 * 10**6
R, SKILLS, SPLITS, TASKS, RANK, DENSITY = 8, 8, 4, 4, 16, 0.5
PEFT_ROUTE = """
import sys, torch, transformers as tf
from peft import PeftModel
base_dir, out, kind, density, *loras = sys.argv[1:]
model = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), loras[0],
                                  adapter_name="t0")
for i, d in enumerate(loras[1:], 1):
    model.load_adapter(d, adapter_name=f"t{i}")
names = [f"t{i}" for i in range(len(loras))]
weights = [1.0] * len(loras) if kind == "ties_svd" else [1.0 / len(loras)] * len(loras)
model.add_weighted_adapter(names, weights, "merged", combination_type=kind, svd_rank=%d,
                           density=float(density) if kind == "ties_svd" else None)
model.save_pretrained(out, selected_adapters=["merged"])
""" % RANK


def run(work: Path, name: str, ties: bool) -> dict:
    base, adapter, out = work / f"base-{name}", work / f"adapter-{name}", work / f"out-{name}"
    polytool = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT.parent)!r}); "
                "from polytool.cli import main; main(prog_name='polytool')"]
    report = work / "time.txt"
    sources = [f"{adapter}:{t}" for t in range(TASKS)]
    loras = [str(work / f"lora-{name}-{t}") for t in range(TASKS)]
    results = {}

    def route(label: str, cmds: list[list[str]]) -> None:
        shutil.rmtree(out, ignore_errors=True)
        parts = [measure(cmd, report) for cmd in cmds]
        results[label] = {"seconds": sum(t for t, _ in parts), "peak_rss_mb": max(m for _, m in parts)}
        print(f"  {name:<6} {label:<14} {results[label]['seconds']:8.2f} s  {results[label]['peak_rss_mb']:8.0f} MB", flush=True)

    route("polytool", [polytool + ["merge", *sources, "--rank", str(RANK), "--out", str(out)]])
    for d in loras:
        shutil.rmtree(d, ignore_errors=True)
    route("collapse x4", [polytool + ["collapse", str(adapter), "--task", str(t), "--out", loras[t]] for t in range(TASKS)])
    route("peft", [[sys.executable, "-c", PEFT_ROUTE, str(base), str(out), "svd", "1", *loras]])
    if ties:
        route("polytool-ties", [polytool + ["merge", *sources, "--method", "ties", "--density", str(DENSITY),
                                            "--rank", str(RANK), "--out", str(out)]])
        route("peft-ties", [[sys.executable, "-c", PEFT_ROUTE, str(base), str(out), "ties_svd", str(DENSITY), *loras]])
    shutil.rmtree(out, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--work", type=Path, default=ROOT / "_work")
    parser.add_argument("--keep", action="store_true", help="keep the generated base and adapter for another run")
    parser.add_argument("--skip-ties", action="store_true")
    args = parser.parse_args()
    hidden, inter, vocab = SIZES[args.size]
    base, adapter = args.work / f"base-{args.size}", args.work / f"adapter-{args.size}"
    try:
        if not base.exists():
            t = time.perf_counter()
            total = write_base(base, hidden, inter, vocab, LAYERS, SHARD_BYTES)
            write_adapter(adapter, base, llama_tensors(hidden, inter, vocab, LAYERS), PROJ, R, SKILLS, SPLITS, TASKS)
            print(f"generated {args.size}: {total / 1e6:.0f} MB bf16 in {time.perf_counter() - t:.1f} s", flush=True)
        res = run(args.work, args.size, not args.skip_ties)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    print(json.dumps(res, indent=1))
    p, f = res["polytool"], res["peft"]
    print(f"SUMMARY {args.size} rank-{RANK} linear merge of {TASKS} tasks: polytool {p['seconds']:.2f} s / "
          f"{p['peak_rss_mb']:.0f} MB, PEFT route {f['seconds']:.2f} s / {f['peak_rss_mb']:.0f} MB "
          f"(+ collapse x4 {res['collapse x4']['seconds']:.2f} s): {f['seconds'] / p['seconds']:.0f}x faster, "
          f"{p['peak_rss_mb'] / f['peak_rss_mb']:.3f}x the peak RSS")
    if "peft-ties" in res:
        pt, ft = res["polytool-ties"], res["peft-ties"]
        print(f"SUMMARY ties --rank {RANK}: polytool {pt['seconds']:.2f} s / {pt['peak_rss_mb']:.0f} MB, PEFT ties_svd "
              f"{ft['seconds']:.2f} s / {ft['peak_rss_mb']:.0f} MB: {ft['seconds'] / pt['seconds']:.1f}x faster")


if __name__ == "__main__":
    main()
