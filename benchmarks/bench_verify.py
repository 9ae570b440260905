"""verify at scale: `polytool verify` beside the check a user writes without polytool (transformers + PEFT).

    python benchmarks/bench_verify.py [--sizes 0.26,1.08,2.0|tiny] [--limit-fraction F] [--work DIR] [--keep]
                                      [--repeat N] [--before DIR] [--skip-max-memory]

Per size, generates a Llama-shaped bfloat16 model and a Poly adapter on all 7 projections (r 8, 8 skills,
4 splits, 6 tasks), collapses task 1 into a dense bfloat16 model (`polytool collapse --to dense`), then checks
that artifact three ways, each in its own process under /usr/bin/time (wall time, peak RSS):

    peft                   from_pretrained (float32) + PeftModel, logits of 2 x 32 random tokens (task_ids 1);
                           then the dense model's logits on the same tokens: max abs and rel error
    polytool               polytool verify ADAPTER --base BASE --against DENSE --inputs 2 --seq-len 32 --json
    polytool --max-memory  the same with --max-memory LIMIT --offload-dir: LIMIT the bfloat16 size (times
                           --limit-fraction) rounded down to 0.1 GB (1 MB below that): the float32 model does not fit

With --before DIR each polytool route runs a second time from another source tree (e.g. `git worktree add DIR
<commit>`): before and after in one run. --repeat N runs every route N times, interleaved. Prints a JSON line
per run, then a table with each run's peak RSS over the float32 model's size and
polytool's time and RSS over the PEFT route's. Reuses the models in --work; deletes them unless --keep.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import PROJ, llama_tensors, measure, tree_env, write_adapter, write_base  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
POLYTOOL = str(Path(sys.executable).parent / "polytool")
SIZES = {"tiny": (256, 512, 1000, 2), "0.26": (1024, 2816, 32000, 4), "1.08": (2048, 5632, 32000, 8),
         "2.0": (2048, 5632, 32000, 17)}  # hidden, intermediate, vocab, layers
R, SKILLS, SPLITS, TASKS, TASK, N_INPUTS, SEQ_LEN = 8, 8, 4, 6, 1, 2, 32
PEFT_ROUTE = """
import gc, json, sys, torch, transformers as tf
from peft import PeftModel
adapter, base, dense, task, n, seq_len = sys.argv[1:]
n, seq_len = int(n), int(seq_len)
model = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
ids = torch.randint(0, model.config.vocab_size, (n, seq_len), generator=torch.Generator().manual_seed(0))  # as polytool
with torch.no_grad():
    routed = model(input_ids=ids, task_ids=torch.full((n,), int(task)), use_cache=False).logits
    del model
    gc.collect()
    dense = tf.AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    err = float((dense(input_ids=ids, use_cache=False).logits - routed).abs().max())
