"""A sample of the whole-zoo sweep (benchmarks/sweep.py) in the suite: the same per-family function on families
that pass today, spread over the mappings and the styles (decoder, encoder, encoder-decoder, fused QKV, vision
with checkpoint names converted on load), plus the sweep's own classification (PEFT's error quoted; a wrong formula caught).

Each family: a tiny random model made from its own config class, a Poly adapter written by PEFT on it, polytool's
inspect / collapse (LoRA, dense) / verify through the CLI, the dense model in transformers and the LoRA in PEFT
against PEFT's routed model for task 1 (rel <= 1e-5), the adapter and task 2 changing the output (the negative
control). The full sweep and its table: docs/compatibility.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from sweep_family import BOUND, run_family  # noqa: E402

SAMPLE = [  # (mapping, model_type): fast families that pass today
    ("causal-lm", "llama"), ("causal-lm", "qwen2"), ("causal-lm", "gpt_neox"), ("causal-lm", "opt"),
    ("causal-lm", "phi"), ("causal-lm", "gemma"), ("causal-lm", "falcon"), ("causal-lm", "codegen"),
    ("seq2seq-lm", "t5"), ("seq2seq-lm", "bart"), ("seq2seq-lm", "marian"),
    ("seq-cls", "bert"), ("seq-cls", "roberta"), ("seq-cls", "bloom"), ("seq-cls", "distilbert"),
    ("token-cls", "biogpt"), ("token-cls", "electra"), ("token-cls", "albert"),
    ("qa", "bert"), ("qa", "xlm-roberta"), ("qa", "big_bird"),
    ("feature", "bert"), ("feature", "t5"), ("feature", "mistral"),
    ("image-cls", "vit"), ("image-cls", "dinov2"),  # pixel values; checkpoint names converted on load
    # renamed on load beside fused experts (verify reads the renamings of the tensors no converter takes)
    ("causal-lm", "minicpm5_moe"), ("causal-lm", "nemotron_h"),
    ("seq-cls", "bart"), ("feature", "llava"),  # the <eos> an encoder-decoder classifier needs; image tokens
    # fused projections split along their rows on load (qkv; gate/up), a weight stored transposed
    ("token-cls", "gte"), ("seq-cls", "nomic_bert"), ("causal-lm", "sarvam_moe"), ("causal-lm", "ergo"),
]


@pytest.mark.parametrize("mapping,model_type", SAMPLE, ids=[f"{m}:{t}" for m, t in SAMPLE])
def test_family_passes(mapping, model_type, tmp_path):
    result = run_family(mapping, model_type, tmp_path)
    assert result["status"] == "pass", result
    assert max(result["rel"].values()) <= BOUND
    assert result["n_targets"] > 0


# issue 22's last small families: ids hashed from code points (CANINE), a pooling head whose
# nn.MultiheadAttention reads out_proj's weight itself (SigLIP), BatchNorm and layer scale (SwiftFormer)
FIXED = [("token-cls", "canine"), ("image-cls", "siglip"), ("image-cls", "swiftformer")]


@pytest.mark.parametrize("mapping,model_type", FIXED, ids=[f"{m}:{t}" for m, t in FIXED])
def test_family_passes_and_another_task_fails(mapping, model_type, tmp_path):
    """The family passes the sweep; verify of its task-1 LoRA and dense model as task 2 fails (exit 1)."""
    from click.testing import CliRunner

    from polytool.cli import main

    result = run_family(mapping, model_type, tmp_path)
    assert result["status"] == "pass", result
    assert max(result["rel"].values()) <= BOUND
    for artifact in ("lora", "dense"):
        got = CliRunner().invoke(main, ["verify", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"),
                                        "--against", str(tmp_path / artifact), "--task", "2", "--inputs", "2",
                                        "--seq-len", "8"])
        assert got.exit_code == 1 and "FAIL" in got.stdout, (artifact, got.output)


def test_peft_refusal_is_quoted_not_a_failure(tmp_path):
    """GPT-2's Conv1D: PEFT's own TypeError, classified as PEFT cannot wrap (polytool is never run)."""
    result = run_family("causal-lm", "gpt2", tmp_path)
    assert result["status"] == "peft-cannot-wrap", result
    assert "TypeError" in result["reason"] and "Conv1D" in result["reason"]


def test_a_linear_its_parent_bypasses_is_left_out(tmp_path):
    """Mamba's mixer reads dt_proj's weight itself (as nn.MultiheadAttention reads out_proj's): a Poly layer there
    never runs, so the sweep leaves it out of all-linear (a randomised one failed the dense model by 5e-5 against
    a routed model that never applies it). The rest passes verify; PEFT's LoRA loader refuses Mamba's out_proj."""
    result = run_family("feature", "mamba", tmp_path)
    assert result["status"] == "peft-cannot-load" and "bypassed" in result["targets"], result
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert any(".x_proj." in k for k in f.keys()) and not any(".dt_proj." in k for k in f.keys())
    assert float(result["reason"].rsplit("dense rel ", 1)[1]) <= BOUND


def test_a_lora_peft_leaves_unloaded_is_peft_cannot_load(tmp_path):
    """Mistral Large 4's conversion renames `.shared_experts.` to `.mlp.shared_experts.` also in adapter keys
    already so named (peft#3711): PEFT's LoRA loader leaves those modules at B = 0 (even a LoRA PEFT saved itself),
    which the sweep classifies as PEFT's, with the dense model (transformers' loader) passing."""
    result = run_family("feature", "mistral_large4_text", tmp_path)
    assert result["status"] == "peft-cannot-load", result
    assert "wrapped but left unloaded" in result["reason"] and "shared_experts" in result["reason"]
    assert result["rel"]["dense"] <= BOUND < result["rel"]["lora"]


def test_a_wrong_dense_merge_is_a_polytool_failure(tmp_path, monkeypatch):
    """A mutant of the one dense formula (the delta 0.1% too large) must not pass the sweep."""
    import polytool.core.collapse as collapse

    right = collapse.dense_delta
    monkeypatch.setattr(collapse, "dense_delta", lambda A, B, r, out=None: right(A, B, r, out) * 1.001)
    result = run_family("causal-lm", "llama", tmp_path)
    assert result["status"] == "polytool-fails", result
    assert "exit 1" in result["reason"] or "differs" in result["reason"]


def test_a_weight_built_otherwise_is_refused_for_dense_only(tmp_path):
    """Kimi-K2.5's vision tower: transformers chunks `wqkv` and permutes its rows for rotary embeddings on
    load, so k_proj's weight is no block of a key. The LoRA export (PEFT adapts the built module) succeeds;
    the dense merge is refused in one line naming the module (exit 2, nothing written), not a crash."""
    result = run_family("feature", "kimi_k25", tmp_path)
    assert result["status"] == "polytool-fails", result
    assert "--to dense" in result["reason"] and "exit 2" in result["reason"], result["reason"]
    assert "transformers builds its weight from other tensors" in result["reason"]
    assert not (tmp_path / "dense").exists()
