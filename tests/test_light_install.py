"""The light install: inspect, collapse (LoRA and dense), merge and check run where torch and transformers
cannot be imported; verify and the PolyModel API say which extra to install, in one line (exit 2 on the
command line). And the dependency floors pyproject.toml declares are satisfied by what this suite ran on."""
from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# torch and transformers made unimportable, as in a venv without them (`import torch` raises ImportError)
WITHOUT_TORCH = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
                 "from polytool.cli import main; main(sys.argv[1:])")


def polytool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


def test_the_core_commands_run_without_torch(tmp_path):
    steps = [
        ("inspect", "fixtures/mhr", "--json"),
        ("collapse", "fixtures/mhr", "--task", "1", "--out", tmp_path / "lora", "--json"),
        ("collapse", "fixtures/mhr", "--task", "1", "--to", "dense", "--out", tmp_path / "dense", "--json"),
        ("merge", "fixtures/mhr:1", "fixtures/poly:0", "--out", tmp_path / "merged", "--json"),
        ("merge", "fixtures/mhr:1", "fixtures/mhr:2", "--to", "dense", "--out", tmp_path / "merged-dense", "--json"),
        ("check", tmp_path / "lora", "--for", "vllm", "--json"),
    ]
    for args in steps:
        res = polytool(*args)
        assert res.returncode == 0, (args, res.stderr)
        json.loads(res.stdout)  # one JSON object
    assert (tmp_path / "dense" / "model.safetensors").is_file()


def test_verify_names_the_extra_to_install(tmp_path):
    res = polytool("verify", "fixtures/mhr", "--task", "0")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == ("error: polytool verify needs torch and transformers, not installed: "
                          "pip install 'polytool[torch]'\n")
    res = polytool("verify", "fixtures/mhr", "--json")
    assert res.returncode == 2 and json.loads(res.stdout)["error"].endswith("pip install 'polytool[torch]'")


def test_the_model_api_names_the_extra_to_install():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import polytool\n"
            "try:\n    polytool.PolyModel\n"
            "except ImportError as exc:\n    print(exc)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.stdout.strip() == "polytool.PolyModel needs torch, not installed: pip install 'polytool[torch]'"


def test_the_declared_floors_are_what_was_tested():
    """Every dependency of the core and of the torch extra is declared with a floor this environment meets
    (the floors were raised to the versions the suite runs on: transformers 4.40 lacked get_text_config)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["torch"]]
    assert {r.name for r in requirements} >= {"numpy", "safetensors", "click", "huggingface_hub", "torch", "transformers"}
    assert not {"torch", "transformers"} & {r.name for r in map(Requirement, project["dependencies"])}
    for req in requirements:
        floor = next(s.version for s in req.specifier if s.operator == ">=")
        assert req.specifier.contains(version(req.name).split("+")[0], prereleases=True), (req, version(req.name))
        assert floor, req


def test_the_collector_is_paused_around_heavy_imports_and_what_they_made_frozen(tmp_path, monkeypatch):
    """extras.collector_paused: the collector is off inside and on after; what exists is frozen only where polytool
    is the program (FREEZE) and one of FROZEN_AFTER was first imported inside (here a stand-in module), and nothing
    changes where it was off."""
    import gc
    import importlib
    import sys

    from polytool import extras

    (tmp_path / "heavy_stand_in.py").write_text("VALUE = [1]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(extras, "FROZEN_AFTER", ("heavy_stand_in",))
    monkeypatch.delitem(sys.modules, "heavy_stand_in", raising=False)
    frozen = gc.get_freeze_count()
    try:
        with extras.collector_paused():
            importlib.import_module("heavy_stand_in")
            assert not gc.isenabled()
        assert gc.isenabled() and gc.get_freeze_count() == frozen  # a library call (not FREEZE): nothing frozen
        monkeypatch.setattr(extras, "FREEZE", True)  # as the command line sets it
        with extras.collector_paused():
            pass
        assert gc.isenabled() and gc.get_freeze_count() == frozen  # nothing heavy imported: nothing frozen
        monkeypatch.delitem(sys.modules, "heavy_stand_in")
        with extras.collector_paused():
            importlib.import_module("heavy_stand_in")
        assert gc.isenabled() and gc.get_freeze_count() > frozen
        gc.unfreeze()
        gc.disable()
        monkeypatch.delitem(sys.modules, "heavy_stand_in")
        with extras.collector_paused():
            importlib.import_module("heavy_stand_in")
        assert not gc.isenabled() and gc.get_freeze_count() == 0  # off before: left as it was
    finally:
        gc.unfreeze()
        gc.enable()
