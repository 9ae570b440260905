"""Every `polytool` command README.md and docs/*.md show that runs on the shipped fixtures, run as written:
the exit code is the one the docs give (`# exit N` beside the command, else 0), stdout carries the data
(one JSON object with --json), and an error is one line on stderr. docs/cli_snapshot.py finds the commands."""
from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from polytool.cli import main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
from cli_snapshot import DOCS, commands  # noqa: E402

# what the shipped fixtures cannot run: a base converted by llama.cpp (BASE.gguf), directories of the reader's
RUNNABLE = [c for c in commands() if "--help" not in c and not re.search(r"BASE\.gguf|\badapters?/|llama-7b", c)]


def documented_exit(command: str) -> int:
    """The exit code the docs give beside the command (`# ... exit N ...`), else 0."""
    for doc in DOCS:
        for line in doc.read_text(encoding="utf-8").splitlines():
            if command in line and "#" in line.partition(command)[2]:
                said = re.search(r"\bexit (\d)\b", line.partition(command)[2])
                if said:
                    return int(said.group(1))
    return 0


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory holding the fixtures (linked), where out/ is written: the docs' relative paths work."""
    here = tmp_path_factory.mktemp("docs-commands")
    (here / "fixtures").symlink_to(ROOT / "fixtures")
    return here


def test_the_docs_show_commands():
    assert len(RUNNABLE) >= 15, RUNNABLE


@pytest.mark.parametrize("command", RUNNABLE)
def test_doc_command_runs_as_written(command, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    res = CliRunner().invoke(main, shlex.split(command)[1:])
    assert res.exit_code == documented_exit(command), (command, res.stdout[-2000:], res.stderr[-2000:])
    assert res.stdout.strip(), command
    if "--json" in command:
        json.loads(res.stdout)
    if res.exit_code == 2:
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
