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
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent

from synthetic import PROJ, llama_tensors, measure, write_adapter, write_base  # noqa: E402

HIDDEN, INTER, VOCAB = 2048, 5632, 32000
TARGETS = ("q_proj", "v_proj")
R, SKILLS, SPLITS, TASKS = 8, 4, 2, 4


def layers_for(gb: float) -> int:
    per_layer = sum(int(np.prod(s)) for n, s in llama_tensors(HIDDEN, INTER, VOCAB, 1) if n.endswith(tuple(
        f"{k}.weight" for k in PROJ))) * 2
    return max(1, round((gb * 1e9 - 2 * VOCAB * HIDDEN * 2) / per_layer))


def run_size(work: Path, gb: float, shard_bytes: int) -> dict:
    layers = layers_for(gb)
    base, out = work / "base", work / "out"
    t = time.perf_counter()
    total = write_base(base, HIDDEN, INTER, VOCAB, layers, shard_bytes)
    row = {"size_gb": round(total / 1e9, 2), "layers": layers, "shards": len(list(base.glob("*.safetensors"))),
           "generate_s": round(time.perf_counter() - t, 1)}
    polytool = str(Path(sys.executable).parent / "polytool")
    for label, adapted in (("all-layers", layers), ("8-layers", min(8, layers))):
        adapter = work / f"adapter-{label}"
        tensors = llama_tensors(HIDDEN, INTER, VOCAB, adapted)
        adapter_mb = write_adapter(adapter, base, tensors, TARGETS, R, SKILLS, SPLITS, TASKS) / 1e6
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
