"""Dense merge speed and memory: `polytool collapse --to dense` beside the PEFT route and `cp -r`.

Generates Llama-shaped bfloat16 bases (8 layers, 100 MB shards, written with numpy and polytool's
own writer: no torch) and a Poly adapter on all 7 projections (r 8, 8 skills, 4 splits) into
benchmarks/_work/, then times each route in a child process and reads its peak RSS from /usr/bin/time:

    polytool   polytool collapse ADAPTER --task 0 --to dense
    peft       polytool collapse --to lora, then transformers from_pretrained + PeftModel.from_pretrained
               + merge_and_unload + save_pretrained (the LoRA step's time is included)
    cp         cp -r of the base directory
    before     with --before DIR: the same polytool command from another source tree (e.g. `git worktree add
               DIR <commit>`), so that a change is measured before and after in one run

Each route runs --repeat times, the routes interleaved (the file cache is warm after the first); the best and
median times and the largest peak RSS are reported. Usage: python benchmarks/bench_merge.py [--sizes small,large]
[--repeat N] [--before DIR] [--skip-peft] [--keep]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent

from synthetic import PROJ, llama_tensors, measure, tree_env, write_adapter, write_base  # noqa: E402

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


def run_routes(work: Path, name: str, repeat: int, skip_peft: bool, before: Path | None) -> dict:
    """Each route `repeat` times, interleaved (cp, polytool, polytool before, PEFT, cp, ...): a busy machine
    slows all of them alike. Per route: every time, the best and median, and the largest peak RSS."""
    base, adapter, out = work / f"base-{name}", work / f"adapter-{name}", work / f"out-{name}"
    polytool = str(Path(sys.executable).parent / "polytool")
    report = work / "time.txt"
    dense = [polytool, "collapse", str(adapter), "--task", "0", "--to", "dense", "--out", str(out)]
    routes = {
        "cp": lambda: [measure(["cp", "-r", str(base), str(out)], report)],
        "polytool": lambda: [measure(dense, report, tree_env(ROOT.parent))],
        "before": lambda: [measure(dense, report, tree_env(before))],
        "peft": lambda: [measure([polytool, "collapse", str(adapter), "--task", "0", "--out", str(work / "lora")], report,
                                 tree_env(ROOT.parent)),
                         measure([sys.executable, "-c", PEFT_ROUTE, str(base), str(work / "lora"), str(out)], report)],
    }
    skip = ({"peft"} if skip_peft else set()) | ({"before"} if before is None else set())
    times: dict[str, list] = {r: [] for r in routes if r not in skip}
    rss: dict[str, float] = {r: 0.0 for r in times}
    for _ in range(repeat):
        for route in times:
            for p in (out, work / "lora"):
                shutil.rmtree(p, ignore_errors=True)
            parts = routes[route]()
            times[route].append(sum(t for t, _ in parts))
            rss[route] = max(rss[route], max(m for _, m in parts))
    results = {}
    for route, ts in times.items():
        results[route] = {"seconds": min(ts), "median_seconds": statistics.median(ts), "all_seconds": ts,
                          "peak_rss_mb": rss[route]}
        print(f"  {name:<6} {route:<9} best {min(ts):7.2f} s  median {statistics.median(ts):7.2f} s  "
              f"{rss[route]:8.0f} MB", flush=True)
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
    parser.add_argument("--before", type=Path, help="another polytool source tree (e.g. a git worktree of the "
                                                   "commit before a change), run as the route 'before'")
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
            res[name] = run_routes(args.work, name, args.repeat, args.skip_peft, args.before)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    print(json.dumps(res, indent=1))
    report(res)


def report(res: dict) -> None:
    """Best times (medians in brackets) and the ratios the goals are stated in."""
    for name, r in res.items():
        p, c = r["polytool"], r["cp"]
        line = (f"{name}: polytool {p['seconds']:.2f} s ({p['median_seconds']:.2f}) / {p['peak_rss_mb']:.0f} MB, "
                f"cp {c['seconds']:.2f} s ({c['median_seconds']:.2f})")
        if "before" in r:
            b = r["before"]
            line += (f", before {b['seconds']:.2f} s ({b['median_seconds']:.2f}) / {b['peak_rss_mb']:.0f} MB "
                     f"({b['seconds'] / p['seconds']:.2f}x polytool's time)")
        if "peft" in r:
            f = r["peft"]
            line += (f", PEFT route {f['seconds']:.2f} s ({f['median_seconds']:.2f}) / {f['peak_rss_mb']:.0f} MB: "
                     f"{f['seconds'] / p['seconds']:.1f}x faster, {p['peak_rss_mb'] / f['peak_rss_mb']:.2f}x the RSS")
        print(line)
    if {"small", "large"} <= res.keys():
        s, l = res["small"], res["large"]
        for route in [r for r in ("polytool", "before") if r in s and r in l]:
            dp = l[route]["seconds"] - s[route]["seconds"]
            dc = l["cp"]["seconds"] - s["cp"]["seconds"]
            drss = l[route]["peak_rss_mb"] - s[route]["peak_rss_mb"]
            versus = (f"{l['peft']['seconds'] / l[route]['seconds']:.1f}x faster than PEFT (goal 8x) at "
                      f"{l[route]['peak_rss_mb'] / l['peft']['peak_rss_mb']:.2f}x its peak RSS" if "peft" in l
                      else "PEFT route skipped")
            print(f"SUMMARY {route} 1.08 GB bf16: {versus}; marginal cost small -> large {dp:.2f} s, cp's {dc:.2f} s: {dp / max(dc, 1e-9):.1f}x (goal "
                  f"1.5x); peak RSS +{drss:.0f} MB over the 259 MB run")


if __name__ == "__main__":
    main()
