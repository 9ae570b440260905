"""Every matrix case (tests/matrix.py) end to end through the CLI: inspect, collapse to a LoRA that PEFT
loads and to a dense model that transformers loads with the adapter's own class, and verify of each.

Bounds: relative error <= 1e-5 in float32 against PEFT's routed Poly model (matrix.peft_model), with
negative controls: another task and the bare base differ from the artifact."""
from __future__ import annotations

import json
import warnings

import pytest
from click.testing import CliRunner

import matrix
from polytool.cli import main

BOUND = 1e-5
CASES = list(matrix.CASES)
# PEFT's warnings that are not about the artifact: its note on any adapter of a tied layer (it warns for its
# own Poly adapter too), and transformers' deprecations it triggers
BENIGN = ("a tied layer is part of the adapter", "is deprecated")


def cli(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res


@pytest.fixture(scope="module")
def built(matrix_case, tmp_path_factory):
    """name -> (files, PEFT's routed model, {artifact name: path})"""
    cache = {}

    def get(name):
        if name not in cache:
            files = matrix_case(name)
            out = tmp_path_factory.mktemp(f"artifacts-{name}")
            paths = {}
            for label, extra in (("lora1", ["--task", "1"]), ("all", ["--task", "all"]),
                                 ("uniform", ["--task", "uniform"]),
                                 ("dense1", ["--task", "1", "--to", "dense"] + (["--untie"] if files.case.tied_target
                                                                                 else []))):
                res = cli("collapse", files.adapter_dir, "--base", files.base_dir, "--out", out / label, *extra)
                assert res.exit_code == 0, (label, res.output)
                paths[label] = out / label
            cache[name] = (files, matrix.peft_model(files), paths)
        return cache[name]

    return get


def peft_lora(files, directory):
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(matrix.load_base(files), directory).eval()
    return model, [str(w.message) for w in caught if not any(b in str(w.message) for b in BENIGN)]


@pytest.mark.parametrize("name", CASES)
def test_inspect_shows_every_tensor(built, name, compat_record):
    files, _, _ = built(name)
    res = cli("inspect", files.adapter_dir, "--base", files.base_dir, "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    from safetensors import safe_open

    with safe_open(files.adapter_dir / "adapter_model.safetensors", "np") as f:
        keys = set(f.keys())
    shown = {f"base_model.model.{m['name']}.{s}" for m in rep["modules"]
             for s in ("poly_lora_A", "poly_lora_B", "poly_router.module_logits")}
    shown |= {t["key"] for m in rep["saved_modules"] for t in m["tensors"]} | {e["key"] for e in rep["saved_embeddings"]}
    assert shown == keys
    assert all(e["equals_base"] is True for e in rep["saved_embeddings"])
    assert {m["layer"] for m in rep["modules"]} == {"Conv1D" if files.case.maker == "polytool" else "Linear"}
    text = cli("inspect", files.adapter_dir, "--base", files.base_dir)
    assert text.exit_code == 0 and all(m["module"] in text.stdout for m in rep["saved_modules"])
    compat_record(name, "inspect")


@pytest.mark.parametrize("name", CASES)
def test_lora_loads_in_peft_and_equals_the_routed_model(built, name, compat_record):
    files, peft, paths = built(name)
    errs = []
    for directory, task in ((paths["lora1"], 1), (paths["all"] / "task-2", 2)):
        model, warned = peft_lora(files, directory)
        assert not warned, warned
        got = matrix.run(model, files)
        errs.append(matrix.rel_err(got, matrix.run(peft, files, task)))
        assert matrix.rel_err(got, matrix.run(peft, files, (task + 1) % 3)) > 100 * BOUND  # another task differs
        with model.disable_adapter():
            assert matrix.rel_err(got, matrix.run(model, files)) > 100 * BOUND  # the bare base differs
    assert max(errs) <= BOUND, errs
    config = json.loads((paths["lora1"] / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (files.case.maker == "polytool")  # Conv1D
    compat_record(name, "lora", max(errs))


@pytest.mark.parametrize("name", CASES)
def test_dense_loads_with_its_class_and_equals_the_routed_model(built, name, compat_record):
    import transformers as tf

    files, peft, paths = built(name)
    model, info = getattr(tf, files.case.model_class).from_pretrained(paths["dense1"], output_loading_info=True)
    assert not any(info.values()), info
    got = matrix.run(model.eval(), files)
    err = matrix.rel_err(got, matrix.run(peft, files, 1))
    assert err <= BOUND
    assert matrix.rel_err(got, matrix.run(peft, files, 2)) > 100 * BOUND
    compat_record(name, "dense", err)


@pytest.mark.parametrize("name", CASES)
def test_verify_passes_every_artifact_and_the_self_check(built, name, compat_record):
    files, _, paths = built(name)
    res = cli("verify", files.adapter_dir, "--base", files.base_dir, "--inputs", 2, "--seq-len", 8, "--json",
              *[a for p in paths.values() for a in ("--against", p)])
    assert res.exit_code == 0, res.output
    checks = json.loads(res.stdout)["checks"]
    assert len(checks) == 1 + 3 + 1 + 1 and all(c["passed"] for c in checks)
    res = cli("verify", files.adapter_dir, "--base", files.base_dir, "--inputs", 2, "--seq-len", 8, "--task", "2",
              "--json")
    assert res.exit_code == 0, res.output
    checks += json.loads(res.stdout)["checks"]
    compat_record(name, "verify", max(c["max_rel_err"] for c in checks))


@pytest.mark.parametrize("name", ["llama-mhr", "gpt2-conv1d", "bert-seq-cls", "t5-gated"])
def test_verify_with_peft_as_the_reference(built, name):
    files, _, paths = built(name)
    res = cli("verify", files.adapter_dir, "--base", files.base_dir, "--inputs", 2, "--seq-len", 8, "--json",
              "--reference", "peft", "--against", paths["lora1"], "--against", paths["dense1"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert "PEFT" in report["reference"] and all(c["max_rel_err"] <= BOUND for c in report["checks"])


def test_a_tied_target_needs_untie_and_says_so(built, tmp_path):
    files, _, _ = built("qwen2-tied-lm_head")
    res = cli("collapse", files.adapter_dir, "--base", files.base_dir, "--task", "1", "--to", "dense", "--out", tmp_path / "o")
    assert res.exit_code == 2 and "Pass --untie" in res.stderr
