"""verify's reference (polytool/verify/reference.py) is PEFT's routed model, on every matrix architecture, and
stands on its own: it imports none of the code that writes artifacts."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import matrix
from polytool.verify.reference import ReferenceAdapter, routed

BOUND = 1e-5
ROOT = Path(__file__).resolve().parent.parent
PRODUCT_MODULES = {"formats", "core", "collapse", "merge", "poly", "inspect", "check", "cli", "adapter", "routing", "lora",
                   "export", "checkpoint"}


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


@pytest.mark.parametrize("file, seen", [("reference.py", {"errors", "torch"}), ("reference_peft.py", {"reference", "peft"})])
def test_reference_imports_none_of_the_code_it_checks(file, seen):
    tree = ast.parse((ROOT / "polytool" / "verify" / file).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported |= {(node.module or "").split(".")[0]} | {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            imported |= {a.name.split(".")[-1] for a in node.names}
    assert not imported & PRODUCT_MODULES, imported & PRODUCT_MODULES
    assert seen <= imported  # the positive control: the scan sees imports


# ---- routing specs, mixes, and what the reference refuses ----------------------------------------


def test_routing_spec_forms():
    from polytool.errors import PolytoolError
    from polytool.verify.reference import routing_spec

    assert routing_spec(2, 4) == routing_spec("2", 4) == routing_spec({2: 5.0}, 4) == 2
    assert routing_spec(" Mean ", 4) == "mean" and routing_spec("uniform", 4) == "uniform"
    assert routing_spec("1:0.7,3:0.3", 4) == routing_spec({3: 3, 1: 7}, 4) == routing_spec([(1, 0.7), (3, 0.3)], 4)
    assert routing_spec("1,3", 4) == {1: 0.5, 3: 0.5}
    for bad in (4, -1, True, 1.5, "x", "1:-1,2:1", {1: 0.0}, "1:nan", [("a", 1)]):
        with pytest.raises(PolytoolError, match=r"^routing "):
            routing_spec(bad, 4)


def test_mix_equals_peft_with_rewritten_logits(peft_models):
    """A mix {0: 0.7, 2: 0.3}: PEFT with every router's logits set to logit((0.7 w_0 + 0.3 w_2) / 2)."""
    files, peft, base = peft_models("llama-mhr")
    q, s = files.case.n_splits, files.case.n_skills
    ref = ReferenceAdapter(files.adapter_dir)
    saved = {n: p.detach().clone() for n, p in peft.named_parameters() if "module_logits" in n}

    def mix_logits(p):
        w = torch.sigmoid(p.double()).view(p.shape[0], q, s)
        w = w / (w.sum(-1, keepdim=True) + 1e-12)  # (t, q, s)
        return torch.logit((0.7 * w[0] + 0.3 * w[2]) / 2).flatten().expand_as(p).to(p.dtype)

    try:
        _set_logits(peft, mix_logits)
        want = matrix.run(peft, files, 1)  # every row holds the mix
    finally:
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
    with routed(base, ref, "0:0.7,2:0.3"):
        got = matrix.run(base, files)
    assert matrix.rel_err(got, want) <= BOUND
    for task in (0, 2):  # control: neither task alone
        assert matrix.rel_err(got, matrix.run(peft, files, task)) > 100 * BOUND


def test_reference_blames_the_base(matrix_case):
    """A base of another size, or another architecture: one line naming the module, the model untouched."""
    import transformers as tf

    from polytool.errors import CheckpointError

    ref = ReferenceAdapter(matrix_case("llama-mhr").adapter_dir)
    tiny = tf.AutoModelForCausalLM.from_pretrained(ROOT / "fixtures" / "tiny-llama", dtype=torch.float32).eval()
    ids = torch.arange(2, 10).view(1, 8)
    with torch.no_grad():
        before = tiny(input_ids=ids).logits
    wrong_size = r"^module '.*': the adapter maps \d+ features to \d+, the model's layer has weight \[64, .*: wrong base model\?$"
    with pytest.raises(CheckpointError, match=wrong_size):
        with routed(tiny, ref, 0):
            pass
    with torch.no_grad():
        assert torch.equal(tiny(input_ids=ids).logits, before)  # no hook left behind
    bert = matrix.load_base(matrix_case("bert-feature"))
    with pytest.raises(CheckpointError, match=r"of the adapter is not in this model: wrong base model\?$"):
        with routed(bert, ref, 0):
            pass


