"""Untrusted artifacts: what a crafted or mangled file cannot make polytool do (hang, accept what the
official loaders refuse). Each case has its control: the unmangled file passes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import safe_open

from polytool.cli import main

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def run(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


def run_json(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, json.loads(res.stdout)


def test_trailing_bytes_after_the_data_are_refused_as_the_safetensors_library_refuses_them(tmp_path):
    adapter = tmp_path / "mhr"
    shutil.copytree(FIXTURES / "mhr", adapter)
    assert run("inspect", adapter)[0] == 0  # control: the file as written
    with open(adapter / "adapter_model.safetensors", "ab") as fh:
        fh.write(b"\0" * 16)
    with pytest.raises(Exception):  # the official reader refuses it: polytool must not be more lenient
        with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
            list(f.keys())
    for command in (("inspect", adapter), ("collapse", adapter, "--task", 1, "--out", tmp_path / "out")):
        code, out = run(*command)
        assert code == 2 and "16 bytes after the last tensor's data" in out, out
    assert not (tmp_path / "out").exists()


def test_a_catastrophic_rank_pattern_is_refused_not_matched(tmp_path):
    lora = tmp_path / "lora"
    assert run("collapse", FIXTURES / "poly", "--task", 1, "--base", FIXTURES / "tiny-llama", "--out", lora)[0] == 0
    config = json.loads((lora / "adapter_config.json").read_text())
    assert run("merge", lora, "--out", tmp_path / "ok")[0] == 0  # control
    (lora / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"(.*)*" * 7 + "Z": 8}}))
    code, out = run("merge", lora, "--out", tmp_path / "bad")  # matched, the regex would run for hours
    assert code == 2 and "repeats a repeated group" in out, out
    (lora / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"q_proj": config["r"]}}))
    assert run("merge", lora, "--out", tmp_path / "named")[0] == 0  # a plain name still works


def _rewrite_metadata(file: Path, change) -> None:
    """Rewrite a safetensors file with its metadata changed by `change(dict)` (tensors as they are)."""
    from safetensors.numpy import load_file, save_file

    with safe_open(str(file), framework="np") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(file))
    change(meta)
    save_file(tensors, str(file), metadata=meta)


@pytest.mark.parametrize("field, value, message", [
    ("weights", None, "weights must be 2 finite numbers"),
    ("weights", ["x", 1.0], "weights must be 2 finite numbers"),
    ("sources", [5], "sources must be a non-empty list of objects"),
    ("method", 3, "method must be a name"),
])
def test_a_crafted_recipe_is_exit_2_naming_the_field(tmp_path, field, value, message):
    merged = tmp_path / "merged"
    assert run("merge", f"{FIXTURES / 'mhr'}:1", f"{FIXTURES / 'mhr'}:3", "--out", merged)[0] == 0
    assert run("verify", FIXTURES / "mhr", "--against", merged, "--inputs", 1, "--seq-len", 8)[0] == 0  # control

    def change(meta):
        recipe = json.loads(meta["polytool.recipe"])
        meta["polytool.recipe"] = json.dumps({**recipe, field: value})
    _rewrite_metadata(merged / "adapter_model.safetensors", change)
    code, out = run("verify", FIXTURES / "mhr", "--against", merged, "--inputs", 1, "--seq-len", 8)
    assert code == 2 and message in out, out


def test_an_extra_tensor_in_a_dense_artifact_is_exit_2(tmp_path):
    from safetensors.numpy import load_file, save_file

    dense = tmp_path / "dense"
    assert run("collapse", FIXTURES / "mhr", "--task", 2, "--to", "dense", "--out", dense)[0] == 0
    shard = next(dense.glob("*.safetensors"))
    with safe_open(str(shard), framework="np") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(shard))
    key = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[key.replace(".weight", ".bias")] = tensors[key][:, 0].copy()
    save_file(tensors, str(shard), metadata=meta)
    code, out = run("verify", FIXTURES / "mhr", "--against", dense, "--inputs", 1, "--seq-len", 8)
    assert code == 2 and "q_proj.bias" in out and "which the base does not have" in out, out


# ---- outputs never clobber -----------------------------------------------------------------------------


def test_the_final_rename_never_replaces_what_appeared_meanwhile(tmp_path, monkeypatch):
    """Two runs to one new --out: the one that finishes second fails in one line and leaves the first's output."""
    from polytool.formats import atomic

    out = tmp_path / "out"
    fsync_tree = atomic.fsync_tree

    def other_run_finishes_first(root):  # called just before the final rename
        fsync_tree(root)
        out.mkdir()
        (out / "adapter_model.safetensors").write_bytes(b"the other run's")
    monkeypatch.setattr(atomic, "fsync_tree", other_run_finishes_first)
    code, text = run("collapse", FIXTURES / "mhr", "--task", 1, "--out", out)
    assert code == 2 and "appeared while this run wrote it" in text, text
    assert (out / "adapter_model.safetensors").read_bytes() == b"the other run's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind
    monkeypatch.undo()
    assert run("collapse", FIXTURES / "mhr", "--task", 1, "--out", tmp_path / "alone")[0] == 0  # control


