"""verify's model load: a half-precision checkpoint is loaded in its own dtype and upcast (so the float32
model never sits beside the whole mapped checkpoint); the result must be the model transformers loads in
float32, bit for bit, on every architecture of the matrix, buffers included. The class: the task's Auto class,
or the base's own where that Auto class does not know the config."""
from __future__ import annotations

import pytest
import torch

import matrix
from polytool.verify import models


def _tensors(model) -> dict:
    found = dict(model.named_parameters(remove_duplicate=False))
    found.update(model.named_buffers(remove_duplicate=False))
    return found


def _differing(directory, class_name: str) -> list[str]:
    import transformers as tf

    ours = _tensors(models.load_model(directory, class_name, "cpu"))
    want = _tensors(getattr(tf, class_name).from_pretrained(directory, dtype=torch.float32))
    assert ours.keys() == want.keys()
    return [k for k in want if ours[k].dtype != want[k].dtype or not torch.equal(ours[k], want[k])]


@pytest.fixture(scope="module")
def half_bases(tmp_path_factory):
    """name -> a bfloat16 copy of each matrix case's base (float16 for two of them)."""
    out = {}
    for i, (name, case) in enumerate(matrix.CASES.items()):
        directory = tmp_path_factory.mktemp(f"half-{name}")
        matrix.build_base(case).to(torch.float16 if i % 6 == 0 else torch.bfloat16).save_pretrained(directory)
        out[name] = directory
    return out


@pytest.mark.parametrize("name", list(matrix.CASES))
def test_half_checkpoint_loads_as_transformers_float32(half_bases, name):
    assert models.stored_dtypes(half_bases[name]) <= {"BF16", "F16"}
    assert _differing(half_bases[name], matrix.CASES[name].model_class) == []


def test_negative_control_buffers_computed_in_half_precision_differ(half_bases, monkeypatch):
    # Gemma computes embed_scale (sqrt(hidden)) at init: built in half precision it is rounded
    monkeypatch.setattr(models, "_float32_buffers", lambda model: None)
    assert _differing(half_bases["gemma-tied"], matrix.CASES["gemma-tied"].model_class) == [
        "model.embed_tokens.embed_scale"]


@pytest.mark.parametrize("config_class,task_type,own", [
    ("MllamaTextConfig", "CAUSAL_LM", "MllamaForCausalLM"),  # AutoModelForCausalLM refuses mllama_text_model
    ("EvollaConfig", "FEATURE_EXTRACTION", "EvollaModel"),  # AutoModel refuses evolla
])
def test_class_is_the_bases_own_where_the_auto_class_refuses_its_config(config_class, task_type, own):
    import transformers as tf

    config = getattr(tf, config_class)(architectures=[own])
    assert models.model_class(task_type, config) == (own, "causal" if task_type == "CAUSAL_LM" else "encoder")
    llama = tf.LlamaConfig(architectures=["LlamaForCausalLM"])  # the control: a config the Auto class knows
    assert models.model_class("CAUSAL_LM", llama)[0] == "AutoModelForCausalLM"
