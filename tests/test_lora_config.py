"""LoRA artifacts are applied as PEFT loads them: every LoraConfig field that changes what is computed is
honoured exactly (checked against PEFT's own PeftModel.from_pretrained on an adapter PEFT wrote), or
refused in one line naming it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_base

import matrix
from polytool.errors import PolytoolError
from polytool.lora import attach_lora, read_lora, swap_saved_modules
from polytool.verify.models import linear_layers

IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(5))

HONOURED = {
    "target regex": dict(target_modules=r".*\.(q_proj|v_proj)"),
    "list + exclude": dict(target_modules=["q_proj", "v_proj", "down_proj"],
                           exclude_modules=["model.layers.0.self_attn.q_proj"]),
    "layers_to_transform": dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"),
    "rank and alpha patterns": dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                                    rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 16}),
    "rslora": dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=5, use_rslora=True),
    "lora_bias": dict(target_modules=["q_proj", "down_proj"], lora_bias=True),
}


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def peft_written(tmp_path: Path, make_model, **config) -> Path:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_model(), LoraConfig(**config))
    randomize(model)
    model.save_pretrained(tmp_path / "lora")
    return tmp_path / "lora"


def peft_output(make_model, directory: Path, run) -> torch.Tensor:
    from peft import PeftModel

    return run(PeftModel.from_pretrained(make_model(), directory).eval())


def ours(make_model, directory: Path, run) -> torch.Tensor:
    base = make_model()
    lora = read_lora(directory)
    handles = attach_lora(linear_layers(base), lora)
    try:
        with swap_saved_modules(base, lora.saved):
            return run(base)
    finally:
        for h in handles:
            h.remove()


def llama():
    return build_base("llama")


def llama_logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("case", list(HONOURED))
def test_honoured_fields_equal_peft(case, tmp_path):
    directory = peft_written(tmp_path, llama, task_type="CAUSAL_LM", **HONOURED[case])
    want = peft_output(llama, directory, llama_logits)
    got = ours(llama, directory, llama_logits)
    assert rel(got, want) <= 1e-5
    assert rel(llama_logits(llama()), want) > 1e-3  # the control: the LoRA changes the output
    if "pattern" in case or case == "rslora":  # the field matters: ignoring it gives another output
        config = json.loads((directory / "adapter_config.json").read_text())
        plain = {**config, "alpha_pattern": {}, "use_rslora": False}
        wrong = tmp_path / "ignored"
        shutil.copytree(directory, wrong)
        (wrong / "adapter_config.json").write_text(json.dumps(plain))
        assert rel(ours(llama, wrong, llama_logits), want) > 1e-4


def test_modules_to_save_head_equals_peft(tmp_path):
    files = matrix.CaseFiles(matrix.CASES["bert-seq-cls"], tmp_path / "base", tmp_path / "unused")
    matrix.build_base(files.case).save_pretrained(files.base_dir)
    make = lambda: matrix.load_base(files)  # noqa: E731
    run = lambda m: matrix.run(m, files)  # noqa: E731
    directory = peft_written(tmp_path, make, task_type="SEQ_CLS", target_modules=["query", "value"])
    assert "classifier.weight" in read_lora(directory).saved  # PEFT saved the head
    want = peft_output(make, directory, run)
    assert rel(ours(make, directory, run), want) <= 1e-5
    assert rel(run(make()), want) > 1e-3


def test_conv1d_fan_in_fan_out_equals_peft(tmp_path):
    files = matrix.CaseFiles(matrix.CASES["gpt2-conv1d"], tmp_path / "base", tmp_path / "unused")
    matrix.build_base(files.case).save_pretrained(files.base_dir)
    make = lambda: matrix.load_base(files)  # noqa: E731
    run = lambda m: matrix.run(m, files)  # noqa: E731
    directory = peft_written(tmp_path, make, task_type="CAUSAL_LM", target_modules=["c_attn", "c_proj"],
                             fan_in_fan_out=True)
    want = peft_output(make, directory, run)
    assert rel(ours(make, directory, run), want) <= 1e-5 and rel(run(make()), want) > 1e-3


REFUSED = {
    "use_dora": (True, "use_dora=True"),
    "init_lora_weights": ("pissa", "init_lora_weights='pissa'"),
    "bias": ("all", "bias='all'"),
    "layer_replication": ([[0, 1]], "layer_replication=[[0, 1]]"),
    "target_modules": ("all-linear", "target_modules is 'all-linear'"),
    "trainable_token_indices": ([1, 2], "trainable_token_indices=[1, 2]"),
}


@pytest.fixture(scope="module")
def plain_lora(tmp_path_factory):
    return peft_written(tmp_path_factory.mktemp("plain"), llama, task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"])


@pytest.mark.parametrize("field", list(REFUSED))
def test_refused_fields_name_themselves(field, plain_lora, tmp_path):
    value, words = REFUSED[field]
    directory = tmp_path / "edited"
    shutil.copytree(plain_lora, directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(PolytoolError, match=words.replace("[", r"\[").replace("]", r"\]")):
        read_lora(directory)
    read_lora(plain_lora)  # the control: the unedited adapter reads


@pytest.mark.parametrize("targets, words", [(["q_proj"], "PEFT would ignore them"),
                                            (["q_proj", "v_proj", "k_proj"], "PEFT would leave it at its initial value")])
def test_tensors_and_targets_must_agree(targets, words, plain_lora, tmp_path):
    directory = tmp_path / "edited"
    shutil.copytree(plain_lora, directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "target_modules": targets}))
    with pytest.raises(PolytoolError, match=words):
        attach_lora(linear_layers(llama()), read_lora(directory))
