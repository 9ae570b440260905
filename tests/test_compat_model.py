"""polytool's Poly model on every architecture of the compatibility matrix (tests/matrix.py), against PEFT.

Each case's adapter was written by PEFT (GPT-2: by polytool); PolyModel.from_pretrained must compute what
PEFT's PeftModel computes (forward with one task, another task, a mixed batch; greedy generate), and the
adapter polytool saves must load back into PEFT. Negative controls: another task and the bare base differ.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import matrix
from polytool import PolyModel

BOUND = 1e-5
CASES = list(matrix.CASES)
# PEFT's warnings that are not about the adapter: its generic note on any adapter of a tied layer, and
# transformers' deprecations it triggers
BENIGN = ("a tied layer is part of the adapter", "is deprecated")


@pytest.fixture(scope="module")
def loaded(matrix_case):
    cache = {}

    def get(name):
        if name not in cache:
            files = matrix_case(name)
            cache[name] = (files, matrix.peft_model(files), PolyModel.from_pretrained(matrix.load_base(files),
                                                                                        files.adapter_dir).eval())
        return cache[name]

    return get


@pytest.mark.parametrize("name", CASES)
def test_forward_equals_peft(loaded, name, compat_record):
    files, peft, ours = loaded(name)
    errs = []
    for task in (0, 1):
        want, got = matrix.run(peft, files, task), matrix.run(ours, files, task)
        errs.append(matrix.rel_err(got, want))
        other = matrix.run(peft, files, task + 1)
        assert matrix.rel_err(got, other) > 100 * BOUND, "another task gives the same output: the test proves nothing"
    mixed = {**matrix.inputs(files), "task_ids": torch.tensor([0, 2])}
    with torch.no_grad():
        want, got = (m(**mixed)[files.case.output] for m in (peft, ours))
    errs.append(matrix.rel_err(got, want))
    with ours.disable_adapter():
        bare = matrix.run(ours, files)
    assert matrix.rel_err(bare, matrix.run(peft, files, 0)) > 100 * BOUND
    assert max(errs) <= BOUND, errs
    compat_record(name, "model_forward", max(errs))


@pytest.mark.parametrize("name", [n for n in CASES if matrix.CASES[n].generates])
def test_greedy_generate_equals_peft(loaded, name, compat_record):
    files, peft, ours = loaded(name)
    ids = matrix.inputs(files)["input_ids"][:, :4]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    outs = []
    for model in (peft, ours):
        with torch.no_grad():
            outs.append(model.generate(input_ids=ids, task_ids=torch.tensor([1, 2]), **kwargs))
    assert torch.equal(outs[0], outs[1])
    compat_record(name, "model_generate")


@pytest.mark.parametrize("name", CASES)
def test_polytool_saved_adapter_loads_in_peft(loaded, name, tmp_path):
    files, peft, ours = loaded(name)
    ours.save_pretrained(tmp_path)
    if files.case.maker == "polytool":  # PEFT cannot load Conv1D targets: the Linear-swapped copy reads it
        reloaded = matrix.peft_model(files, tmp_path)
    else:
        from peft import PeftModel

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reloaded = PeftModel.from_pretrained(matrix.load_base(files), tmp_path).eval()
        assert not [str(w.message) for w in caught if not any(b in str(w.message) for b in BENIGN)]
    assert matrix.rel_err(matrix.run(reloaded, files, 1), matrix.run(peft, files, 1)) <= BOUND
