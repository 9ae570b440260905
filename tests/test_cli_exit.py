"""The CLI run as a program (the console script, `python -m polytool`) that imported torch exits without the
interpreter's teardown of torch and transformers (~1 s, docs/performance.md), with its exit code, its output
and its atexit handlers."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("args, code, out", [(["--version"], 0, "polytool, version"),
                                             (["verify", "/nonexistent", "--json"], 2, '"exit_code": 2')])
def test_a_program_that_imported_torch_exits_fast_with_its_code(args, code, out):
    """The atexit handler runs; the teardown (here: a global's finaliser, run when the interpreter clears the
    modules) does not; the output and the exit code are the command's."""
    script = ("import atexit, sys, torch\n"
              "atexit.register(lambda: print('handler ran', file=sys.stderr))\n"
              "class Finalised:\n"
              "    def __del__(self): print('teardown ran', file=sys.stderr)\n"
              "kept = Finalised()\n"
              f"sys.argv = ['polytool', *{args!r}]\n"
              "from polytool.cli import main\n"
              "main(prog_name='polytool')\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == code and out in res.stdout and "handler ran" in res.stderr, res
    assert "teardown ran" not in res.stderr, res


def test_without_torch_the_exit_is_the_interpreters():
    """Without torch (inspect, collapse) nothing changes: the teardown is short and runs."""
    script = ("import sys\n"
              "class Finalised:\n"
              "    def __del__(self): print('teardown ran', file=sys.stderr)\n"
              "kept = Finalised()\n"
              "sys.argv = ['polytool', '--version']\n"
              "from polytool.cli import main\n"
              "main(prog_name='polytool')\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and "teardown ran" in res.stderr, res
