"""Model cards (README.md) of every output kind, written through huggingface_hub's ModelCard: valid YAML
front matter whatever the base path holds, base_model as a hub id where known, the relation, the library,
the recipe, and the verify command; a dense model never carries the base's card."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub import ModelCard

from polytool.cli import main

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"


def run(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, (args, res.output)
    return res


def front_matter(readme: Path) -> dict:
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture(scope="module")
def odd_base(tmp_path_factory):
    """The tiny base under a name YAML would misread in an f-string (': ', '#', quotes), with a card of its own;
    and the mhr adapter naming it."""
    root = tmp_path_factory.mktemp("cards")
    base = root / "base: v2 #1 'q\""
    shutil.copytree(FIXTURES / "tiny-llama", base)
    (base / "README.md").write_text("---\nbase_model: meta-llama/Llama-2-7b\nlicense: other\n---\n# The base model\n")
    adapter = root / "adapter"
    shutil.copytree(FIXTURES / "mhr", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(base)}))
    return adapter, base


KINDS = {  # output -> (command line after the adapter, library_name, base_model_relation)
    "lora": (("collapse", "{a}", "--task", "1"), "peft", "adapter"),
    "lora-rank": (("collapse", "{a}", "--task", "mean", "--rank", "2"), "peft", "adapter"),
    "dense": (("collapse", "{a}", "--task", "1", "--to", "dense"), "transformers", "merge"),
    "gguf": (("collapse", "{a}", "--task", "all", "--to", "gguf"), "gguf", "adapter"),
    "merge-lora": (("merge", "{a}:0", "{a}:1"), "peft", "adapter"),
    "merge-dense": (("merge", "{a}:0", "{a}:1", "--to", "dense"), "transformers", "merge"),
}


@pytest.mark.parametrize("kind", KINDS)
def test_every_output_has_a_valid_card(odd_base, tmp_path, kind):
    pytest.importorskip("gguf") if kind == "gguf" else None
    adapter, base = odd_base
    args, library, relation = KINDS[kind]
    out = tmp_path / "out"
    run(*[a.format(a=adapter) for a in args], "--out", out)
    readme = out / "README.md"
    meta = front_matter(readme)
    card = ModelCard.load(readme)
    assert card.data.library_name == library and card.data.base_model_relation == relation
    assert "polytool" in card.data.tags and "base_model" not in meta  # a local base is no hub id
    block = meta["polytool"]
    if kind.startswith("merge"):
        recipe = block["recipe"]
        assert [s["source"] for s in recipe["sources"]] == [f"{adapter}:0", f"{adapter}:1"]
        assert recipe["method"] == "linear" and recipe["to"] == kind.split("-")[1]
    else:
        assert block["base"] == str(base) and block["source"] == str(adapter)  # the odd path, read back exactly
    text = readme.read_text()
    assert f"polytool verify {adapter}" in text and "--against" in text
    assert "The base model" not in text and "meta-llama" not in text  # never the base's own card


def test_a_dense_output_from_the_hub_names_its_base(tmp_path, monkeypatch):
    """A base resolved from the Hugging Face cache is `base_model: org/tiny` in the card."""
    cache = tmp_path / "hub"
    shutil.copytree(FIXTURES / "tiny-llama", cache / "models--org--tiny" / "snapshots" / ("a" * 40))
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    run("collapse", FIXTURES / "mhr", "--base", "org/tiny", "--task", "0", "--to", "dense", "--out", tmp_path / "d")
    card = ModelCard.load(tmp_path / "d" / "README.md")
    assert card.data.base_model == "org/tiny" and card.data.base_model_relation == "merge"


def test_a_merge_card_says_when_verify_does_not_apply(odd_base, tmp_path):
    adapter, _ = odd_base
    run("merge", f"{adapter}:0", f"{adapter}:1", "--method", "ties", "--density", "0.5", "--rank", "2",
        "--out", tmp_path / "ties")
    text = (tmp_path / "ties" / "README.md").read_text()
    assert "does not check this merge (it uses ties" in text and "polytool verify " + str(adapter) not in text


@pytest.mark.parametrize("meta", [
    {"base_model": None, "base_model_relation": "merge", "library_name": "transformers", "tags": ["polytool", "poly"],
     "polytool": {"version": "1", "source": "/a: b #c 'q\"", "task": 1, "base": None, "revision": None}},
    {"polytool": {"recipe": {"sources": [{"source": "x:0"}], "weights": [0.5, 1e-20]}}, "tags": ["a", "b", "a"],
     "base_model": "org/näme", "library_name": "peft", "base_model_relation": "adapter", "license": "other"},
    {"tags": "one", "pipeline_tag": "text-generation", "model_name": "日本", "extra": [1, 2.5, True, None]},
])
def test_cards_are_what_huggingface_hub_writes(meta):
    """render_card writes with the YAML library alone what ModelCard(ModelCardData(...)) wrote (the dense merge
    no longer imports huggingface_hub's card module): the same text, byte for byte."""
    from huggingface_hub import ModelCardData

    from polytool.formats.cards import render_card

    body = "# Title\n\nText: with `code` and --- rules\n"
    data = ModelCardData(**{k: v for k, v in meta.items() if v is not None})
    theirs = str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n", ignore_metadata_errors=True))
    assert render_card(meta, body) == theirs
