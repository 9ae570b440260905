"""Generation with task ids (greedy vs PEFT, beams and num_return_sequences on Llama and T5) and GPT-2's Conv1D."""
from __future__ import annotations

import pytest
import torch
from conftest import build_base, randomize_poly

from polytool import PolyConfig, PolyModel, get_poly_model

PROMPTS = torch.arange(2 * 5).reshape(2, 5) % 90 + 3  # (batch 2, seq 5), no padding
TASKS = [2, 0]
GEN = dict(max_new_tokens=6, min_new_tokens=6, pad_token_id=0)


@pytest.fixture(scope="module")
def llama(make_peft_adapter):
    from peft import PeftModel

    adapter_dir, _ = make_peft_adapter("llama", r=3, n_splits=2)
    ours = PolyModel.from_pretrained(build_base("llama"), adapter_dir)
    return ours, PeftModel.from_pretrained(build_base("llama"), adapter_dir)


@pytest.fixture(scope="module")
def t5(make_peft_adapter):
    adapter_dir, _ = make_peft_adapter("t5", r=3, n_splits=2)
    return PolyModel.from_pretrained(build_base("t5"), adapter_dir)


def generate(model, prompts=PROMPTS, task_ids=TASKS, **kw):
    with torch.no_grad():
        mask = torch.ones_like(prompts)
        return model.generate(input_ids=prompts, attention_mask=mask, task_ids=task_ids, **GEN, **kw)


def test_greedy_equals_peft(llama):
    ours, theirs = llama
    out = generate(ours, return_dict_in_generate=True, output_scores=True)
    want = generate(theirs, task_ids=torch.tensor(TASKS), return_dict_in_generate=True, output_scores=True)
    assert torch.equal(out.sequences, want.sequences)
    other = generate(ours, task_ids=[1, 1], return_dict_in_generate=True, output_scores=True)
    assert not torch.allclose(torch.stack(out.scores), torch.stack(other.scores), atol=1e-3)  # task matters
    with ours.disable_adapter():
        bare = generate(ours, return_dict_in_generate=True, output_scores=True)
    assert not torch.allclose(torch.stack(out.scores), torch.stack(bare.scores), atol=1e-3)  # adapter matters


@pytest.mark.parametrize("kw", [dict(num_beams=3), dict(num_beams=3, num_return_sequences=2)])
def test_beams_follow_task_ids_llama(llama, kw):
    ours, theirs = llama
    out = generate(ours, **kw)
    per_row = torch.cat([generate(ours, PROMPTS[i : i + 1], task, **kw) for i, task in enumerate(TASKS)])
    assert torch.equal(out, per_row)
    k = kw["num_beams"]  # PEFT needs the task ids expanded by hand to the beam batch
    assert torch.equal(out, generate(theirs, task_ids=torch.tensor(TASKS).repeat_interleave(k), **kw))


@pytest.mark.parametrize("kw", [dict(num_beams=3), dict(num_beams=3, num_return_sequences=2)])
def test_beams_follow_task_ids_t5(t5, kw):
    out = generate(t5, **kw)
    per_row = torch.cat([generate(t5, PROMPTS[i : i + 1], task, **kw) for i, task in enumerate(TASKS)])
    assert torch.equal(out, per_row)
    assert out.shape[0] == 2 * kw.get("num_return_sequences", 1)


def test_generate_batch_size_mismatch(llama):
    ours, _ = llama
    with pytest.raises(ValueError, match="input batch size 2 is not a multiple of the 3 task_ids given"):
        generate(ours, task_ids=[0, 1, 2])


def test_gpt2_conv1d_matches_hand_reference():
    model = get_poly_model(build_base("gpt2"), PolyConfig(r=3, n_tasks=3, n_skills=2, n_splits=4))
    randomize_poly(model)
    layer = model.model.transformer.h[1].attn.c_attn
    assert (layer.in_features, layer.out_features) == (32, 96)
    seen = {}
    layer.register_forward_hook(lambda m, args, kw, output: seen.update(x=args[0], y=output), with_kwargs=True)
    tasks = torch.tensor([2, 0])
    with torch.no_grad():
        model(input_ids=PROMPTS, task_ids=tasks)
        x = seen["x"]
        # by hand: per split q, A_q = sum_s w[q, s] A[q, s], stacked along input rows; B_q along output columns
        w = torch.sigmoid(layer.poly_router["default"].module_logits).view(3, 4, 2)  # (t, q, s)
        w = w / (w.sum(-1, keepdim=True) + 1e-12)
        A, B = layer.poly_lora_A["default"], layer.poly_lora_B["default"]  # (q, s, 8, r), (q, s, r, 24)
        for row, task in enumerate(tasks.tolist()):
            A_mix = torch.cat([sum(w[task, q, s] * A[q, s] for s in range(2)) for q in range(4)], dim=0)  # (32, r)
            B_mix = torch.cat([sum(w[task, q, s] * B[q, s] for s in range(2)) for q in range(4)], dim=1)  # (r, 96)
            base = x[row] @ layer.base_layer.weight + layer.base_layer.bias  # Conv1D: weight (in, out)
            want = base + x[row] @ A_mix @ B_mix / 3
            assert torch.allclose(seen["y"][row], want, atol=1e-5)
            assert not torch.allclose(want, base, atol=1e-3)
        other = model(input_ids=PROMPTS, task_ids=torch.tensor([0, 2])).logits
        assert not torch.allclose(other, model(input_ids=PROMPTS, task_ids=tasks).logits, atol=1e-3)
