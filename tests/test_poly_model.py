"""polytool's PolyModel against PEFT 0.21: eval forward, task ids, files both ways, config, errors."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import build_base, randomize_poly
from safetensors import safe_open
from torch import nn

from polytool import PolyConfig, PolyModel, get_poly_model
from polytool.poly.config import DEFAULT_TARGET_MODULES
from polytool.poly.layer import PolyLayer

IDS = torch.arange(3 * 7).reshape(3, 7) % 96  # (batch 3, seq 7), no padding
MIXED = torch.tensor([2, 0, 1])  # every row another task

# (kind, r, n_splits, targets): odd ranks, Poly and MHR, attention and MLP targets, decoders and an encoder
SHAPES = [
    ("llama", 3, 1, None),
    ("llama", 5, 4, ("gate_proj", "up_proj", "o_proj")),
    ("qwen2", 3, 2, None),
    ("bert", 5, 2, ("query", "value", "output.dense")),  # not pooler.dense: PEFT needs 3-D inputs
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def out(model, task_ids=None, ids=IDS, **kw):
    with torch.no_grad():
        result = model(input_ids=ids, task_ids=task_ids, **kw) if task_ids is not None else model(input_ids=ids, **kw)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def peft_model(kind, adapter_dir, **kw):
    from peft import PeftModel

    return PeftModel.from_pretrained(build_base(kind), adapter_dir, **kw).eval()


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"{s[0]}-r{s[1]}-q{s[2]}")
def pair(request, make_peft_adapter):
    """(polytool model, PEFT model, adapter dir) on the same PEFT-made adapter."""
    kind, r, q, targets = request.param
    adapter_dir, _ = make_peft_adapter(kind, r=r, n_splits=q, targets=targets)
    ours = PolyModel.from_pretrained(build_base(kind), adapter_dir)
    return ours, peft_model(kind, adapter_dir), adapter_dir


def test_eval_forward_equals_peft_on_mixed_tasks(pair):
    ours, peft, _ = pair
    got, want = out(ours, MIXED), out(peft, MIXED)
    assert rel(got, want) <= 1e-5
    with ours.disable_adapter():
        bare = out(ours, MIXED)
    assert rel(got, bare) > 1e-3  # the adapter visibly changes the output
    assert rel(out(ours, torch.tensor([0, 1, 2])), got) > 1e-3  # other tasks, other outputs


def test_one_task_for_all_rows_int_list_tensor(pair):
    ours, peft, _ = pair
    want = out(peft, torch.tensor([1, 1, 1]))
    for ids in (1, [1], torch.tensor([1]), torch.tensor(1), torch.tensor([1, 1, 1])):
        assert rel(out(ours, ids), want) <= 1e-5
    assert rel(out(ours, 0), want) > 1e-3


def test_each_row_equals_its_task_alone(pair):
    ours, _, _ = pair
    batch = out(ours, MIXED)
    for row, task in enumerate(MIXED.tolist()):
        assert rel(batch[row], out(ours, task, ids=IDS[row : row + 1])[0]) <= 1e-5


def test_any_input_rank(small):
    layer = small.model.model.layers[0].self_attn.q_proj.eval()
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        want = layer(x, task_ids=torch.tensor([2, 1]))
        assert torch.allclose(layer(x.reshape(2, 2, 3, 32), task_ids=torch.tensor([2, 1])), want.reshape(2, 2, 3, 32))
        assert torch.allclose(layer(x[:, 0], task_ids=torch.tensor([2, 1])), want[:, 0])
        assert torch.allclose(layer(x[0, 0], task_ids=2), want[0, 0])


def test_peft_adapter_resaved_by_polytool_is_the_same_file(pair, tmp_path):
    ours, _, adapter_dir = pair
    ours.save_pretrained(tmp_path)
    theirs = json.loads((adapter_dir / "adapter_config.json").read_text())
    mine = json.loads((tmp_path / "adapter_config.json").read_text())
    theirs["target_modules"] = sorted(theirs["target_modules"])  # PEFT writes a set: order is arbitrary
    assert mine == theirs
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as a, \
            safe_open(tmp_path / "adapter_model.safetensors", "pt") as b:
        assert b.metadata() == a.metadata() == {"format": "pt"}
        assert sorted(b.keys()) == sorted(a.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_polytool_save_loads_in_peft(tmp_path):
    model = get_poly_model(build_base("qwen2"), PolyConfig(r=3, n_tasks=4, n_splits=2, task_type="CAUSAL_LM",
                                                           target_modules=["k_proj", "down_proj"]))
    randomize_poly(model, seed=4)
    model.eval().save_pretrained(tmp_path)
    assert rel(out(peft_model("qwen2", tmp_path), torch.tensor([3, 0, 2])), out(model, torch.tensor([3, 0, 2]))) <= 1e-5


def test_config_file_is_byte_identical_to_peft(tmp_path):
    from peft import PolyConfig as PeftPolyConfig
    from peft import get_peft_model

    kw = dict(r=5, n_tasks=2, n_skills=3, n_splits=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    get_peft_model(build_base("llama"), PeftPolyConfig(**kw)).save_pretrained(tmp_path / "peft")
    get_poly_model(build_base("llama"), PolyConfig(**kw)).save_pretrained(tmp_path / "ours")
    name = "adapter_config.json"
    assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "peft" / name).read_bytes()
    # without task_type PEFT records the base class in auto_mapping; so do we
    get_peft_model(build_base("bert"), PeftPolyConfig(r=2)).save_pretrained(tmp_path / "peft2")
    get_poly_model(build_base("bert"), PolyConfig(r=2)).save_pretrained(tmp_path / "ours2")
    theirs = json.loads((tmp_path / "peft2" / name).read_text())
    theirs["target_modules"] = sorted(theirs["target_modules"])  # a set in PEFT: order varies by run
    assert json.loads((tmp_path / "ours2" / name).read_text()) == theirs
    assert theirs["auto_mapping"] == {"base_model_class": "BertModel",
                                      "parent_library": "transformers.models.bert.modeling_bert"}


def test_named_adapter_subfolders_both_ways(tmp_path):
    from peft import PolyConfig as PeftPolyConfig
    from peft import get_peft_model

    cfg = dict(r=3, n_tasks=3, n_splits=2, target_modules=["v_proj", "up_proj"], task_type="CAUSAL_LM")
    ours = get_poly_model(build_base("llama"), PolyConfig(**cfg))
    ours.add_adapter("other", PolyConfig(**{**cfg, "r": 5}))
    randomize_poly(ours, seed=7)
    ours.eval().save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "other" / "adapter_config.json").is_file()
    ours.set_adapter("other")
    assert ours.active_adapter == "other"
    assert rel(out(peft_model("llama", tmp_path / "ours" / "other"), MIXED), out(ours, MIXED)) <= 1e-5

    theirs = get_peft_model(build_base("llama"), PeftPolyConfig(**cfg), adapter_name="other")
    randomize_poly(theirs, seed=8)
    theirs.eval().save_pretrained(tmp_path / "peft")
    assert not (tmp_path / "peft" / "adapter_config.json").exists()
    loaded = PolyModel.from_pretrained(build_base("llama"), tmp_path / "peft", adapter_name="other")
    assert loaded.active_adapter == "other"
    assert rel(out(loaded, MIXED), out(theirs, MIXED)) <= 1e-5


def test_added_adapter_stays_inactive_until_set():
    model = get_poly_model(build_base("llama"), PolyConfig(r=2, n_tasks=3, target_modules=["q_proj"]))
    randomize_poly(model)
    before = out(model, MIXED)
    model.add_adapter("other", PolyConfig(r=3, n_tasks=3, target_modules=["k_proj", "q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".other" in name:
                p.normal_()
    assert model.active_adapter == "default" and torch.equal(out(model, MIXED), before)  # k_proj: bare base
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".other" in n)
    model.set_adapter("other")
    assert rel(out(model, MIXED), before) > 1e-3
    assert all(p.requires_grad == (".other" in n) for n, p in model.named_parameters() if "poly_" in n)


def test_seeded_init_and_trainable_set_match_peft():
    from peft import PolyConfig as PeftPolyConfig
    from peft import get_peft_model

    kw = dict(r=3, n_tasks=2, n_splits=2, init_weights=False, target_modules=["q_proj", "down_proj"])
    bases = build_base("llama"), build_base("llama")
    torch.manual_seed(11)
    theirs = dict(get_peft_model(bases[0], PeftPolyConfig(**kw)).named_parameters())
    torch.manual_seed(11)
    ours = get_poly_model(bases[1], PolyConfig(**kw))
    mine = dict(ours.named_parameters())
    trainable = {k for k, p in theirs.items() if p.requires_grad}
    assert {"base_model." + k for k, p in mine.items() if p.requires_grad} == trainable
    assert all(torch.equal(p, theirs["base_model." + k]) for k, p in mine.items())
    assert mine["model.model.layers.0.self_attn.q_proj.poly_lora_B.default"].abs().sum() > 0


def test_default_targets_as_peft():
    from peft import PolyConfig as PeftPolyConfig
    from peft import get_peft_model
    from peft.utils import TRANSFORMERS_MODELS_TO_POLY_TARGET_MODULES_MAPPING as PEFT_TABLE

    assert all(PEFT_TABLE[kind] == targets for kind, targets in DEFAULT_TARGET_MODULES.items())
    for kind in ("llama", "bert", "t5"):
        theirs = get_peft_model(build_base(kind), PeftPolyConfig(r=2))
        ours = get_poly_model(build_base(kind), PolyConfig(r=2))
        assert ours.peft_config["default"].target_modules == sorted(theirs.peft_config["default"].target_modules)


def test_regex_targets_and_excludes_as_peft():
    from peft import PolyConfig as PeftPolyConfig
    from peft import get_peft_model

    def wrapped(model):
        return sorted(n for n, m in model.named_modules() if hasattr(m, "poly_lora_A"))

    for targets, exclude in ((r".*layers\.0\..*proj", ["k_proj"]), (["proj", "q_proj", "mlp.up_proj"], r".*\.1\..*")):
        kw = dict(r=2, target_modules=targets, exclude_modules=exclude)
        theirs = get_peft_model(build_base("llama"), PeftPolyConfig(**kw))
        ours = get_poly_model(build_base("llama"), PolyConfig(**kw))
        assert wrapped(ours.model) == wrapped(theirs.base_model.model) and wrapped(ours.model)


def test_modules_to_save_trainable_and_saved(tmp_path):
    model = get_poly_model(build_base("llama"), PolyConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                                  task_type="CAUSAL_LM"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.lm_head.weight" in trainable and "model.model.embed_tokens.weight" not in trainable
    assert not any("base_layer" in n for n in trainable)
    with torch.no_grad():
        model.model.lm_head.weight.mul_(2)
    randomize_poly(model)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert "base_model.model.lm_head.weight" in f.keys()
    loaded = PolyModel.from_pretrained(build_base("llama"), tmp_path)
    assert rel(out(loaded, 0), out(model, 0)) <= 1e-6
    assert rel(out(peft_model("llama", tmp_path), torch.tensor([0, 0, 0])), out(model, 0)) <= 1e-5


def test_wrapper_follows_model_mode_and_falls_through():
    model = get_poly_model(build_base("llama"), PolyConfig(r=2, target_modules=["q_proj"]))
    layer = model.model.model.layers[0].self_attn.q_proj
    assert not model.training and not layer.training and not layer.poly_router["default"].training
    model.train()
    assert layer.training and layer.poly_router["default"].training and model.model.training
    assert model.config.model_type == "llama" and model.device.type == "cpu"
    assert isinstance(layer, PolyLayer) and repr(layer).startswith("poly.")


def test_half_precision_base_keeps_float32_adapter():
    base = build_base("llama", dtype=torch.bfloat16)
    ours = get_poly_model(base, PolyConfig(r=3, n_tasks=3, target_modules=["q_proj"]))
    randomize_poly(ours)
    assert ours.model.model.layers[0].self_attn.q_proj.poly_lora_A["default"].dtype == torch.float32
    assert out(ours, MIXED).dtype == torch.bfloat16


# ---- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("r", 0), ("n_tasks", -1), ("n_skills", 0), ("n_splits", 0), ("r", 2.5)])
def test_bad_config_values(field, value):
    with pytest.raises(ValueError, match=f"PolyConfig.{field} must be an integer >= 1, got {value}"):
        PolyConfig(**{field: value})


def test_bad_poly_type_and_unknown_keys_warn(tmp_path):
    with pytest.raises(ValueError, match="poly_type must be 'poly', got 'mhr'"):
        PolyConfig(poly_type="mhr")
    data = {**PolyConfig(r=4).to_dict(), "foo": 1, "lora_alpha": 8}
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="ignoring unknown keys in the Poly adapter config: foo, lora_alpha"):
        assert PolyConfig.from_pretrained(tmp_path).r == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PolyConfig(r=4).save_pretrained(tmp_path)
        assert PolyConfig.from_pretrained(tmp_path) == PolyConfig(r=4)
    with pytest.raises(ValueError, match="peft_type is 'LORA', not 'POLY'"):
        PolyConfig.from_dict({"peft_type": "LORA"})


@pytest.fixture(scope="module")
def small():
    model = get_poly_model(build_base("llama"), PolyConfig(r=2, n_tasks=3, target_modules=["q_proj"]))
    randomize_poly(model)
    return model


@pytest.mark.parametrize("ids,message", [
    (3, "task id 3 is out of range: this adapter has tasks 0..2"),
    ([0, -1, 1], "task id -1 is out of range: this adapter has tasks 0..2"),
    ([0, 1], "input batch size 3 is not a multiple of the 2 task_ids given"),
    (torch.tensor([0.0]), "task_ids must be integers"),
    ([], "task_ids is empty"),
])
def test_bad_task_ids(small, ids, message):
    with pytest.raises(ValueError, match=message):
        out(small, ids)


def test_missing_task_ids(small):
    with pytest.raises(ValueError, match="task_ids is missing"):
        out(small)
    with small.disable_adapter():
        out(small)  # the bare model needs none


def test_non_divisible_features_name_the_module():
    msg = "module 'model.layers.0.mlp.down_proj': out_features 32 is not divisible by n_splits 3"
    with pytest.raises(ValueError, match=msg):
        get_poly_model(build_base("llama"), PolyConfig(n_splits=3, target_modules=["down_proj"]))


def test_unsupported_target_is_value_and_type_error():
    with pytest.raises(ValueError, match="'model.embed_tokens' has type torch.nn.modules.sparse.Embedding") as err:
        get_poly_model(build_base("llama"), PolyConfig(target_modules=["embed_tokens"]))
    assert isinstance(err.value, TypeError)


def test_unknown_model_type_and_unmatched_targets():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.config = type("Cfg", (), {"model_type": "toy"})()

    with pytest.raises(ValueError, match="no default target modules for model type 'toy': set PolyConfig.target_"):
        get_poly_model(Toy(), PolyConfig())
    with pytest.raises(ValueError, match=r"target_modules \['nope'\] match no module of the model"):
        get_poly_model(Toy(), PolyConfig(target_modules=["nope"]))
    model = get_poly_model(Toy(), PolyConfig(target_modules=["proj"]))
    with pytest.raises(ValueError, match="no adapter named 'x'; have default"):
        model.set_adapter("x")
    with pytest.raises(ValueError, match="adapter 'default' already exists"):
        model.add_adapter("default", PolyConfig(target_modules=["proj"]))
