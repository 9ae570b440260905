"""The gate's import graph: what each module of polytool/verify/ may take from the rest of polytool.

verify's verdicts come from its own reference (reference.py), its own task-spec parser (artifacts.py, via the
reference) and the official libraries; the product's math (core/), writers (collapse/, merge/) and parsers
never reach it, except in product.py, which *is* the product path the self-check runs on purpose. What it
still shares with the product is listed here, each with its reason (docs/ci.md, "What verify takes from you"),
so a new shared import fails this test until someone decides it is sound."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

VERIFY = Path(__file__).resolve().parent.parent / "polytool" / "verify"
# facts and file formats: constants and parsers of what the files say, no math of the paths verify checks
FORMAT_FACTS = {"errors", "architectures", "core.units", "formats.adapter_dir", "formats.jsonfile", "formats.provenance"}
SHARED = {  # module -> the product modules it may import beyond FORMAT_FACTS, and why (docs/ci.md)
    "__init__": {"formats.adapter", "formats.base", "extras"},  # the adapter validated on input; the base
    # located; the garbage collector paused around the imports (extras.collector_paused: no value of a verdict)
    "artifacts": {"formats.adapter", "formats.base", "formats.lora"},  # LoRA artifacts read (values checked by
    # the forward against the reference), the dense artifact's shards listed
    "run": {"formats.adapter", "formats.base"},  # which checkpoint key holds each adapted weight
    "swap": {"collapse.fit", "formats.base", "formats.safetensors"},  # artifact weights read into the model
    "weights": {"collapse.fit", "formats.adapter", "formats.base", "formats.safetensors"},  # headers, chunks
    "models": {"formats.base", "formats.safetensors"},  # the stored dtypes of a directory
    "lora_apply": {"formats.lora", "poly.layer"},  # the validated LoRA; a layer's in/out features
    "gguf": {"collapse.fit", "collapse.gguf", "formats.adapter", "formats.base", "formats.gguf"},  # GGUF names
    "product": {"core.collapse", "core.taskspec", "formats.adapter", "formats.lora"},  # the product, on purpose
}
PRODUCT_MATH = {"core.collapse", "core.routing", "core.taskspec", "core.merge_methods", "core.lowrank",
                "collapse.lora", "collapse.dense", "collapse.command", "merge", "inspect", "check", "cli"}


def product_imports(file: Path) -> set[str]:
    """The polytool modules (relative to polytool/, e.g. 'formats.base') a verify module imports."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level >= 2:
            found.add(node.module or "")  # `from ..x.y import`: polytool.x.y
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("polytool."):
            found.add(node.module.removeprefix("polytool."))
    return found


@pytest.mark.parametrize("file", sorted(VERIFY.glob("*.py")), ids=lambda f: f.stem)
def test_verify_imports_only_what_is_listed(file):
    got = product_imports(file)
    allowed = FORMAT_FACTS | SHARED.get(file.stem, set())
    assert got <= allowed, f"{file.name} imports {sorted(got - allowed)}: the gate must not share the product's code"
    if file.stem != "product":
        assert not {m for m in got if m.split(".")[0] in PRODUCT_MATH or m in PRODUCT_MATH}


def test_the_scan_sees_imports():
    """The positive control: the self-check's product side imports the collapse formula, and the scan sees it."""
    assert "core.collapse" in product_imports(VERIFY / "product.py")
    assert product_imports(VERIFY / "reference.py") == {"errors"}
    # the merge recipe and the rank-optimality proof: verify's own math, none of merge/, merge_methods, lowrank
    assert product_imports(VERIFY / "reference_merge.py") == {"errors"}
    assert product_imports(VERIFY / "truncation.py") == {"errors"}
