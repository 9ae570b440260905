"""Training polytool's Poly model: loss falls, routing separates tasks, PEFT's stochastic routing, the eval cache."""
from __future__ import annotations

import pytest
import torch
from conftest import build_base, randomize_poly
from torch import nn

from polytool import PolyConfig, PolyModel, get_poly_model

IDS = torch.arange(2 * 6).reshape(2, 6) % 96
TASKS = torch.tensor([1, 0])


def logits_of(model, task_ids=TASKS):
    return model(input_ids=IDS, task_ids=task_ids).logits


@pytest.fixture(scope="module")
def toy_run():
    """Two regression tasks, each a different rank-2 map, learned on a frozen Linear(16, 16)."""
    torch.manual_seed(0)
    model = get_poly_model(nn.Sequential(nn.Linear(16, 16)), PolyConfig(r=2, n_tasks=2, n_skills=4, n_splits=2,
                                                                        target_modules=["0"]))
    model.train()
    layer = model.model[0]
    base_before = layer.base_layer.weight.detach().clone()
    logits = layer.poly_router["default"].module_logits
    gap_before = (logits[0] - logits[1]).abs().mean().item()
    maps = torch.randn(2, 16, 2) @ torch.randn(2, 2, 16) * 0.5  # (task, in, out), rank 2 each
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        x = torch.randn(32, 16, generator=g)
        tasks = torch.arange(32) % 2
        target = layer.base_layer(x).detach() + torch.einsum("bi,bio->bo", x, maps[tasks])  # (32, 16)
        loss = ((model(x, task_ids=tasks) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses, gap_before, base_before


def test_loss_falls_and_task_routing_drifts_apart(toy_run):
    model, losses, gap_before, _ = toy_run
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    logits = model.model[0].poly_router["default"].module_logits
    assert (logits[0] - logits[1]).abs().mean().item() > 50 * gap_before


def test_base_frozen_and_unchanged(toy_run):
    model, _, _, base_before = toy_run
    layer = model.model[0]
    assert torch.equal(layer.base_layer.weight, base_before)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "model.0.poly_lora_A.default", "model.0.poly_lora_B.default", "model.0.poly_router.default.module_logits"}


@pytest.fixture(scope="module")
def pair(make_peft_adapter):
    from peft import PeftModel

    adapter_dir, _ = make_peft_adapter("llama", r=3, n_splits=2)
    ours = PolyModel.from_pretrained(build_base("llama"), adapter_dir, is_trainable=True)
    theirs = PeftModel.from_pretrained(build_base("llama"), adapter_dir, is_trainable=True)
    return ours, theirs


def test_train_mode_stochastic_eval_deterministic(pair):
    ours, _ = pair
    with torch.no_grad():
        ours.train()
        assert not torch.equal(logits_of(ours), logits_of(ours))
        ours.eval()
        assert torch.equal(logits_of(ours), logits_of(ours))


def test_train_forward_and_gradients_match_peft_under_one_seed(pair):
    ours, theirs = pair
    ours.train(), theirs.train()
    results = []
    for model in (ours, theirs):
        model.zero_grad()
        torch.manual_seed(5)  # the same RelaxedBernoulli draws, layer by layer
        out = logits_of(model)
        out.square().mean().backward()
        grads = {n.removeprefix("base_model.").removeprefix("model."): p.grad for n, p in model.named_parameters()
                 if p.requires_grad}
        results.append((out.detach(), grads))
    (mine, my_grads), (want, their_grads) = results
    assert ((mine - want).norm() / want.norm()).item() <= 1e-5
    assert my_grads.keys() == their_grads.keys() and len(my_grads) == 3 * 6
    for name, grad in my_grads.items():
        assert grad.abs().sum() > 0, name  # A, B and logits all learn
        assert ((grad - their_grads[name]).norm() / their_grads[name].norm()).item() <= 1e-4, name
    ours.eval(), theirs.eval()


def fresh(model):
    for module in model.modules():
        if hasattr(module, "_cache"):
            module._cache.clear()
    with torch.no_grad():
        return logits_of(model)


def test_eval_cache_follows_parameter_changes():
    model = get_poly_model(build_base("llama"), PolyConfig(r=3, n_tasks=2, target_modules=["q_proj", "up_proj"]))
    randomize_poly(model)
    layer = model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        before = logits_of(model)
    assert "default" in layer._cache  # eval under no_grad uses the cached per-task factors
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    logits_of(model).square().sum().backward()  # eval mode with grad: factors computed fresh
    opt.step()
    with torch.no_grad():
        after = logits_of(model)
    assert not torch.allclose(after, before, atol=1e-4)
    assert torch.equal(after, fresh(model))
    with torch.no_grad():
        layer.poly_router["default"].module_logits[1].add_(3.0)  # an in-place edit
        edited = logits_of(model)
    assert not torch.allclose(edited, after, atol=1e-4) and torch.equal(edited, fresh(model))
    model.train()
    assert not layer._cache  # toggling the mode drops the cache


def test_factors_cached_in_inference_mode_are_not_reused_outside(pair):
    ours, _ = pair
    ours.eval().requires_grad_(False)
    with torch.inference_mode():
        logits_of(ours)
    embeds = ours.model.model.embed_tokens(IDS).detach().requires_grad_(True)
    ours(inputs_embeds=embeds, task_ids=TASKS).logits.sum().backward()  # would fail on an inference tensor
    assert embeds.grad.abs().sum() > 0
    ours.set_adapter("default")  # trainable again for the other tests


def test_relaxed_bernoulli_draw_is_torchs_exactly():
    from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

    from polytool.poly.router import relaxed_bernoulli_sample

    logits = torch.tensor([[-30.0, -2.0, 0.0], [0.5, 3.0, 40.0]], requires_grad=True)  # saturating ends too
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(11)
        want = RelaxedBernoulli(temperature=1.0, logits=logits.to(dtype)).rsample()
        torch.manual_seed(11)
        got = relaxed_bernoulli_sample(logits.to(dtype))
        assert torch.equal(got, want)
        (g_want,) = torch.autograd.grad(want.sum(), logits)
        (g_got,) = torch.autograd.grad(got.sum(), logits)
        assert torch.equal(g_got, g_want)
