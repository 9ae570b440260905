"""polytool.merge and polytool.basemodel: key matching, Conv1D (GPT-2) orientation against an
independent torch computation and PEFT's LoRA, rounding once to bfloat16, dtype conversion and
re-sharding."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from polytool.formats.adapter import load_adapter
from polytool.formats.base import find_key, open_base
from polytool.formats.safetensors import bf16_to_f32
from polytool.errors import CheckpointError, PolytoolError
from polytool.collapse.dense import plan_merge
from polytool.core.units import parse_size

from test_collapse import collapse_json, forward, load_dense, load_lora_silently, rel_err, run

GPT2_TARGETS = {"attn.c_attn": (32, 96), "attn.c_proj": (32, 32), "mlp.c_fc": (32, 128)}


def torch_factors(adapter: Path, module: str, task: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A (in, r), B (r, out) for one task, float64, from the files with torch (not polytool)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    q, s, r = cfg["n_splits"], cfg["n_skills"], cfg["r"]
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        pa, pb, lg = (f.get_tensor(f"base_model.model.{module}.{k}").double()
                      for k in ("poly_lora_A", "poly_lora_B", "poly_router.module_logits"))
    w = torch.sigmoid(lg[task]).view(q, s)
    w = w / (w.sum(-1, keepdim=True) + 1e-12)
    A = torch.einsum("qs,qsdr->qdr", w, pa).reshape(-1, r)  # (in, r): splits stacked along input rows
    B = torch.einsum("qs,qsrd->rqd", w, pb).reshape(r, -1)  # (r, out): splits along output columns
    return A, B, r


def test_find_key():
    keys = {"model.layers.0.q.weight", "lm_head.weight", "encoder.layer.0.query.weight", "x.a.b.weight", "y.a.b.weight"}
    assert find_key("model.layers.0.q", keys) == "model.layers.0.q.weight"  # exact
    assert find_key("bert.encoder.layer.0.query", keys) == "encoder.layer.0.query.weight"  # prefix stripped
    assert find_key("layers.0.q", keys) == "model.layers.0.q.weight"  # prefix added
    assert find_key("nothing.here", keys) is None
    with pytest.raises(CheckpointError, match=r"'a\.b\.weight' matches several tensors of the checkpoint \(x\.a\.b\.weight, y\.a\.b\.weight\)"):
        find_key("a.b", keys)


def test_parse_size():
    assert parse_size("100MB") == 10**8 and parse_size("2GiB") == 2 * 2**30 and parse_size("512") == 512
    assert parse_size("1.5kb") == 1500
    with pytest.raises(PolytoolError, match="invalid size '5 parsecs'"):
        parse_size("5 parsecs")


@pytest.fixture(scope="session")
def gpt2(make_base, tmp_path_factory):
    """A Poly adapter on GPT-2's Conv1D projections, written here (PEFT's Poly refuses Conv1D)."""
    base = make_base("gpt2")
    adapter = tmp_path_factory.mktemp("gpt2-poly")
    g = torch.Generator().manual_seed(3)
    q, s, r, t = 2, 3, 3, 3
    tensors = {}
    for layer in range(2):
        for name, (d_in, d_out) in GPT2_TARGETS.items():
            key = f"base_model.model.transformer.h.{layer}.{name}"
            tensors[f"{key}.poly_lora_A"] = torch.randn(q, s, d_in // q, r, generator=g) * 0.2
            tensors[f"{key}.poly_lora_B"] = torch.randn(q, s, r, d_out // q, generator=g) * 0.2
            tensors[f"{key}.poly_router.module_logits"] = torch.randn(t, q * s, generator=g) * 2
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "POLY", "poly_type": "poly", "task_type": "CAUSAL_LM", "r": r, "n_tasks": t, "n_skills": s,
              "n_splits": q, "target_modules": sorted(GPT2_TARGETS), "base_model_name_or_path": str(base)}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter, base


def test_conv1d_dense_and_lora(gpt2, tmp_path):
    """GPT-2 stores (in, out): the merged weight is W + A @ B / r as torch computes it from the files,
    and the dense model matches PEFT's LoRA (fan_in_fan_out) loaded from our export."""
    adapter, base = gpt2
    collapse_json(adapter, "--task", "1", "--out", tmp_path / "dense", "--to", "dense")
    with safe_open(base / "model.safetensors", "pt") as a, safe_open(tmp_path / "dense" / "model.safetensors", "pt") as b:
        for name in GPT2_TARGETS:
            key = f"transformer.h.1.{name}"
            A, B, r = torch_factors(adapter, key, 1)
            want = (a.get_tensor(f"{key}.weight").double() + A @ B / r).float()  # (in, out)
            assert torch.allclose(b.get_tensor(f"{key}.weight"), want, rtol=0, atol=1e-6), name
        assert torch.equal(a.get_tensor("transformer.wte.weight"), b.get_tensor("transformer.wte.weight"))
    collapse_json(adapter, "--task", "all", "--out", tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "task-1" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    dense = forward(load_dense("gpt2", tmp_path / "dense", torch.float32), ids)
    lora = {t: forward(load_lora_silently("gpt2", base, tmp_path / "lora" / f"task-{t}", torch.float32), ids) for t in (1, 2)}
    assert rel_err(dense, lora[1]) <= 1e-5
    assert rel_err(dense, lora[2]) > 1e-3, "negative control: another task"


def test_bf16_merge_rounds_once(make_peft_adapter, tmp_path):
    """Merged bf16 weights are round-to-nearest-even of W + delta computed wide: equal to the exact
    rounding of the float64 sum except at rare ties, never more than one bf16 step away."""
    adapter, base = make_peft_adapter("llama", r=2, n_splits=4, n_skills=3, dtype=torch.bfloat16, shard_size="20KB",
                                      targets=("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"))
    collapse_json(adapter, "--task", "2", "--out", tmp_path / "out", "--to", "dense")
    src, out = open_base(base), open_base(tmp_path / "out")
    equal = total = 0
    for module in ("model.layers.0.mlp.gate_proj", "model.layers.1.self_attn.o_proj"):
        key = f"{module}.weight"
        with safe_open(base / src.tensors[key].shard, "pt") as a, safe_open(tmp_path / "out" / out.tensors[key].shard, "pt") as b:
            w, got = a.get_tensor(key), b.get_tensor(key)
        A, B, r = torch_factors(adapter, module, 2)
        exact = (w.double() + (A @ B / r).T)  # (out, in)
        bits = got.view(torch.int16).numpy().view(np.uint16)
        ref = exact.float().to(torch.bfloat16)  # float64 -> float32 -> bf16: correct except at double-rounding ties
        steps = np.abs(bits.astype(np.int32) - ref.view(torch.int16).numpy().view(np.uint16).astype(np.int32))
        assert steps.max() <= 1
        equal += int((steps == 0).sum())
        total += steps.size
        naive = (w + (A @ B / r).T.to(torch.bfloat16))  # rounding twice, as a bf16 add does
        assert not torch.equal(naive, got), "the control should differ from rounding once"
        assert np.abs(bf16_to_f32(bits) - exact.numpy()).max() <= np.abs(exact.numpy()).max() * 2**-8
    assert equal / total > 0.999


def test_dtype_conversion(make_peft_adapter, tmp_path):
    """--dtype float16 on a float32 base: every float tensor converted, config says so, and the model
    is the float32 merge up to float16 precision."""
    adapter, base = make_peft_adapter("llama", r=3, n_splits=2)
    data = collapse_json(adapter, "--task", "0", "--out", tmp_path / "f16", "--to", "dense", "--dtype", "float16")
    collapse_json(adapter, "--task", "0", "--out", tmp_path / "f32", "--to", "dense")
    n = len(open_base(base).tensors)
    assert (data["tensors_merged"], data["tensors_converted"], data["tensors_copied"], data["dtype"]) == (6, n - 6, 0, "float16")
    assert {info.dtype for info in open_base(tmp_path / "f16").tensors.values()} == {"F16"}
    assert json.loads((tmp_path / "f16" / "config.json").read_text())["dtype"] == "float16"
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    half = forward(load_dense("llama", tmp_path / "f16", torch.float16), ids)
    full = forward(load_dense("llama", tmp_path / "f32", torch.float32), ids)
    assert rel_err(half, full) < 5e-3


def test_repacked_shards(make_peft_adapter, tmp_path):
    """--max-shard-size repacks into transformers-style shards with an index; same tensors."""
    adapter, base = make_peft_adapter("llama", r=3, n_splits=2)
    collapse_json(adapter, "--task", "1", "--out", tmp_path / "one", "--to", "dense")
    data = collapse_json(adapter, "--task", "1", "--out", tmp_path / "many", "--to", "dense", "--max-shard-size", "16KB")
    shards = sorted(f for f in data["files"] if f.endswith(".safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    one, many = open_base(tmp_path / "one"), open_base(tmp_path / "many")
    assert set(index["weight_map"]) == set(one.tensors)
    assert index["metadata"]["total_size"] == sum(int(np.prod(i.shape)) * 4 for i in one.tensors.values())
    with safe_open(tmp_path / "one" / "model.safetensors", "pt") as a:
        for key, info in many.tensors.items():
            with safe_open(tmp_path / "many" / info.shard, "pt") as b:
                assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    load_dense("llama", tmp_path / "many", torch.float32)


def test_shape_mismatch_names_module(make_peft_adapter, tmp_path):
    import transformers as tf

    adapter, _ = make_peft_adapter("llama", r=3, n_splits=2)
    other = tmp_path / "other"
    tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    with pytest.raises(CheckpointError, match=r"module 'model.layers.0.mlp.down_proj': the adapter needs a weight of shape "
                                              r"\[32, 48\] \(out, in\), but model.layers.0.mlp.down_proj.weight is \[32, 64\]"):
        plan_merge(load_adapter(adapter), 0, open_base(other))
    res = run("collapse", adapter, "--task", "0", "--out", tmp_path / "lora", "--base", other)
    assert res.exit_code == 2 and "wrong base model?" in res.stderr and not (tmp_path / "lora").exists()
