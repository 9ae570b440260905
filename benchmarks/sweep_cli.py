"""polytool's CLI on one family: inspect, collapse to LoRA and dense, verify against both.

Each command runs through Click in this (already separate, per-family) process, so its exit code, its stderr
and any traceback are what a shell would see, without importing torch again for every command; with
SWEEP_CLI=subprocess (sweep.py --cli subprocess) each runs as `python -m polytool ...` instead (slower).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from sweep_family import Outcome


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `polytool ARGS`; a traceback (exception escaping Click) is a failure."""
    import traceback

    if os.environ.get("SWEEP_CLI") == "subprocess":
        done = subprocess.run([sys.executable, "-m", "polytool", *args], capture_output=True, text=True)
        if "Traceback (most recent call last)" in done.stderr:
            raise Outcome("polytool-fails", f"`polytool {' '.join(_short(args))}`: traceback: "
                          f"{done.stderr.strip().splitlines()[-1][:240]}", traceback=done.stderr[-2000:])
        return done.returncode, done.stdout, done.stderr

    from click.testing import CliRunner

    from polytool.cli import main

    res = CliRunner().invoke(main, args)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        tb = "".join(traceback.format_exception(*res.exc_info))
        raise Outcome("polytool-fails", f"`polytool {' '.join(_short(args))}`: traceback: "
                      f"{type(res.exception).__name__}: {res.exception}"[:300], traceback=tb[-2000:])
    return res.exit_code, res.stdout, res.stderr


def _short(args: list[str]) -> list[str]:
    return [Path(a).name if "/" in a else a for a in args]


def step(args: list[str]) -> str:
    code, out, err = run_cli(args)
    if code != 0:
        last = re.sub(r"/\S*/(base|adapter|lora|dense)\b", r"\1", (err.strip().splitlines() or [""])[-1])
        reason = f"`polytool {' '.join(_short(args))}` exit {code}: {last[:240]}"
        raise Outcome("polytool-fails", reason, exit_code=code)
    return out


def polytool_steps(adapter: Path, base: Path, workdir: Path) -> tuple[Path, Path]:
    """Run the four commands; the LoRA and dense directories they wrote."""
    lora, dense = workdir / "lora", workdir / "dense"
    a, b = str(adapter), str(base)
    step(["inspect", a, "--json"])
    step(["collapse", a, "--task", "1", "--to", "lora", "--base", b, "--out", str(lora), "--json"])
    step(["collapse", a, "--task", "1", "--to", "dense", "--base", b, "--out", str(dense), "--json"])
    step(["verify", a, "--base", b, "--against", str(lora), "--against", str(dense), "--inputs", "2",
          "--seq-len", "8", "--json"])
    return lora, dense
