"""verify --against runs the weight-space check on a thread of its own while the base loads: the same report as
run first, the forwards on torch's own thread count, the check's error first; and the CLI, run as a program
after importing torch, exits without the interpreter's teardown but with its exit code, output and handlers."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from polytool import verify as V
from polytool.cli import main
from polytool.errors import PolytoolError

ROOT = Path(__file__).resolve().parent.parent
ADAPTER, BASE = ROOT / "fixtures" / "mhr", ROOT / "fixtures" / "tiny-llama"


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("overlap") / "dense"
    res = CliRunner().invoke(main, ["collapse", str(ADAPTER), "--base", str(BASE), "--task", "1", "--to", "dense",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def options(dense: Path, **extra) -> V.VerifyOptions:
    return V.VerifyOptions(adapter_dir=ADAPTER, base_dir=BASE, against=(dense,), n_inputs=2, seq_len=8, **extra)


def test_the_overlapped_check_reports_as_the_check_run_first(dense, monkeypatch):
    """The weight check on its thread (the default) and before the load (as under --max-memory): the same report;
    the forwards run on the thread count torch had before verify."""
    threads = torch.get_num_threads()
    seen = []
    forward = V.Run.run
    monkeypatch.setattr(V.Run, "run", lambda self, *a, **k: (seen.append(torch.get_num_threads()), forward(self, *a, **k))[1])
    interval = sys.getswitchinterval()
    overlapped = V.verify(options(dense))
    assert seen and set(seen) == {threads} and torch.get_num_threads() == threads
    assert sys.getswitchinterval() == interval  # shortened while the check ran beside the load, then restored
    first = []
    real = V._weight_checks
    monkeypatch.setattr(V, "_weight_checks", lambda *a: (first.append(1), real(*a))[1])
    monkeypatch.setattr(V, "ThreadPoolExecutor", _Inline)  # the check runs here, before the load
    assert V.verify(options(dense)) == overlapped
    assert first and overlapped["passed"] and overlapped["checks"][0]["weights"]["merged"] > 0


class _Inline:
    """An executor that runs what it is given at once, in this thread."""

    def __init__(self, *args):
        pass

    def submit(self, fn, *args):
        from concurrent.futures import Future

        future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)
        return future

    def shutdown(self, wait=True):
        pass


def test_the_checks_error_comes_first(dense, monkeypatch):
    """The weight check fails and so does the load: the check's error is the one raised, as when it ran first."""
    import polytool.verify.weights as W

    def broken(*args, **kwargs):
        raise PolytoolError("weights: broken on purpose")

    def no_load(*args, **kwargs):
        raise PolytoolError("load: broken on purpose")

    monkeypatch.setattr(W, "check_dense_weights", broken)
    monkeypatch.setattr(V, "Run", no_load)
    with pytest.raises(PolytoolError, match="weights: broken on purpose"):
        V.verify(options(dense))


def test_errors_keep_the_order_of_the_steps(dense, monkeypatch):
    """The check starts before the config is read, but a broken config is still the error reported, whether the
    artifact's recognition or its weight check fail as well."""
    import polytool.verify.weights as W

    def broken(what):
        def fail(*args, **kwargs):
            raise PolytoolError(f"{what}: broken on purpose")
        return fail

    monkeypatch.setattr(V, "base_config", broken("config"))
    monkeypatch.setattr(W, "check_dense_weights", broken("weights"))
    with pytest.raises(PolytoolError, match="config: broken on purpose"):
        V.verify(options(dense))
    monkeypatch.setattr(V, "artifact_targets", broken("artifact"))
    with pytest.raises(PolytoolError, match="config: broken on purpose"):
        V.verify(options(dense))


@pytest.mark.parametrize("args, code, out", [(["--version"], 0, "polytool, version"),
                                             (["verify", "/nonexistent", "--json"], 2, '"exit_code": 2')])
def test_a_program_that_imported_torch_exits_fast_with_its_code(args, code, out):
    script = ("import atexit, sys, torch\n"
              "atexit.register(lambda: print('handler ran', file=sys.stderr))\n"
              f"sys.argv = ['polytool', *{args!r}]\n"
              "from polytool.cli import main\n"
              "main(prog_name='polytool')\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == code and out in res.stdout and "handler ran" in res.stderr, res
