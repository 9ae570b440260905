"""verify/forked.py: verify's weight-space check runs in a forked child while the parent imports transformers;
what comes back is what the check found in the parent's place: values, errors, a dead child, a run abandoned."""
from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import polytool.verify as verify_pkg
from polytool.cli import main
from polytool.errors import CheckpointError, PolytoolError
from polytool.verify import forked
from polytool.verify.forked import Forked

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture(autouse=True)
def forks(monkeypatch):
    """These tests are of the child: a thread an earlier test left running (tqdm's monitor) would make verify
    compute here instead (forked.can_fork), which test_with_another_thread_alive_the_call_runs_here covers."""
    monkeypatch.setattr(forked, "can_fork", lambda: True)


def _pid_and(value):
    return os.getpid(), value


def _raise(exc):
    raise exc


class Odd(Exception):
    pass


def test_a_value_comes_back_from_a_child():
    pid, value = Forked(_pid_and, {"max_ulps": 0.5, "first_bad": None}).result()
    assert pid != os.getpid() and value == {"max_ulps": 0.5, "first_bad": None}


def test_errors_come_back_whole():
    with pytest.raises(CheckpointError) as err:
        Forked(_raise, CheckpointError("weight 'w' holds NaN", "/some/dir")).result()
    assert err.value.path == "/some/dir" and err.value.message == "weight 'w' holds NaN"
    with pytest.raises(RuntimeError, match="the weight-space check failed: Odd: odd"):  # a bug: not exit 2
        Forked(_raise, Odd("odd")).result()


def test_a_child_killed_is_an_error_not_a_verdict():
    parent = os.getpid()
    job = Forked(lambda: os.getpid() != parent and os.kill(os.getpid(), signal.SIGKILL))  # never this process
    assert job.pid is not None
    with pytest.raises(PolytoolError, match=r"ended without a result \(signal 9"):
        job.result()


def test_cancel_ends_a_child_that_was_not_asked():
    read, write = os.pipe()  # never written: the child would wait for ever
    try:
        job = Forked(os.read, read, 1)
        pid = job.pid
        job.cancel()
        assert job.pid is None
        with pytest.raises(ChildProcessError):  # reaped: no zombie left
            os.waitpid(pid, os.WNOHANG)
    finally:
        os.close(read)
        os.close(write)


def test_torch_works_in_a_child_after_the_parent_used_its_thread_pool():
    """The child sets torch to one thread before its first op: an OpenMP pool the parent started does not exist in
    the child, and a parallel op there would wait for it for ever."""
    torch.set_num_threads(2)
    x = torch.randn(1024, 1024)
    want = float((x @ x).sum())  # the parent's pool at work
    got = Forked(lambda: float((x @ x).sum())).result()
    assert got == pytest.approx(want, rel=1e-4)


def test_child_false_runs_here_when_asked():
    """verify keeps a merge recipe's check here: the reference it builds serves the forwards too."""
    job = Forked(_pid_and, 5, child=False)
    assert job.pid is None and job.result() == (os.getpid(), 5)


def test_with_another_thread_alive_the_call_runs_here(monkeypatch):
    monkeypatch.undo()  # the real can_fork
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        assert not forked.can_fork()
        job = Forked(_pid_and, 3)
        assert job.pid is None and job.result() == (os.getpid(), 3)
    finally:
        release.set()
        other.join()
    assert threading.active_count() > 1 or forked.can_fork()


def _verify(*args) -> tuple[int, dict]:
    res = CliRunner().invoke(main, ["verify", *[str(a) for a in args], "--json"])
    return res.exit_code, json.loads(res.stdout)


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory):
    """The MHR fixture's task 2 as a dense model, and a copy with one untouched tensor scaled (only the weight
    check sees it)."""
    from safetensors.torch import load_file, save_file

    from polytool.formats.safetensors import SafetensorsFile

    root = tmp_path_factory.mktemp("forked")
    good, bad = root / "dense", root / "bad"
    res = CliRunner().invoke(main, ["collapse", str(FIXTURES / "mhr"), "--task", "2", "--to", "dense", "--out", str(good)])
    assert res.exit_code == 0, res.output
    bad.mkdir()
    for f in good.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(bad / "model.safetensors")
    with SafetensorsFile(bad / "model.safetensors") as st:
        metadata = dict(st.metadata)
    tensors["model.norm.weight"].mul_(1.001)
    save_file(tensors, bad / "model.safetensors", metadata=metadata)
    return good, bad


def test_verify_reports_the_same_found_in_a_child_or_here(corrupted, monkeypatch, tmp_path):
    """The weight check ran in a child (its pid is not ours), and its findings are those of the check run in this
    process: a good artifact passes, the corrupted tensor is named, with the same figures."""
    good, bad = corrupted
    pids = tmp_path / "pids"
    checks = verify_pkg._weight_checks

    def spy(*args):
        with open(pids, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        return checks(*args)

    monkeypatch.setattr(verify_pkg, "_weight_checks", spy)
    forked_runs = [_verify(FIXTURES / "mhr", "--against", d) for d in (good, bad)]
    assert {int(p) for p in pids.read_text().split()} - {os.getpid()} and str(os.getpid()) not in pids.read_text().split()
    monkeypatch.setattr(forked, "can_fork", lambda: False)  # (the fixture made it True)
    here_runs = [_verify(FIXTURES / "mhr", "--against", d) for d in (good, bad)]
    assert pids.read_text().split()[-1] == str(os.getpid())
    assert [code for code, _ in forked_runs] == [code for code, _ in here_runs] == [0, 1]
    for (_, a), (_, b) in zip(forked_runs, here_runs):
        assert a["checks"][0]["weights"] == b["checks"][0]["weights"]
    assert forked_runs[1][1]["checks"][0]["weights"]["first_bad"] == "model.norm.weight"
