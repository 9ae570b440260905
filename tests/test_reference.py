"""verify's reference (polytool/reference.py) is PEFT's routed model, on every matrix architecture, and
stands on its own: it imports none of the code that writes artifacts."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import matrix
from polytool.reference import ReferenceAdapter, routed

BOUND = 1e-5
ROOT = Path(__file__).resolve().parent.parent
PRODUCT_MODULES = {"adapter", "routing", "collapse", "poly", "lora", "merge", "export", "inspect", "checkpoint"}


@pytest.fixture(scope="module")
def peft_models(matrix_case):
    cache = {}

    def get(name):
        if name not in cache:
            files = matrix_case(name)
            cache[name] = (files, matrix.peft_model(files), matrix.load_base(files))
        return cache[name]

    return get


def _set_logits(peft, fill) -> None:
    """Overwrite every router's logits of PEFT's model (row by row: `fill(logits) -> new logits`)."""
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "module_logits" in name:
                p.copy_(fill(p))


@pytest.mark.parametrize("name", list(matrix.CASES))
def test_reference_equals_peft(peft_models, name, compat_record):
    files, peft, base = peft_models(name)
    ref = ReferenceAdapter(files.adapter_dir)
    bare = matrix.run(base, files)
    errs = []
    for task in (0, 1):
        want = matrix.run(peft, files, task)
        with routed(base, ref, task):
            got = matrix.run(base, files)
        errs.append(matrix.rel_err(got, want))
        assert matrix.rel_err(got, matrix.run(peft, files, task + 1)) > 100 * BOUND  # control: another task
        assert matrix.rel_err(got, bare) > 100 * BOUND  # control: the bare base
    assert torch.equal(matrix.run(base, files), bare), "the model is restored after the block"
    assert max(errs) <= BOUND, errs
    compat_record(name, "reference", max(errs))


@pytest.mark.parametrize("spec", ["uniform", "mean"])
def test_named_specs_equal_peft_with_rewritten_logits(peft_models, spec):
    files, peft, base = peft_models("llama-mhr")
    ref = ReferenceAdapter(files.adapter_dir)
    saved = {n: p.detach().clone() for n, p in peft.named_parameters() if "module_logits" in n}
    try:
        if spec == "uniform":
            _set_logits(peft, torch.zeros_like)
        else:  # the mean of the tasks' normalised weights, as logits: normalising undoes the / 2
            q, s = files.case.n_splits, files.case.n_skills

            def mean_logits(p):
                w = torch.sigmoid(p.double()).view(p.shape[0], q, s)
                w = w / (w.sum(-1, keepdim=True) + 1e-12)
                return torch.logit(w.mean(0) / 2).flatten().expand_as(p).to(p.dtype)

            _set_logits(peft, mean_logits)
        want = matrix.run(peft, files, 0)
    finally:
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
    with routed(base, ref, spec):
        got = matrix.run(base, files)
    assert matrix.rel_err(got, want) <= BOUND
    assert matrix.rel_err(got, matrix.run(peft, files, 0)) > 100 * BOUND


def test_reference_imports_none_of_the_code_it_checks():
    tree = ast.parse((ROOT / "polytool" / "reference.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported |= {(node.module or "").split(".")[0]} | {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            imported |= {a.name.split(".")[-1] for a in node.names}
    assert not imported & PRODUCT_MODULES, imported & PRODUCT_MODULES
    assert {"errors", "torch"} <= imported  # the positive control: the scan sees imports