print(json.dumps({"max_abs_err": err, "max_rel_err": err / float(routed.abs().max())}))
"""


def timed(cmd: list[str], work: Path, env: dict | None = None) -> dict:
    """Exit code, wall seconds, peak RSS (MB) and the JSON on stdout (if any) of one command under /usr/bin/time."""
    os.sync()  # earlier runs' writeback must not land on this one
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(work / "time.txt"), *cmd], capture_output=True,
                          text=True, env=None if env is None else {**os.environ, **env})
    elapsed = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        print(f"exit {proc.returncode}: {' '.join(cmd[:3])} ...\n{proc.stderr[-2000:]}", file=sys.stderr, flush=True)
    try:
        out = json.loads(proc.stdout)
    except json.JSONDecodeError:
        out = {}
    rss = int((work / "time.txt").read_text().split()[-1]) / 1024
    return {"exit": proc.returncode, "seconds": elapsed, "peak_rss_mb": rss, "out": out}


def limit_text(nbytes: int) -> str:
    return f"{nbytes // 10**8 / 10:.1f}GB" if nbytes >= 10**8 else f"{max(nbytes // 10**6, 1)}MB"


def bench(size: str, work: Path, fraction: float, repeat: int = 1, before: Path | None = None,
          max_memory: bool = True) -> list[dict]:
    hidden, inter, vocab, layers = SIZES[size]
    tensors = llama_tensors(hidden, inter, vocab, layers)
    nbytes = sum(int(np.prod(s)) * 2 for _, s in tensors)
    d = work / size
    base, adapter, dense = d / "base", d / "adapter", d / "dense"
    if not dense.exists():  # collapse writes atomically: a dense model means a complete base and adapter
        shutil.rmtree(d, ignore_errors=True)
        write_base(base, hidden, inter, vocab, layers, 500 * 10**6)
        write_adapter(adapter, base, tensors, PROJ, R, SKILLS, SPLITS, TASKS)
        measure([POLYTOOL, "collapse", str(adapter), "--base", str(base), "--task", str(TASK), "--to", "dense",
                 "--out", str(dense)], d / "time.txt", tree_env(ROOT))
        print(f"generated {size}: a {nbytes / 1e9:.3f} GB bfloat16 model", flush=True)
    verify = [POLYTOOL, "verify", str(adapter), "--base", str(base), "--against", str(dense),
              "--inputs", str(N_INPUTS), "--seq-len", str(SEQ_LEN), "--json"]
    limit = limit_text(int(fraction * nbytes))
    mm = verify + ["--max-memory", limit, "--offload-dir", str(d / "offload")]
    routes = {"peft": ([sys.executable, "-c", PEFT_ROUTE, str(adapter), str(base), str(dense), str(TASK),
                        str(N_INPUTS), str(SEQ_LEN)], None),
              "polytool": (verify, tree_env(ROOT)),
              "polytool before": (verify, tree_env(before)),
              f"polytool --max-memory {limit}": (mm, tree_env(ROOT)),
              f"polytool before --max-memory {limit}": (mm, tree_env(before))}
    routes = {k: v for k, v in routes.items() if (before or "before" not in k) and (max_memory or "--max" not in k)}
    runs: dict[str, list] = {route: [] for route in routes}
    for _ in range(repeat):  # interleaved: a busy machine slows every route alike
        for route, (cmd, env) in routes.items():
            shutil.rmtree(d / "offload", ignore_errors=True)  # a run starts from an empty offload directory
            r = timed(cmd, d, env)
            out = r.pop("out")
            check = out["checks"][0] if "checks" in out else out
            r = {"size": size, "bf16_gb": nbytes / 1e9, "route": route, **r, "offloaded": out.get("offloaded"),
                 **{k: check.get(k) for k in ("passed", "max_rel_err", "max_abs_err")}}
            print(json.dumps(r), flush=True)
            runs[route].append(r)
    results = []
    for route, rs in runs.items():  # the median time, the largest peak RSS
        r = dict(sorted(rs, key=lambda x: x["seconds"])[len(rs) // 2])
        r.update(peak_rss_mb=max(x["peak_rss_mb"] for x in rs), best_seconds=min(x["seconds"] for x in rs),
                 runs=len(rs), exit=max(x["exit"] for x in rs))
        results.append(r)
    return results


def table(results: list[dict]) -> None:
    """Median time (best in the column after) and largest peak RSS of each route, with the ratios the goals are
    stated in: time and RSS over the PEFT route's, RSS over the float32 model's size."""
    print(f"\n{'GB bf16':>7} {'GB f32':>6} {'route':<38} {'exit':>4} {'rel err':>9} {'median s':>8} {'best s':>7} "
          f"{'RSS MB':>7} {'RSS/f32':>7} {'time/PEFT':>9} {'RSS/PEFT':>8}")
    peft = {r["size"]: r for r in results if r["route"] == "peft"}
    for r in results:
        p, f32_mb = peft[r["size"]], 2 * r["bf16_gb"] * 1e3
        err = f"{r['max_rel_err']:.2e}" if r["max_rel_err"] is not None else "-"
        print(f"{r['bf16_gb']:>7.3f} {2 * r['bf16_gb']:>6.3f} {r['route']:<38} {r['exit']:>4} {err:>9} "
              f"{r['seconds']:>8.1f} {r['best_seconds']:>7.1f} {r['peak_rss_mb']:>7.0f} {r['peak_rss_mb'] / f32_mb:>7.2f} "
              f"{r['seconds'] / p['seconds']:>9.2f} {r['peak_rss_mb'] / p['peak_rss_mb']:>8.2f}")
    print("goals (issue 24) at 1.08 GB: polytool time/PEFT <= 0.70, RSS/f32 <= 1.30")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.26,1.08,2.0", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--limit-fraction", type=float, default=1.0, help="--max-memory as a share of the bf16 size")
    parser.add_argument("--work", type=Path, default=ROOT / "_work_bench_verify")
    parser.add_argument("--keep", action="store_true", help="keep the generated models for another run")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each route, interleaved (median reported)")
    parser.add_argument("--before", type=Path, help="another polytool source tree (e.g. a git worktree of the "
                                                   "commit before a change), run as the routes 'polytool before'")
    parser.add_argument("--skip-max-memory", action="store_true", help="leave out the --max-memory routes")
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    if unknown := set(sizes) - set(SIZES):
        parser.error(f"unknown sizes {sorted(unknown)}: choose from {', '.join(SIZES)}")
    print(__doc__.splitlines()[2].strip(), flush=True)
    results = []
    try:
        for size in sizes:
            results += bench(size, args.work, args.limit_fraction, args.repeat, args.before, not args.skip_max_memory)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    table(results)


if __name__ == "__main__":
    main()
