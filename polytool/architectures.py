"""What differs between model families, as data: one place to add a family (docs/architecture.md).

Every fact here was read from transformers, PEFT or llama.cpp (the source is named beside each table);
the code that needs one looks it up here, so a new family is a new row, not a branch in five modules.
Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass

# Leaf names of input embedding layers (transformers' naming across families).
INPUT_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "shared", "embed_in", "tok_embeddings")
# Module paths (or path suffixes) of output embeddings / LM heads, which a config may tie to the input embeddings.
OUTPUT_EMBEDDINGS = ("lm_head", "embed_out", "predictions.decoder")
# Leaf names serving stacks treat as the output head ("output": llama.cpp's and the original Mistral's name).
OUTPUT_LEAVES = ("lm_head", "embed_out", "output")
# Layers PEFT saves whole beside an adapter when they are targeted or resized (save_embedding_layers).
SAVED_EMBEDDING_NAMES = INPUT_EMBEDDING_NAMES + ("lm_head", "embed_out")
# peft.utils.constants.EMBEDDING_LAYER_NAMES: targets for which PEFT saves the embedding layers.
PEFT_EMBEDDING_TARGETS = ("embed_tokens", "lm_head")

# PEFT's task_type -> the transformers Auto class of the model the adapter was trained on.
TASK_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
                "SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
                "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}
# A task's Auto class for the other modalities, tried in order where TASK_CLASSES' does not map the base's config
# (PEFT's task types name text tasks: a Whisper adapter says SEQ_2_SEQ_LM, an image classifier's SEQ_CLS).
TASK_CLASS_ALTERNATIVES = {"AutoModelForSeq2SeqLM": ("AutoModelForSpeechSeq2Seq",),
                           "AutoModelForSequenceClassification": ("AutoModelForImageClassification",
                                                                  "AutoModelForAudioClassification"),
                           "AutoModelForTokenClassification": ("AutoModelForAudioFrameClassification",)}
# Heads PEFT adds to modules_to_save by task type (peft's _set_trainable; SEQ_CLS before it picks the targets).
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


@dataclass(frozen=True)
class Family:
    """One model_type's differences. `gguf`: (the HF class llama.cpp's converter registers, its llama.cpp
    architecture, whether the converter permutes q/k rows for RoPE: conversion/llama.py undo_permute)."""

    conv1d: bool = False  # projections are transformers' Conv1D, the weight stored (in, out)
    default_targets: tuple[str, ...] = ()  # PEFT's default target_modules (its LoRA/Poly table)
    always_tied: bool = False  # the output head reads the input embeddings whatever the config says
    gguf: tuple[str, str, bool] | None = None


_QV = ("q_proj", "v_proj")
FAMILIES: dict[str, Family] = {
    "llama": Family(default_targets=_QV, gguf=("LlamaForCausalLM", "LLAMA", True)),
    "llama4": Family(default_targets=_QV),
    "mistral": Family(default_targets=_QV, gguf=("MistralForCausalLM", "LLAMA", True)),
    "mixtral": Family(default_targets=_QV),
    "qwen2": Family(default_targets=_QV, gguf=("Qwen2ForCausalLM", "QWEN2", False)),
    "qwen3": Family(default_targets=_QV),
    "gemma": Family(default_targets=_QV, always_tied=True, gguf=("GemmaForCausalLM", "GEMMA", False)),
    "gemma2": Family(default_targets=_QV),
    "gemma3_text": Family(default_targets=_QV),
    "stablelm": Family(default_targets=_QV),
    "phi": Family(default_targets=("q_proj", "v_proj", "fc1", "fc2")),
    "phi3": Family(gguf=("Phi3ForCausalLM", "PHI3", False)),
    "bert": Family(default_targets=("query", "value")),
    "roberta": Family(default_targets=("query", "value")),
    "xlm-roberta": Family(default_targets=("query", "value")),
    "electra": Family(default_targets=("query", "value")),
    "layoutlm": Family(default_targets=("query", "value")),
    "deberta-v2": Family(default_targets=("query_proj", "value_proj")),
    "deberta": Family(default_targets=("in_proj",)),
    "t5": Family(default_targets=("q", "v")),
    "mt5": Family(default_targets=("q", "v")),
    "bart": Family(default_targets=_QV),
    "opt": Family(default_targets=_QV),
    "gptj": Family(default_targets=_QV),
    "gpt_neo": Family(default_targets=_QV),
    "gpt2": Family(conv1d=True, default_targets=("c_attn",), gguf=("GPT2LMHeadModel", "GPT2", False)),
    "openai-gpt": Family(conv1d=True),
    "imagegpt": Family(conv1d=True),
    "decision_transformer": Family(conv1d=True),
    "gpt_bigcode": Family(default_targets=("c_attn",)),
    "gpt_neox": Family(default_targets=("query_key_value",)),
    "falcon": Family(default_targets=("query_key_value",)),
    "bloom": Family(default_targets=("query_key_value",)),
    "chatglm": Family(default_targets=("query_key_value",)),
    "mpt": Family(default_targets=("Wqkv",)),
    "codegen": Family(default_targets=("qkv_proj",)),
}

CONV1D_MODEL_TYPES = frozenset(t for t, f in FAMILIES.items() if f.conv1d)
ALWAYS_TIED_MODEL_TYPES = frozenset(t for t, f in FAMILIES.items() if f.always_tied)
DEFAULT_TARGET_MODULES = {t: list(f.default_targets) for t, f in FAMILIES.items() if f.default_targets}
# HF class -> (llama.cpp architecture, permute q/k), for GGUF LoRAs
GGUF_ARCHITECTURES = {f.gguf[0]: f.gguf[1:] for f in FAMILIES.values() if f.gguf}
GGUF_ALWAYS_TIED = frozenset(f.gguf[0] for f in FAMILIES.values() if f.gguf and f.always_tied)