def test_rename_noreplace_refuses_even_an_empty_directory(tmp_path):
    from polytool.formats.atomic import _rename_noreplace

    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()  # os.rename would silently replace an empty directory
    with pytest.raises(FileExistsError):
        _rename_noreplace(tmp_path / "src", tmp_path / "dst")
    _rename_noreplace(tmp_path / "src", tmp_path / "new")  # control
    assert (tmp_path / "new").is_dir() and not (tmp_path / "src").exists()


def test_force_replaces_only_what_polytool_wrote(tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("four years")
    for args in (("collapse", FIXTURES / "mhr", "--task", 1), ("merge", f"{FIXTURES / 'mhr'}:1")):
        code, text = run(*args, "--out", thesis, "--force")
        assert code == 2 and "not an output polytool wrote" in text, text
        assert (thesis / "thesis.tex").read_text() == "four years"
    lora = tmp_path / "lora"
    assert run("collapse", FIXTURES / "mhr", "--task", 1, "--out", lora)[0] == 0
    assert run("collapse", FIXTURES / "mhr", "--task", 2, "--out", lora, "--force")[0] == 0  # polytool's: replaced
    assert run("collapse", FIXTURES / "mhr", "--task", "all", "--out", lora, "--force")[0] == 0
    assert run("collapse", FIXTURES / "mhr", "--task", 0, "--out", lora, "--force")[0] == 0  # a --task all folder


# ---- the gate believes nothing the artifact says about itself -------------------------------------------


@pytest.fixture(scope="module")
def dense2(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense") / "task2"
    assert run("collapse", FIXTURES / "mhr", "--task", 2, "--to", "dense", "--out", out)[0] == 0
    return out


@pytest.mark.parametrize("field, value", [("hidden_act", "gelu"), ("rms_norm_eps", 0.5), ("rope_theta", 10.0)])
def test_a_dense_artifact_with_an_edited_config_is_loaded_as_itself_and_fails(dense2, tmp_path, field, value):
    code, text = run("verify", FIXTURES / "mhr", "--against", dense2, "--task", 2, "--inputs", 2, "--seq-len", 8)
    assert code == 0, text  # control
    edited = tmp_path / "edited"
    shutil.copytree(dense2, edited)
    config = json.loads((edited / "config.json").read_text())
    assert field in config or field == "rope_theta"
    if field == "rope_theta" and field not in config:  # transformers 5 keeps it in rope_parameters
        config["rope_parameters"] = {**config.get("rope_parameters", {}), "rope_theta": value}
    else:
        config[field] = value
    (edited / "config.json").write_text(json.dumps(config))
    code, text = run("verify", FIXTURES / "mhr", "--against", edited, "--task", 2, "--inputs", 2, "--seq-len", 8)
    assert code == 1 and "config.json differs from the base's" in text and "loaded as itself" in text, text


def test_the_recorded_task_is_checked_against_the_request(dense2, tmp_path):
    """An artifact that says it holds task 3 while the request it records (the --task the user typed) was 2."""
    edited = tmp_path / "lies"
    shutil.copytree(dense2, edited)
    for shard in edited.glob("*.safetensors"):
        _rewrite_metadata(shard, lambda meta: meta.update({"polytool.task": "3"}))
    code, text = run("verify", FIXTURES / "mhr", "--against", edited, "--inputs", 2, "--seq-len", 8)
    assert code == 1 and "its provenance says it holds task 3, but task 2 was asked" in text, text


# ---- a correct merge whose sums nearly cancel passes (issue 21: the scale false failure) ----------------


def _cancelling_base(tmp_path: Path, module: str) -> Path:
    """fixtures/tiny-llama in bfloat16, with `module`'s weight set to minus the bfloat16 rounding of task 2's
    update: every element of base + update then nearly cancels, far below the operands' magnitude."""
    import torch
    from safetensors.torch import load_file, save_file

    from polytool.verify.reference import ReferenceAdapter

    base = tmp_path / "bf16-base"
    shutil.copytree(FIXTURES / "tiny-llama", base)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(base / "model.safetensors")).items()}
    delta = ReferenceAdapter(FIXTURES / "mhr").delta(module, 2)  # (out, in), float64
    tensors[f"{module}.weight"] = (-delta).to(torch.bfloat16)
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    return base


