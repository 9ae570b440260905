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
]


@pytest.mark.parametrize("mapping,model_type", SAMPLE, ids=[f"{m}:{t}" for m, t in SAMPLE])
def test_family_passes(mapping, model_type, tmp_path):
    result = run_family(mapping, model_type, tmp_path)
    assert result["status"] == "pass", result
    assert max(result["rel"].values()) <= BOUND
    assert result["n_targets"] > 0


def test_peft_refusal_is_quoted_not_a_failure(tmp_path):
    """GPT-2's Conv1D: PEFT's own TypeError, classified as PEFT cannot wrap (polytool is never run)."""
    result = run_family("causal-lm", "gpt2", tmp_path)
    assert result["status"] == "peft-cannot-wrap", result
    assert "TypeError" in result["reason"] and "Conv1D" in result["reason"]


def test_a_wrong_dense_merge_is_a_polytool_failure(tmp_path, monkeypatch):
    """A mutant of the one dense formula (the delta 0.1% too large) must not pass the sweep."""
    import polytool.core.collapse as collapse

    right = collapse.dense_delta
    monkeypatch.setattr(collapse, "dense_delta", lambda A, B, r, out=None: right(A, B, r, out) * 1.001)
    result = run_family("causal-lm", "llama", tmp_path)
    assert result["status"] == "polytool-fails", result
    assert "exit 1" in result["reason"] or "differs" in result["reason"]
