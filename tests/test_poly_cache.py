"""The Poly layer as model code uses it: base-layer attributes, an eval cache that is never stale, and
inputs whose first dimension is not the batch."""
from __future__ import annotations

import pytest
import torch
from conftest import build_base

from polytool import PolyModel
from polytool.poly.config import PolyValueError
from polytool.poly.layer import PolyLayer

IDS = torch.arange(2 * 6).reshape(2, 6) % 96


@pytest.fixture(scope="module")
def adapter_dir(make_peft_adapter):
    return make_peft_adapter("llama", r=3, n_splits=2)[0]


def fresh(adapter_dir):
    return PolyModel.from_pretrained(build_base("llama"), adapter_dir).eval()


def out(model, task=1):
    with torch.no_grad():
        return model(input_ids=IDS, task_ids=task).logits


def first_layer(model) -> PolyLayer:
    return next(m for m in model.modules() if isinstance(m, PolyLayer))


def test_layer_answers_the_base_layers_attributes(adapter_dir):
    layer = first_layer(fresh(adapter_dir))
    assert layer.weight is layer.base_layer.weight and layer.bias is layer.base_layer.bias
    assert (layer.in_features, layer.out_features) == (layer.base_layer.in_features, layer.base_layer.out_features)
    assert layer.weight.dtype == torch.float32
    with pytest.raises(AttributeError):
        layer.no_such_attribute


EDITS = {  # a write through .data moves no version counter: the documented invalidate_cache() follows it
    ".data edit": lambda m, l, sd: (l.poly_lora_B["default"].data.mul_(3), m.invalidate_cache()),
    "router .data edit": lambda m, l, sd: (l.poly_router["default"].module_logits.data.neg_(), m.invalidate_cache()),
    "load_state_dict": lambda m, l, sd: m.load_state_dict({k: v * 2 if "poly_lora_A" in k else v for k, v in sd.items()}),
    "in-place under no_grad": lambda m, l, sd: l.poly_lora_A["default"].mul_(-1),
    "replaced .data": lambda m, l, sd: setattr(l.poly_lora_B["default"], "data", l.poly_lora_B["default"].data * 0.5),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_eval_cache_follows_every_change(adapter_dir, edit):
    model = fresh(adapter_dir)
    before = out(model)  # fills the cache
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        EDITS[edit](model, first_layer(model), state)
    rebuilt = fresh(adapter_dir)
    rebuilt.load_state_dict(model.state_dict())  # the same parameters, no cache
    after = out(model)
    assert not torch.allclose(after, before), "the edit changed nothing: the test proves nothing"
    torch.testing.assert_close(after, out(rebuilt), rtol=1e-6, atol=1e-6)


def test_a_data_write_needs_the_documented_invalidation(adapter_dir):
    """The guard reads no tensor per forward: a write through .data is seen only after invalidate_cache()."""
    model = fresh(adapter_dir)
    before = out(model)
    first_layer(model).poly_lora_B["default"].data.mul_(3)
    torch.testing.assert_close(out(model), before)  # stale, as documented: the cache is not re-read
    model.invalidate_cache()
    assert not torch.allclose(out(model), before)


def test_eval_cache_follows_dtype_and_mode_changes(adapter_dir):
    model = fresh(adapter_dir)
    ref = out(model)
    model.double()
    assert out(model).dtype == torch.float64
    torch.testing.assert_close(out(model).float(), ref, rtol=1e-5, atol=1e-5)
    model.float().train()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, PolyLayer):
                layer.poly_lora_B["default"].data.zero_()
    model.eval()
    with model.disable_adapter():
        bare = out(model)
    torch.testing.assert_close(out(model), bare)  # B = 0: the update vanishes, not a stale cache


def test_set_adapter_switches_the_cached_factors(adapter_dir, make_peft_adapter):
    from polytool import PolyConfig

    model = fresh(adapter_dir)
    first = out(model)
    config = PolyConfig(task_type="CAUSAL_LM", r=3, n_tasks=3, n_skills=4, n_splits=2,
                        target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False)
    model.add_adapter("other", config)
    model.set_adapter("other")
    second = out(model)
    model.set_adapter("default")
    assert not torch.allclose(first, second)
    torch.testing.assert_close(out(model), first)


def test_flattened_tokens_with_per_row_tasks_are_refused(adapter_dir):
    model = fresh(adapter_dir)
    layer = first_layer(model)
    tokens = torch.randn(2 * 6, layer.in_features)  # (B*L, in): the first dim is not the batch
    seq_first = torch.randn(6, 2, layer.in_features)  # (L, B, in)
    with model.task_context([0, 1]):
        model.model(input_ids=IDS, use_cache=False)  # records the batch size, 2
        with pytest.raises(PolyValueError, match="first dimension is 12, but the model was called with batch 2"):
            layer(tokens)
        with pytest.raises(PolyValueError, match="sequence-first or flattened tokens"):
            layer(seq_first)
        assert layer(torch.randn(2, layer.in_features)).shape == (2, layer.out_features)  # (B, in): a pooler
    with model.task_context(1):  # one task for every row: any shape is fine
        model.model(input_ids=IDS, use_cache=False)
        assert layer(tokens).shape == (12, layer.out_features)
