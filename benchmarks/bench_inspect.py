"""`polytool inspect --report` and `--plot` on the 39 MB benchmark adapter, beside `inspect --json`.

The adapter is bench_startup.py's (8 layers x 7 targets, hidden 1024, r 8, 8 skills, 4 splits, 6 tasks:
40.4 MB = 38.6 MiB of float32), written into a temporary directory. Each command runs as a fresh
subprocess, start-up included (Python, click, numpy, matplotlib); wall time, best of N:

    polytool inspect DIR                      (the text report: no matplotlib)
    polytool inspect DIR --plot OUT.png
    polytool inspect DIR --report OUT.html    (the issue's budget: under 2 s)

Usage: python benchmarks/bench_inspect.py [--repeat N]
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_startup import make_adapter, polytool_command  # noqa: E402


def best_of(cmd: list[str], repeat: int) -> tuple[float, float]:
    """(fastest wall time, least CPU time: user + system) of `repeat` runs of `cmd` (each must succeed;
    its output is discarded). CPU time barely moves when other processes share the cores; wall time does."""
    walls, cpus = [], []
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return min(walls), min(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per command; the best is reported")
    args = parser.parse_args()
    exe = polytool_command()
    with tempfile.TemporaryDirectory() as tmp:
        adapter, out = Path(tmp) / "adapter", Path(tmp) / "out"
        adapter.mkdir()
        out.mkdir()
        size = make_adapter(adapter)
        inspect = [exe, "inspect", str(adapter), "--force"]
        commands = {
            "inspect": inspect,
            "inspect --plot OUT.png": inspect + ["--plot", str(out / "routing.png")],
            "inspect --report OUT.html": inspect + ["--report", str(out / "report.html")],
        }
        print(f"adapter: {size / 1e6:.1f} MB ({size / 2**20:.1f} MiB); best of {args.repeat}")
        times = {name: best_of(cmd, args.repeat) for name, cmd in commands.items()}
        page = (out / "report.html").stat().st_size
    base = times["inspect"][0]
    print(f"  {'command':<28} {'wall':>7}   {'':>16} {'CPU':>7}")
    for name, (wall, cpu) in times.items():
        print(f"  {name:<28} {wall:6.3f} s   {wall / base:5.2f}x inspect  {cpu:6.3f} s")
    wall, cpu = times["inspect --report OUT.html"]
    print(f"summary: inspect --report writes a {page / 1e3:.0f} kB page in {wall:.2f} s wall, {cpu:.2f} s CPU "
          f"(start-up included; budget 2 s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
