"""Shared, session-scoped test material: tiny random transformers models and PEFT-made adapters.

Nothing is downloaded: every model is built from a transformers config with seeded random weights.
PEFT is the reference implementation and is imported only here and in tests.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

VOCAB = 96
# nothing is downloaded: a hub id resolves from the (fake, per-test) Hugging Face cache or fails at once
os.environ["HF_HUB_OFFLINE"] = "1"


def build_base(kind: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random model of one architecture: 'llama', 'qwen2', 'bert', 't5', 'gpt2'."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        model = tf.Qwen2ForCausalLM(cfg)
    elif kind == "bert":
        cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=128)
        model = tf.BertModel(cfg)
    elif kind == "t5":
        cfg = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                          num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        model = tf.T5ForConditionalGeneration(cfg)
    elif kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    return model.to(dtype).eval()


def randomize_poly(model, seed: int = 1, logit_scale: float = 2.0) -> None:
    """Give every Poly tensor (PEFT's or polytool's) non-trivial values: B != 0, routing that differs by task."""
    from matrix import randomize

    randomize(model, seed, logit_scale)


def tree_hash(path: Path) -> str:
    """Hash of every file's relative path and bytes under `path` (inputs must never change)."""
    digest = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(path)).encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()


TASK_TYPES = {"llama": "CAUSAL_LM", "qwen2": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION",
              "t5": "SEQ_2_SEQ_LM"}
DEFAULT_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "k_proj", "o_proj", "up_proj"],
                   "bert": ["query", "value", "dense"], "t5": ["q", "v", "wi"], "gpt2": ["c_attn"]}


@pytest.fixture(scope="session")
def make_base(tmp_path_factory):
    """make_base(kind, dtype=..., shard_size=None) -> directory of a saved tiny base model (cached)."""
    cache: dict = {}

    def make(kind: str = "llama", dtype: torch.dtype = torch.float32, shard_size: str | None = None) -> Path:
        key = (kind, dtype, shard_size)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"base-{kind}")
            model = build_base(kind, dtype=dtype)
            kwargs = {"max_shard_size": shard_size} if shard_size else {}
            model.save_pretrained(out, **kwargs)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session")
def make_peft_adapter(tmp_path_factory, make_base):
    """make_peft_adapter(kind, r, n_tasks, n_skills, n_splits, targets, dtype, shard_size)
    -> (adapter_dir, base_dir): an adapter written by PEFT itself with random, task-dependent routing."""
    cache: dict = {}

    def make(kind: str = "llama", r: int = 3, n_tasks: int = 3, n_skills: int = 4, n_splits: int = 2,
             targets: tuple[str, ...] | None = None, dtype: torch.dtype = torch.float32,
             shard_size: str | None = None, seed: int = 1) -> tuple[Path, Path]:
        targets = tuple(targets or DEFAULT_TARGETS[kind])
        key = (kind, r, n_tasks, n_skills, n_splits, targets, dtype, shard_size, seed)
        if key not in cache:
            import transformers as tf
            from peft import PolyConfig, get_peft_model

            base_dir = make_base(kind, dtype, shard_size)
            auto = {"CAUSAL_LM": tf.AutoModelForCausalLM, "SEQ_2_SEQ_LM": tf.AutoModelForSeq2SeqLM,
                    "FEATURE_EXTRACTION": tf.AutoModel}[TASK_TYPES[kind]]
            base = auto.from_pretrained(base_dir, dtype=dtype)
            cfg = PolyConfig(task_type=TASK_TYPES[kind], r=r, n_tasks=n_tasks, n_skills=n_skills,
                             n_splits=n_splits, target_modules=list(targets))
            model = get_peft_model(base, cfg)
            randomize_poly(model, seed=seed)
            out = tmp_path_factory.mktemp(f"adapter-{kind}-r{r}-q{n_splits}")
            model.save_pretrained(out)
            cache[key] = (out, base_dir)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def matrix_case(tmp_path_factory):
    """matrix_case(name) -> tests/matrix.py CaseFiles (base and adapter directories), built once per session."""
    import matrix

    cache: dict = {}

    def make(name: str):
        if name not in cache:
            cache[name] = matrix.build_case(name, tmp_path_factory.mktemp(f"matrix-{name}"))
        return cache[name]

    return make


# ---- the compatibility matrix's record (docs/gen_compat.py renders docs/compatibility.md from it) ----
COMPAT_RECORDS: list[dict] = []


@pytest.fixture(scope="session")
def compat_record():
    """compat_record(case, check, max_rel_err=None): note that `check` passed on matrix case `case`
    (call it after the test's assertions). With POLYTOOL_COMPAT_JSON=FILE the records are written there."""

    def record(case: str, check: str, max_rel_err: float | None = None) -> None:
        COMPAT_RECORDS.append({"case": case, "check": check,
                               "max_rel_err": None if max_rel_err is None else float(max_rel_err)})

    return record


def pytest_sessionfinish(session, exitstatus):
    import json
    import os

    out = os.environ.get("POLYTOOL_COMPAT_JSON")
    if out:
        Path(out).write_text(json.dumps(COMPAT_RECORDS, indent=1), encoding="utf-8")
