"""verify on correct half-precision merges of a real-size model: the gate must not cry wolf.

    python benchmarks/bench_verify_bf16.py [--size large|small] [--work DIR] [--keep]

Generates a Llama-shaped bfloat16 model (large: hidden 2048, 8 layers, 1.08 GB; every projection
targeted, r 8, 8 skills, 4 splits, 6 tasks), merges task 1 into it as bfloat16 (the base's dtype) and as
float16, and verifies each against the routed model (the bf16 one also with --max-memory 1GB); then nudges
one merged weight by two units in the last place and verifies again. Prints, per artifact: the verdict, the error beside the ideal rounding's
(the floor), the adapter's effect, top-1 agreement, KL, wall time and peak RSS. Before the floor rule,
the correct bf16 merge failed (logits rel err 1.01e-2 against a fixed rtol of 1e-2).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import PROJ, llama_tensors, measure, write_adapter, write_base  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
POLYTOOL = str(Path(sys.executable).parent / "polytool")
SIZES = {"small": (1024, 2816, 32000), "large": (2048, 5632, 32000)}
LAYERS, R, SKILLS, SPLITS, TASKS = 8, 8, 8, 4, 6


def nudge(src: Path, dst: Path, key: str) -> None:
    """A copy of the model at `src` with element [1, 2] of `key` moved by two bfloat16 ulps."""
    shutil.copytree(src, dst)
    sys.path.insert(0, str(ROOT))
    from polytool.formats.safetensors import SafetensorsFile

    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shard = dst / index["weight_map"][key]
    with SafetensorsFile(shard) as st:
        offset = st.data_start + st.entries[key]["offsets"][0]
        cols = st.shape(key)[1]
    with open(shard, "r+b") as fh:  # in place: the header and every other byte stay
        fh.seek(offset + 2 * (1 * cols + 2))
        bits = np.frombuffer(fh.read(2), np.uint16)[0]
        fh.seek(offset + 2 * (1 * cols + 2))
        fh.write(np.uint16(bits + 2).tobytes())


def verify(adapter: Path, base: Path, artifact: Path, work: Path, *extra: str) -> dict:
    report = work / "verify.json"
    cmd = [POLYTOOL, "verify", str(adapter), "--base", str(base), "--against", str(artifact), "--inputs", "2",
           "--seq-len", "32", "--json", *extra]
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(work / "time.txt"), *cmd], capture_output=True,
                          text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        raise SystemExit(f"verify failed ({proc.returncode}): {proc.stderr[-2000:]}")
    check = json.loads(proc.stdout)["checks"][0]
    report.write_text(proc.stdout)
    rss = int((work / "time.txt").read_text().split()[-1]) / 1024
    return {"exit": proc.returncode, "seconds": elapsed, "peak_rss_mb": rss, **{k: check[k] for k in (
        "passed", "max_rel_err", "rounding_floor_rel", "adapter_effect_rel", "top1_agreement", "kl_max", "reason")},
        "max_ulps": check["weights"]["max_ulps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="large", choices=list(SIZES))
    parser.add_argument("--work", type=Path, default=ROOT / "_work_verify")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    hidden, inter, vocab = SIZES[args.size]
    base, adapter, work = args.work / "base", args.work / "adapter", args.work
    results = {}
    try:
        if not base.exists():
            total = write_base(base, hidden, inter, vocab, LAYERS, 500 * 10**6)
            write_adapter(adapter, base, llama_tensors(hidden, inter, vocab, LAYERS), PROJ, R, SKILLS, SPLITS, TASKS)
            print(f"generated a {total / 1e9:.2f} GB bfloat16 model", flush=True)
        for dtype in ("bfloat16", "float16"):
            out = work / f"dense-{dtype}"
            if not out.exists():
                measure([POLYTOOL, "collapse", str(adapter), "--base", str(base), "--task", "1", "--to", "dense",
                         "--dtype", dtype, "--out", str(out)], work / "t.txt")
            results[dtype] = verify(adapter, base, out, work)
            print(dtype, json.dumps(results[dtype]), flush=True)
        results["bfloat16, --max-memory 1GB"] = verify(adapter, base, work / "dense-bfloat16", work,
                                                       "--max-memory", "1GB", "--offload-dir", str(work / "offload"))
        print("max-memory", json.dumps(results["bfloat16, --max-memory 1GB"]), flush=True)
        bad = work / "dense-bfloat16-nudged"
        if not bad.exists():
            nudge(work / "dense-bfloat16", bad, "model.layers.1.mlp.down_proj.weight")
        results["bfloat16, one weight 2 ulps off"] = verify(adapter, base, bad, work)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    print(f"\n{'artifact':<32} {'exit':>4} {'rel err':>9} {'floor':>9} {'effect':>8} {'top1':>6} {'max ulp':>8} "
          f"{'time s':>7} {'RSS MB':>7}")
    for name, r in results.items():
        print(f"{name:<32} {r['exit']:>4} {r['max_rel_err']:>9.2e} {r['rounding_floor_rel'] or 0:>9.2e} "
              f"{r['adapter_effect_rel']:>8.3f} {100 * r['top1_agreement']:>5.1f}% {r['max_ulps']:>8.3g} "
              f"{r['seconds']:>7.1f} {r['peak_rss_mb']:>7.0f}")


if __name__ == "__main__":
    main()