def test_reference_reads_bin_adapters_and_refuses_bad_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYTOOL_ALLOW_PICKLE", "1")
    from safetensors.torch import load_file

    from polytool.errors import AdapterError

    src = ROOT / "fixtures" / "mhr"
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    torch.save(load_file(str(src / "adapter_model.safetensors")), binary / "adapter_model.bin")
    a, b = ReferenceAdapter(src), ReferenceAdapter(binary)
    assert a.modules == b.modules
    for m in a.modules:
        assert all(torch.equal(x, y) for x, y in zip(a.factors(m, 1), b.factors(m, 1)))
    assert not torch.equal(a.factors(a.modules[0], 1)[1], a.factors(a.modules[0], 2)[1])  # control
    (binary / "adapter_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(AdapterError, match=r"adapter_model.bin: the reference cannot load the adapter's tensors"):
        ReferenceAdapter(binary)
    (binary / "adapter_config.json").write_text('{"r": 4}')
    with pytest.raises(AdapterError, match=r"cannot read r, n_tasks, n_skills and n_splits here \(KeyError\)$"):
        ReferenceAdapter(binary)


# ---- --reference peft: PEFT's own model and loader -----------------------------------------------


@pytest.mark.parametrize("name", ["llama-mhr", "gpt2-conv1d", "bert-seq-cls", "t5-gated"])
def test_peft_reference_equals_the_reference(peft_models, name):
    """reference_peft.routed (PEFT's model, task ids by pre-hook) = polytool's reference, for a task id,
    uniform and a mix; GPT-2 through the Conv1D -> Linear swap; SEQ_CLS with its trained head."""
    from polytool.verify import reference_peft

    files, peft_std, base = peft_models(name)
    ref = ReferenceAdapter(files.adapter_dir)
    peft = reference_peft.peft_poly(matrix.load_base(files), files.adapter_dir)
    outs = {}
    for spec in (1, 2, "uniform", "0:0.5,2:0.5"):
        with reference_peft.routed(peft, spec) as model:
            outs[spec] = matrix.run(model, files)
        with routed(base, ref, spec):
            assert matrix.rel_err(outs[spec], matrix.run(base, files)) <= BOUND, spec
    assert matrix.rel_err(outs[1], matrix.run(peft_std, files, 1)) <= BOUND  # = PEFT called as users call it
    assert matrix.rel_err(outs[1], outs[2]) > 100 * BOUND  # control: another task
    assert matrix.rel_err(outs[1], matrix.run(base, files)) > 100 * BOUND  # control: the bare base


def test_peft_lora_loader_applies_a_collapsed_lora(tmp_path):
    import transformers as tf
    from click.testing import CliRunner

    from polytool.verify import reference_peft
    from polytool.cli import main

    adapter, base_dir = ROOT / "fixtures" / "mhr", ROOT / "fixtures" / "tiny-llama"
    res = CliRunner().invoke(main, ["collapse", str(adapter), "--base", str(base_dir), "--task", "1",
                                    "--out", str(tmp_path / "lora")])
    assert res.exit_code == 0, res.output

    def load():
        return tf.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = reference_peft.peft_lora(load(), tmp_path / "lora")(input_ids=ids).logits
        base, ref = load(), ReferenceAdapter(adapter)
        bare = base(input_ids=ids).logits
        with routed(base, ref, 1):
            want = base(input_ids=ids).logits
        with routed(base, ref, 2):
            other = base(input_ids=ids).logits
    assert matrix.rel_err(got, want) <= BOUND
    assert matrix.rel_err(got, other) > 100 * BOUND and matrix.rel_err(got, bare) > 100 * BOUND  # controls


def test_reference_peft_without_peft(monkeypatch):
    """Without PEFT: one line with the install hint; polytool itself imports it only when asked."""
    import importlib
    import sys

    from polytool.verify import reference_peft
    from polytool.errors import PolytoolError

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    importlib.reload(reference_peft)  # the module imports without PEFT
    for call in (reference_peft.require_peft, lambda: reference_peft.peft_poly(None, ROOT / "fixtures" / "mhr"),
                 lambda: reference_peft.peft_lora(None, ROOT / "fixtures" / "mhr")):
        with pytest.raises(PolytoolError, match=r"^--reference peft needs PEFT: pip install peft$"):
            call()
    monkeypatch.delitem(sys.modules, "peft")
    assert reference_peft.require_peft().__name__ == "peft"  # control: with PEFT it is found


def test_tied_head_in_modules_to_save_is_untied_as_peft_does(tmp_path):
    """modules_to_save=["lm_head"] on a tied Qwen2: PEFT trains a copy of the head, the input embeddings
    stay the base's. The reference must not write the trained head into the shared embedding matrix."""
    import dataclasses
    import warnings

    from peft import PolyConfig, get_peft_model

    case = dataclasses.replace(matrix.CASES["qwen2-tied-lm_head"], targets=("q_proj", "v_proj"))
    matrix.build_base(case).save_pretrained(tmp_path / "base")
    files = matrix.CaseFiles(case, tmp_path / "base", tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(matrix.load_base(files), PolyConfig(
            task_type="CAUSAL_LM", r=3, n_tasks=3, n_skills=4, n_splits=2, target_modules=list(case.targets),
            modules_to_save=["lm_head"]))
    matrix.randomize(model)
    model.save_pretrained(files.adapter_dir)
    peft, base, ref = matrix.peft_model(files), matrix.load_base(files), ReferenceAdapter(files.adapter_dir)
    assert list(ref.replaced) == ["lm_head.weight"] and not ref.embedding_layers
    bare = matrix.run(base, files)
    embeddings = base.get_input_embeddings().weight
    with routed(base, ref, 1):
        got = matrix.run(base, files)
        assert torch.equal(base.get_input_embeddings().weight, embeddings)  # untouched
    assert matrix.rel_err(got, matrix.run(peft, files, 1)) <= BOUND
    assert matrix.rel_err(got, matrix.run(peft, files, 2)) > 100 * BOUND  # control: another task
    assert base.lm_head.weight is base.get_input_embeddings().weight  # tied again after the block
    assert torch.equal(matrix.run(base, files), bare)


def test_low_rank_update_rows_are_the_delta(matrix_case):
    """verify's weight check reads the update a block of rows at a time (LowRankUpdate): each block, in both
    layouts, must be the whole delta's rows; the control, another task's update, is not."""
    files = matrix_case("llama-mhr")
    ref = ReferenceAdapter(files.adapter_dir)
    module = ref.modules[0]
    whole, update, other = ref.delta(module, 1), ref.update(module, 1), ref.update(module, 2)
    for got, want in ((update, whole), (update.T, whole.T)):
        rows = torch.cat([got[lo:lo + 5] for lo in range(0, want.shape[0], 5)])
        assert rows.dtype == torch.float64 and float((rows - want).abs().max()) <= 1e-14 * float(want.abs().max())
    assert float((other[0:5] - whole[0:5]).abs().max()) > 1e-3 * float(whole.abs().max())
