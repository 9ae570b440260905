"""Errors a CI job can trust: an internal error is exit 3 (never 1, "mismatch"), one line, and with
--json still one JSON object on stdout; --debug works before and after the subcommand."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from polytool.cli import main

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def boom(*_args, **_kwargs):
    raise RuntimeError("something polytool did not foresee\nsecond line")


def test_internal_error_is_exit_3_and_one_line(monkeypatch):
    import polytool.inspect.report

    monkeypatch.setattr(polytool.inspect.report, "build_report", boom)
    res = CliRunner().invoke(main, ["inspect", str(FIXTURES / "mhr")])
    assert res.exit_code == 3 and res.stdout == "" and "Traceback" not in res.output
    assert res.stderr == ("internal error: RuntimeError: something polytool did not foresee "
                          "(rerun with --debug for the traceback)\n")


def test_internal_error_with_json_prints_one_object(monkeypatch):
    import polytool.inspect.report

    monkeypatch.setattr(polytool.inspect.report, "build_report", boom)
    res = CliRunner().invoke(main, ["inspect", str(FIXTURES / "mhr"), "--json"])
    assert res.exit_code == 3
    assert json.loads(res.stdout) == {"error": "RuntimeError: something polytool did not foresee (rerun with --debug "
                                               "for the traceback)", "exit_code": 3, "kind": "internal"}


def test_input_error_with_json_prints_one_object(tmp_path):
    res = CliRunner().invoke(main, ["collapse", str(tmp_path / "nothing"), "--task", "0", "--out", str(tmp_path / "o"),
                                    "--json"])
    assert res.exit_code == 2
    got = json.loads(res.stdout)
    assert got["exit_code"] == 2 and got["kind"] == "input" and "no such adapter directory" in got["error"]


@pytest.mark.parametrize("args, message", [
    (["collapse", "fixtures/mhr", "--json"], "Missing option '--task'."),
    (["check", "x", "--for", "nope", "--json"], "Invalid value for '--for'"),
    (["merge", "--json", "--out", "o"], "Missing argument 'SOURCES...'."),
    (["inspect", "fixtures/mhr", "--json", "--no-such-option"], "No such option"),
])
def test_usage_errors_with_json_print_one_object(args, message):
    """Click's usage errors too: the usual text on stderr, the error object on stdout, exit 2."""
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "Usage: " in res.stderr
    got = json.loads(res.stdout)
    assert got["exit_code"] == 2 and got["kind"] == "input" and got["error"].startswith(message)
    plain = CliRunner().invoke(main, [a for a in args if a != "--json"])
    assert plain.exit_code == 2 and plain.stdout == ""


def test_debug_before_and_after_the_subcommand(monkeypatch):
    import polytool.inspect.report

    monkeypatch.setattr(polytool.inspect.report, "build_report", boom)
    for args in (["--debug", "inspect", str(FIXTURES / "mhr")], ["inspect", str(FIXTURES / "mhr"), "--debug"],
                 ["inspect", "--debug", str(FIXTURES / "mhr")]):
        res = CliRunner().invoke(main, args)
        assert isinstance(res.exception, RuntimeError), args  # raised: the traceback shows


def test_base_that_is_a_file_says_so(tmp_path):
    res = CliRunner().invoke(main, ["collapse", str(FIXTURES / "mhr"), "--task", "0", "--to", "dense",
                                    "--base", str(FIXTURES / "tiny-llama" / "config.json"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "config.json: is a file, expected a base model directory" in res.stderr


def test_lora_without_a_base_says_what_it_did_not_check(tmp_path):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(FIXTURES / "mhr", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/not-here"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    res = CliRunner().invoke(main, ["collapse", str(adapter), "--task", "all", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "module names and shapes" in res.stderr and "pass --base DIR" in res.stderr
    assert "wrote 4 LoRAs (task-0 .. task-3)" in res.stdout and " 0.1 MB)" in res.stdout  # 4 LoRAs, 4 cards
    res = CliRunner().invoke(main, ["collapse", str(FIXTURES / "mhr"), "--task", "0", "--out", str(tmp_path / "p")])
    assert res.exit_code == 0 and "warning" not in res.stderr  # the recorded base is at hand: checked, no warning


def test_python_dash_m_polytool_runs_the_cli():
    """`python -m polytool` is the `polytool` command (the sweep and users without the script use it)."""
    import os
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "polytool", "--help"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: polytool ") and "collapse" in done.stdout
