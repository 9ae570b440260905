"""`polytool merge RECIPE.yml --out OUT`: a YAML recipe names the sources and options (as mergekit-yaml);
every merge output carries the recipe.yml that re-runs it, to the same tensors. Bad recipes are exit 2."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from polytool.cli import main
from polytool.formats.safetensors import SafetensorsFile

ROOT = Path(__file__).resolve().parents[1]
MHR, POLY, BASE = ROOT / "fixtures" / "mhr", ROOT / "fixtures" / "poly", ROOT / "fixtures" / "tiny-llama"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tensors(directory: Path) -> dict[str, np.ndarray]:
    name = "adapter_model.safetensors" if (directory / "adapter_model.safetensors").exists() else "model.safetensors"
    with SafetensorsFile(directory / name) as st:
        return {k: st.float_array(k, np.float64) for k in st.keys()}


def same(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("args", [
    (f"{MHR}:1", f"{MHR}:3", "--weights", "0.7,0.3"),
    (f"{MHR}:1", f"{POLY}:2", "--method", "ties", "--density", "0.5", "--rank", "3"),
    (f"{MHR}:1", f"{MHR}:uniform", "--to", "dense", "--base", BASE, "--dtype", "bfloat16"),
])
def test_every_output_carries_a_recipe_that_reruns_it(tmp_path, args):
    first = run("merge", *args, "--out", tmp_path / "first")
    assert first.exit_code == 0, first.output
    recipe = tmp_path / "first" / "recipe.yml"
    data = yaml.safe_load(recipe.read_text())
    assert all(Path(s["source"].rsplit(":", 1)[0]).is_absolute() and len(s["sha256"]) == 64 for s in data["sources"])
    again = run("merge", recipe, "--out", tmp_path / "again")
    assert again.exit_code == 0, again.output
    same(tmp_path / "first", tmp_path / "again")
    assert (tmp_path / "again" / "recipe.yml").is_file()


def test_a_hand_written_recipe_is_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # relative paths are read from the current directory, as on the command line
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("sources:\n- source: fixtures/mhr:1\n  weight: 0.7\n- {source: 'fixtures/mhr:3', weight: 0.3}\n"
                      "method: linear\nto: dense\n")
    assert run("merge", recipe, "--out", tmp_path / "yaml").exit_code == 0
    assert run("merge", "fixtures/mhr:1", "fixtures/mhr:3", "--weights", "0.7,0.3", "--to", "dense",
               "--out", tmp_path / "cli").exit_code == 0
    same(tmp_path / "yaml", tmp_path / "cli")
    # an option on the command line wins over the recipe's
    res = run("merge", recipe, "--to", "lora", "--out", tmp_path / "lora", "--json")
    assert res.exit_code == 0 and (tmp_path / "lora" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("text, message", [
    ("sources: [fixtures/mhr:1]\nmethods: ties\n", "unknown recipe keys methods"),
    ("method: linear\n", "the recipe names no sources"),
    ("sources: [fixtures/mhr:1]\ndensity: high\n", "recipe key density: 'high' is not a int or float"),
    ("sources: [{source: fixtures/mhr:1, weight: 1}, fixtures/mhr:2]\n", "give every recipe source a number"),
    ("sources: [{path: fixtures/mhr:1}]\n", "recipe source {'path': 'fixtures/mhr:1'}: expected DIR"),
    ("- just a list\n", "a recipe is a YAML mapping"),
    ("sources: [fixtures/mhr:1\n", "cannot read the recipe (ParserError"),
    ("sources: [fixtures/mhr:1]\nto: gguf\n", "to 'gguf', dtype 'auto': expected to lora or dense"),
    (f"sources: [{{source: 'fixtures/mhr:1', sha256: '{'0' * 64}'}}]\n", "changed since the merge"),
])
def test_bad_recipes_are_one_line(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(ROOT)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(text)
    res = run("merge", recipe, "--out", tmp_path / "out")
    assert res.exit_code == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "out").exists()
