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


# ---- the fused eval forward (Linear._fused_eval): the update first, the base product added by its own GEMM ----


def _counting_fused(monkeypatch) -> list:
    """Count the calls of the fused eval forward (the math is the product's own: only calls are counted)."""
    from polytool.poly.layer import Linear

    calls, fused = [], Linear._fused_eval

    def counted(self, *args, **kwargs):
        calls.append(self.name)
        return fused(self, *args, **kwargs)

    monkeypatch.setattr(Linear, "_fused_eval", counted)
    return calls


@pytest.mark.parametrize("kind", ["llama", "bert"], ids=["no-bias", "bias"])
def test_fused_eval_forward_equals_peft(make_peft_adapter, monkeypatch, kind):
    from peft import PeftModel

    targets = ("query", "value") if kind == "bert" else None  # PEFT's Poly needs 3-D inputs: not bert's pooler
    adapter_dir = make_peft_adapter(kind, r=5, n_splits=2, targets=targets)[0]
    ours = PolyModel.from_pretrained(build_base(kind), adapter_dir).eval()
    theirs = PeftModel.from_pretrained(build_base(kind), adapter_dir).eval()
    with torch.no_grad():  # transformers initialises biases to zero: give them values the outputs show
        for model in (ours, theirs):
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.copy_(torch.sin(torch.arange(p.numel(), dtype=p.dtype)) * 0.5)
    calls = _counting_fused(monkeypatch)

    def out(model, tasks):
        result = model(input_ids=IDS, task_ids=tasks)
        return result.logits if kind == "llama" else result.last_hidden_state

    with torch.no_grad():
        for tasks in (SHARED, torch.tensor([2] * 5)):
            got = out(ours, tasks)
            assert rel(got, out(theirs, tasks)) <= 1e-5
        assert len(calls) == 2 * sum(isinstance(m, PolyLayer) for m in ours.modules()) > 0  # every layer fused
        assert rel(out(ours, 0), got) > 1e-3  # another task: other outputs (the comparison can fail)
    calls.clear()
    got = out(ours, SHARED)  # grad mode: autograd records the base's product, so the unfused order runs
    assert not calls and rel(got, out(theirs, SHARED)) <= 1e-5


def _bias_layer():
    from torch import nn

    from polytool.poly.config import PolyConfig
    from polytool.poly.layer import Linear

    torch.manual_seed(3)
    layer = Linear(nn.Linear(16, 12), "default", PolyConfig(r=4, n_tasks=3, n_skills=2, n_splits=2,
                                                            init_weights=False), name="proj").eval()
    with torch.no_grad():
        layer.poly_router["default"].module_logits.normal_(0, 2)
    return layer


def test_fused_and_unfused_orders_agree_on_any_input_rank(monkeypatch):
    layer, calls = _bias_layer(), _counting_fused(monkeypatch)
    x = torch.randn(3, 5, 16)
    tasks = torch.tensor([2, 0, 2])
    want = layer(x, task_ids=tasks).detach()  # grad mode on: the unfused order
    assert not calls
    with torch.no_grad():
        assert rel(layer(x, task_ids=tasks), want) <= 1e-6
        assert rel(layer(x.reshape(3, 5, 1, 16), task_ids=tasks), want.reshape(3, 5, 1, 12)) <= 1e-6
        assert rel(layer(x[:, 0], task_ids=tasks), want[:, 0]) <= 1e-6  # (b, in)
        assert rel(layer(x[0, 0], task_ids=2), want[0, 0]) <= 1e-6  # (in,)
        assert len(calls) == 4
        assert rel(layer.base_layer(x), want) > 1e-2  # the update is not negligible: the comparison can fail


def test_fused_eval_forward_keeps_what_wraps_the_base_layer(monkeypatch):
    """A hook on the base layer, a global module hook or a replaced `forward` (accelerate's) must still run:
    then the unfused order, which calls the base layer, is taken."""
    from torch.nn.modules.module import register_module_forward_hook

    layer, calls = _bias_layer(), _counting_fused(monkeypatch)
    x, tasks = torch.randn(2, 4, 16), torch.tensor([1, 0])
    with torch.no_grad():
        plain = layer(x, task_ids=tasks)
        assert len(calls) == 1
        handle = layer.base_layer.register_forward_hook(lambda _m, _a, out: out + 1.0)
        assert torch.allclose(layer(x, task_ids=tasks), plain + 1.0, atol=1e-5)
        handle.remove()
        seen = []
        handle = register_module_forward_hook(lambda m, _a, _out: seen.append(m))
        try:
            layer(x, task_ids=tasks)
        finally:
            handle.remove()
        assert layer.base_layer in seen
        wrapped = layer.base_layer.forward
        layer.base_layer.forward = lambda inp: wrapped(inp) * 2.0
        got = layer(x, task_ids=tasks)
        del layer.base_layer.forward
        assert rel(got, plain) > 0.1
        assert len(calls) == 1  # none of the three took the fused order
        assert torch.allclose(layer(x, task_ids=tasks), plain, atol=1e-6) and len(calls) == 2


def test_autocast_and_tensor_subclasses_keep_the_unfused_order(monkeypatch):
    """Under autocast the products run in half precision and the in-place add would meet the float32 weight: the
    unfused order runs, as it did before the fused one existed (bfloat16 out, the update applied); a weight that
    is a tensor subclass (as quantized weights are) is left to the base layer too."""
    layer, calls = _bias_layer(), _counting_fused(monkeypatch)
    x, tasks = torch.randn(2, 4, 16), torch.tensor([1, 0])
    with torch.no_grad():
        want = layer(x, task_ids=tasks)  # the eval factors cached in float32, outside autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = layer(x, task_ids=tasks)
            base = layer.base_layer(x)
        assert got.dtype == torch.bfloat16 and len(calls) == 1
        assert rel(got, want) <= 2e-2 and rel(base, want) > 0.1  # bfloat16 rounding; the update is there
        layer.invalidate_cache()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert rel(layer(x, task_ids=tasks), got) <= 1e-2  # factors cached inside autocast this time...
        assert all(t.dtype == torch.float32 for t in layer._cache["default"][1:])  # ...still float32
        assert torch.equal(layer(x, task_ids=tasks), want) and len(calls) == 2  # and the float32 result after

        class Marked(torch.Tensor):
            pass

        plain = layer.base_layer.weight
        layer.base_layer.weight = torch.nn.Parameter(plain.detach().as_subclass(Marked), requires_grad=False)
        assert type(layer.base_layer.weight) is not torch.nn.Parameter
        assert rel(layer(x, task_ids=tasks), want) <= 1e-6 and len(calls) == 2  # no third fused call
        layer.base_layer.weight = plain
        bias = layer.base_layer.bias
        del layer.base_layer.bias
        layer.base_layer.bias = bias.detach() + 1.0  # a plain tensor attribute, not a parameter: still applied
        assert torch.allclose(layer(x, task_ids=tasks), want + 1.0, atol=1e-5) and len(calls) == 2
