"""The declared lower bounds are the tested ones: every runtime dependency of pyproject.toml (the core's and
the torch, plot, gguf and auto extras') has a `>=X.Y` floor, and `.ci/floors` runs the whole suite with each
held to its floor's major.minor; in that run (POLYTOOL_FLOORS names its constraints) this checks that the
installed versions are the floors, so the suite really ran there."""
from __future__ import annotations

import os
import re
import tomllib
from importlib.metadata import version
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("torch", "plot", "gguf", "auto")


def runtime_dependencies() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + [d for e in EXTRAS for d in project["optional-dependencies"][e]]


def floors() -> dict[str, str]:
    found = {}
    for dep in runtime_dependencies():
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=(\d+\.\d+)", dep.split("#")[0].strip())
        if m:
            found[m[1]] = m[2]
    return found


def test_every_runtime_dependency_has_a_major_minor_floor():
    named = [d for d in runtime_dependencies() if not d.startswith("polytool[")]
    assert len(floors()) == len(named), [d for d in named if d.split(">=")[0] not in floors()]


def _major_minor(text: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", text).groups()
    return int(major), int(minor)


def test_installed_versions_meet_the_floors_and_equal_them_in_the_floors_run():
    """Every run: what is installed satisfies each floor. The .ci/floors run: it is the floor's major.minor,
    and its constraints are exactly the declared floors."""
    at_floors = os.environ.get("POLYTOOL_FLOORS")
    for name, floor in floors().items():
        installed = _major_minor(version(name))
        assert installed >= _major_minor(floor), (name, version(name), floor)
        if at_floors:
            assert installed == _major_minor(floor), (name, version(name), floor)
    if at_floors:
        constraints = set(Path(at_floors).read_text().split())
        assert constraints == {f"{name}=={floor}.*" for name, floor in floors().items()}
