"""The Poly layer's eval paths against PEFT: broadcast (one task) and gathered (mixed tasks) factors, grad, half precision."""
from __future__ import annotations

import pytest
import torch
from conftest import build_base

from polytool import PolyModel
from polytool.poly.layer import PolyLayer
from polytool.poly.router import TaskRoute

IDS = torch.arange(5 * 6).reshape(5, 6) % 96  # (batch 5, seq 6)
SHARED = torch.tensor([1, 0, 1, 2, 0])  # mixed, some rows share a task


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def logits(model, task_ids, ids=IDS):
    return model(input_ids=ids, task_ids=task_ids).logits


@pytest.fixture(scope="module")
def adapter_dir(make_peft_adapter):
    return make_peft_adapter("llama", r=5, n_splits=2)[0]  # r 5: B / r is not exact in binary


def pair(adapter_dir, dtype=torch.float32, **kw):
    from peft import PeftModel

    ours = PolyModel.from_pretrained(build_base("llama", dtype=dtype), adapter_dir, **kw).eval()
    theirs = PeftModel.from_pretrained(build_base("llama", dtype=dtype), adapter_dir, **kw).eval()
    return ours, theirs


def test_rows_sharing_tasks_equal_peft_and_the_one_task_path(adapter_dir):
    ours, theirs = pair(adapter_dir)
    with torch.no_grad():
        got = logits(ours, SHARED)
        assert rel(got, logits(theirs, SHARED)) <= 1e-5
        for task in (0, 1, 2):  # all rows one task: the broadcast path, row by row the same numbers
            rows = SHARED == task
            alone = logits(ours, task, IDS[rows])
            assert rel(alone, got[rows]) <= 1e-6
            assert rel(alone, logits(theirs, torch.full((int(rows.sum()),), task), IDS[rows])) <= 1e-5
        assert rel(logits(ours, 0), got) > 1e-3  # other tasks, other outputs
        with ours.disable_adapter():
            assert rel(logits(ours, SHARED), got) > 1e-3  # the adapter visibly changes the output


def test_any_input_rank_with_one_task(adapter_dir):
    ours, _ = pair(adapter_dir)
    layer = ours.model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 6, layer.in_features)
    with torch.no_grad():
        want = layer(x, task_ids=torch.tensor([2, 2]))
        assert torch.allclose(layer(x.reshape(2, 2, 3, -1), task_ids=2), want.reshape(2, 2, 3, -1), atol=1e-6)
        assert torch.allclose(layer(x[0, 0], task_ids=2), want[0, 0], atol=1e-6)
        assert not torch.allclose(layer(x, task_ids=1), want, atol=1e-3)


def test_input_gradients_in_eval_equal_peft(adapter_dir):
    ours, theirs = pair(adapter_dir)  # a frozen adapter: cached factors, out-of-place update under grad
    grads = []
    for model in (ours, theirs):
        embeds = model.get_input_embeddings()(IDS).detach().requires_grad_(True)
        model(inputs_embeds=embeds, task_ids=SHARED).logits.square().mean().backward()
        grads.append(embeds.grad)
    assert rel(grads[0], grads[1]) <= 1e-5 and grads[0].abs().sum() > 0


@pytest.mark.parametrize("tasks", [SHARED, torch.tensor([2] * 5)], ids=["mixed", "one-task"])
def test_trainable_adapter_in_eval_mode_gets_peft_gradients(adapter_dir, tasks):
    ours, theirs = pair(adapter_dir, is_trainable=True)
    results = []
    for model in (ours, theirs):
        model(input_ids=IDS, task_ids=tasks).logits.square().mean().backward()
        results.append({n.removeprefix("base_model.").removeprefix("model."): p.grad
                        for n, p in model.named_parameters() if p.requires_grad})
    mine, want = results
    assert mine.keys() == want.keys() and len(mine) == 3 * 6
    for name, grad in mine.items():
        assert rel(grad, want[name]) <= 1e-4, name
    layers = [m for m in ours.modules() if isinstance(m, PolyLayer)]
    assert not any(layer._cache for layer in layers)  # grad was needed: nothing cached
    with torch.no_grad():
        logits(ours, tasks)
    assert all("default" in layer._cache for layer in layers)  # under no_grad the cache serves trainable tensors too


@pytest.mark.parametrize("tasks", [SHARED, 1], ids=["mixed", "one-task"])
def test_bfloat16_base_equals_peft(adapter_dir, tasks):
    ours, theirs = pair(adapter_dir, dtype=torch.bfloat16)
    ids = torch.as_tensor(tasks).expand(5) if isinstance(tasks, int) else tasks
    with torch.no_grad():
        got = logits(ours, tasks)
        assert got.dtype == torch.bfloat16
        assert rel(got, logits(theirs, ids)) <= 2e-3  # one rounding to bfloat16, as PEFT; B / r differs in the last bit
        with ours.disable_adapter():
            assert rel(logits(ours, tasks), got) > 2e-2


def test_one_route_per_call_shared_by_every_layer_and_generate_step(adapter_dir):
    ours, _ = pair(adapter_dir)
    seen, layers = [], [m for m in ours.modules() if isinstance(m, PolyLayer)]
    for layer in layers:
        layer.register_forward_hook(lambda _m, _a, kw, _out: seen.append(kw["task_ids"]), with_kwargs=True)
    with torch.no_grad():
        logits(ours, [1, 0, 1, 2, 0])
    assert len(seen) == len(layers) > 1 and all(route is seen[0] for route in seen) and isinstance(seen[0], TaskRoute)
    assert seen[0].task is None and TaskRoute([2, 2]).task == 2
    assert seen[0].factors is None  # a forward keeps nothing: parameters may change before the next call
    seen.clear()
    with torch.no_grad():
        ours.generate(input_ids=IDS[:2], attention_mask=torch.ones_like(IDS[:2]), task_ids=[2, 0], max_new_tokens=3,
                      min_new_tokens=3, pad_token_id=0)
    assert len(seen) == 3 * len(layers) and all(route is seen[0] for route in seen)
    assert len(seen[0].factors) == len(layers)  # mixed and gathered once, used by every step