def test_a_correct_merge_whose_sums_cancel_passes_and_a_wrong_weight_still_fails(tmp_path):
    module = "model.layers.0.self_attn.q_proj"
    base = _cancelling_base(tmp_path, module)
    dense = tmp_path / "dense"
    assert run("collapse", FIXTURES / "mhr", "--task", 2, "--to", "dense", "--base", base, "--out", dense)[0] == 0
    args = ("verify", FIXTURES / "mhr", "--base", base, "--task", 2, "--inputs", 2, "--seq-len", 8, "--json")
    code, report = run_json(*args, "--against", dense)
    weights = report["checks"][0]["weights"]
    assert weights["not_ideal"] > 0, weights  # the float32 update's error shows where the sums cancel
    assert code == 0 and weights["first_bad"] is None, weights
    # the control: one element of another weight moved by two units in the last place fails
    from safetensors.torch import load_file, save_file
    import torch

    bad = tmp_path / "bad"
    shutil.copytree(dense, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    key = "model.layers.1.self_attn.v_proj.weight"
    tensors[key].view(torch.int16).view(-1)[3] += 2
    save_file(tensors, str(bad / "model.safetensors"), metadata=dict(safe_open(str(dense / "model.safetensors"),
                                                                                 framework="pt").metadata()))
    code, report = run_json(*args, "--against", bad)
    assert code == 1 and report["checks"][0]["weights"]["first_bad"] == key


def test_a_task_all_folder_must_hold_every_task_and_serve_each_from_its_own_lora(tmp_path):
    folder = tmp_path / "all"
    assert run("collapse", FIXTURES / "mhr", "--task", "all", "--out", folder)[0] == 0
    args = ("verify", FIXTURES / "mhr", "--inputs", 1, "--seq-len", 8)
    assert run(*args, "--against", folder)[0] == 0  # control
    dropped = tmp_path / "dropped"  # task 2 taken out of the index (its LoRA zeroed): serving.json still serves it
    shutil.copytree(folder, dropped)
    index = json.loads((dropped / "polytool_tasks.json").read_text())
    del index["tasks"]["2"]
    (dropped / "polytool_tasks.json").write_text(json.dumps(index))
    code, text = run(*args, "--against", dropped)
    assert code == 2 and "task 2 is missing" in text, text
    swapped = tmp_path / "swapped"  # serving.json serves task-1 from task 3's LoRA
    shutil.copytree(folder, swapped)
    serving = (swapped / "serving.json").read_text().replace("task-1=" + str(folder.resolve() / "task-1"),
                                                            "task-1=" + str(folder.resolve() / "task-3"))
    assert serving != (swapped / "serving.json").read_text()
    (swapped / "serving.json").write_text(serving)
    code, text = run(*args, "--against", swapped)
    assert code == 2 and "serves task-1 from" in text, text


def test_the_self_check_says_what_it_covers():
    code, report = run_json("verify", FIXTURES / "mhr", "--task", 1, "--inputs", 1, "--seq-len", 8, "--json")
    assert code == 0 and "file writers" in report["covers"] and "--against" in report["covers"]
