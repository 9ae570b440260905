"""The whole zoo: every model_type of transformers' task mappings, wrapped with PEFT's Poly, through polytool.

    python benchmarks/sweep.py [--mapping causal-lm,...] [--only TYPE,...] [--jobs N] [--results FILE]
                               [--rerun STATUS,...] [--timeout S] [--limit N] [--cli subprocess]

Each family runs in its own process (forked from this one after the imports, so torch, transformers and PEFT
are imported once), under a memory cap and a timeout, so one bad family cannot stall the sweep; the process
lowers its priority to nice 15. Results are kept per family in the results JSON (default
benchmarks/sweep_results.json), written after each family: a rerun skips the families already there unless
--rerun names their status (e.g. --rerun polytool-fails,sweep-error) or --only names them. Families run
round-robin over the mappings, so a partial sweep covers each. `python docs/gen_compat.py --sweep FILE`
renders docs/compatibility.md from the results. The steps of one family: sweep_family.py.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from sweep_family import MAPPINGS, families, run_family  # noqa: E402

DEFAULT_RESULTS = HERE / "sweep_results.json"
MEMORY_CAP = 6 << 30  # bytes of address space a family may add to what the forked process holds


def queue(mappings: list[str], only: set[str] | None) -> list[tuple[str, str]]:
    """(mapping, model_type) pairs, round-robin over the mappings (each sorted by model_type)."""
    lists = [[(m, t) for t in sorted(families(m)) if only is None or t in only] for m in mappings]
    out = []
    for i in range(max((len(x) for x in lists), default=0)):
        out += [x[i] for x in lists if i < len(x)]
    return out


def _child(mapping: str, model_type: str, scratch: Path, out_file: Path) -> None:
    """In the forked process: cap memory, quiet the output into a log, run the family, write its result."""
    import torch

    torch.set_num_threads(1)
    vm = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (vm + MEMORY_CAP, vm + MEMORY_CAP))
    log = os.open(str(out_file.with_suffix(".log")), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    result = run_family(mapping, model_type, scratch)
    out_file.write_text(json.dumps(result), encoding="utf-8")


def start(mapping: str, model_type: str, tmp: Path) -> tuple[int, Path, float]:
    scratch = Path(tempfile.mkdtemp(prefix=f"{mapping}-{model_type}-", dir=tmp))
    out_file = scratch / "result.json"
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            _child(mapping, model_type, scratch, out_file)
        except BaseException:
            code = 1
        os._exit(code)
    return pid, out_file, time.monotonic()


def collect(key: tuple[str, str], out_file: Path, status: int | None, seconds: float) -> dict:
    """The child's result, or what its end says (killed at the timeout, out of memory, crashed)."""
    mapping, model_type = key
    if out_file.is_file():
        return json.loads(out_file.read_text(encoding="utf-8"))
    log = out_file.with_suffix(".log")
    tail = (log.read_text(errors="replace").strip().splitlines() or [""])[-1][:200] if log.is_file() else ""
    if status is None:
        why = f"timed out after {seconds:.0f} s"
    elif os.WIFSIGNALED(status):
        why = f"killed by signal {os.WTERMSIG(status)} (memory cap {MEMORY_CAP >> 30} GiB?): {tail}"
    else:
        why = f"the family's process exited {os.WEXITSTATUS(status)} without a result: {tail}"
    return {"mapping": mapping, "model_type": model_type, "status": "sweep-error", "reason": why,
            "seconds": round(seconds, 1)}


def load(path: Path) -> dict:
    """The families already run: {"MAPPING:TYPE": result} (the file also holds "meta": versions and date)."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data.get("families", data)


def meta() -> dict:
    import datetime

    import peft
    import torch
    import transformers

    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__,
            "python": sys.version.split()[0]}


def save(results: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    data = {"meta": meta(), "families": dict(sorted(results.items()))}
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def sweep(todo: list[tuple[str, str]], results: dict, path: Path, jobs: int, timeout: float) -> None:
    """Run `todo` with at most `jobs` families at once, saving after each."""
    import shutil

    tmp = Path(tempfile.mkdtemp(prefix="polytool-sweep-"))
    running: dict[int, tuple[tuple[str, str], Path, float]] = {}
    done = 0
    while todo or running:
        while todo and len(running) < jobs:
            key = todo.pop(0)
            pid, out_file, t0 = start(*key, tmp)
            running[pid] = (key, out_file, t0)
        time.sleep(0.2)
        for pid, (key, out_file, t0) in list(running.items()):
            waited, status = os.waitpid(pid, os.WNOHANG)
            late = time.monotonic() - t0 > timeout
            if waited == 0 and not late:
                continue
            if waited == 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = None
            del running[pid]
            result = collect(key, out_file, status, time.monotonic() - t0)
            results[f"{key[0]}:{key[1]}"] = result
            save(results, path)
            done += 1
            print(f"[{done}] {key[0]}:{key[1]} {result['status']} {result.get('reason', '')[:150]}",
                  file=sys.stderr, flush=True)
            if result["status"] in ("pass", "skipped", "peft-cannot-wrap"):
                shutil.rmtree(out_file.parent, ignore_errors=True)
    print(f"logs of the other families: {tmp}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mapping", default=",".join(MAPPINGS), help="comma-separated: " + ",".join(MAPPINGS))
    parser.add_argument("--only", help="comma-separated model_types (rerun even if done)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--rerun", default="", help="comma-separated statuses to run again")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per family")
    parser.add_argument("--limit", type=int, help="run at most this many families")
    parser.add_argument("--cli", choices=["inprocess", "subprocess"], default="inprocess",
                        help="run polytool's commands through Click in the family's process, or as "
                             "`python -m polytool` subprocesses (each imports torch again)")
    args = parser.parse_args(argv)
    os.nice(max(0, 15 - os.nice(0)))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["SWEEP_CLI"] = args.cli
    import importlib

    for module in ("torch", "peft", "transformers", "polytool.cli"):  # imported once, inherited by every fork
        importlib.import_module(module)
    importlib.import_module("transformers").logging.set_verbosity_error()
    mappings = [m for m in args.mapping.split(",") if m]
    unknown = [m for m in mappings if m not in MAPPINGS]
    if unknown:
        parser.error(f"unknown mapping {unknown}; known: {', '.join(MAPPINGS)}")
    only = set(args.only.split(",")) if args.only else None
    results = load(args.results)
    rerun = set(args.rerun.split(",")) - {""}
    todo = [k for k in queue(mappings, only) if only or f"{k[0]}:{k[1]}" not in results
            or results[f"{k[0]}:{k[1]}"]["status"] in rerun]
    todo = todo[:args.limit] if args.limit else todo
    print(f"{len(todo)} families to run, {args.jobs} at a time", file=sys.stderr)
    sweep(todo, results, args.results, args.jobs, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
