"""The compatibility matrix: one tiny random model per architecture people fine-tune, with a Poly/MHR
adapter written by PEFT itself (polytool's own model for GPT-2, whose Conv1D PEFT refuses).

    CASES[name]              what the case is (architecture, task type, head class, targets, n_splits)
    build_case(name, root)   -> CaseFiles: the saved base directory and adapter directory
    peft_model(files)        -> PEFT's PeftModel of the adapter on a fresh base (the reference)
    run(model, files, task)  -> the head's output tensor for the case's fixed inputs and one task id

Nothing is downloaded: every model comes from a transformers config with seeded random weights.
Tests use the session fixture `matrix_case(name)` (tests/conftest.py), which builds each case once.
PEFT is imported only here and in tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

VOCAB = 96
BATCH, SEQ = 2, 8


@dataclass(frozen=True)
class Case:
    name: str
    arch: str  # a short architecture name, for the report
    model_class: str  # the transformers class the adapter was trained for
    task_type: str
    targets: tuple[str, ...]
    n_splits: int = 2
    r: int = 3
    n_tasks: int = 3
    n_skills: int = 4
    maker: str = "peft"  # "peft", or "polytool" where PEFT cannot write the adapter (Conv1D)
    generates: bool = False  # the model has generate()
    tied_target: bool = False  # a target tied to the input embeddings (lm_head)
    modules_to_save: tuple[str, ...] = ()  # modules trained whole beside the skills (PolyConfig.modules_to_save)
    config: dict = field(default_factory=dict)  # config class name and kwargs

    @property
    def output(self) -> str:
        """The name of the head's output the comparison uses."""
        return "last_hidden_state" if self.task_type == "FEATURE_EXTRACTION" else "logits"


SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)
DECODER = dict(SMALL, num_key_value_heads=2)
LLAMA_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _case(name, arch, cls, task_type, targets, config_cls, config, **kw) -> Case:
    return Case(name, arch, cls, task_type, tuple(targets), config={"class": config_cls, "kwargs": config}, **kw)


CASES: dict[str, Case] = {c.name: c for c in [
    _case("llama-poly", "Llama", "LlamaForCausalLM", "CAUSAL_LM", LLAMA_ALL, "LlamaConfig", DECODER,
          n_splits=1, generates=True),
    _case("llama-mhr", "Llama", "LlamaForCausalLM", "CAUSAL_LM", LLAMA_ALL, "LlamaConfig", DECODER,
          n_splits=4, r=5, generates=True),
    _case("qwen2-tied-lm_head", "Qwen2", "Qwen2ForCausalLM", "CAUSAL_LM", ("q_proj", "v_proj", "lm_head"),
          "Qwen2Config", dict(DECODER, tie_word_embeddings=True), generates=True, tied_target=True),
    _case("mistral", "Mistral", "MistralForCausalLM", "CAUSAL_LM", ("q_proj", "k_proj", "v_proj", "o_proj"),
          "MistralConfig", DECODER, n_splits=4, generates=True),
    _case("phi3-fused", "Phi-3", "Phi3ForCausalLM", "CAUSAL_LM", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
          "Phi3Config", dict(DECODER, pad_token_id=0), generates=True),
    _case("gemma-tied", "Gemma", "GemmaForCausalLM", "CAUSAL_LM", LLAMA_ALL, "GemmaConfig",
          dict(DECODER, head_dim=8, tie_word_embeddings=True), generates=True),
    _case("gpt2-conv1d", "GPT-2", "GPT2LMHeadModel", "CAUSAL_LM", ("c_attn", "c_proj", "c_fc"), "GPT2Config",
          dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64), maker="polytool", generates=True),
    _case("t5-gated", "T5 (gated)", "T5ForConditionalGeneration", "SEQ_2_SEQ_LM",
          ("q", "k", "v", "o", "wi_0", "wi_1", "wo"), "T5Config",
          dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
               feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
          generates=True),
    _case("bart", "BART", "BartForConditionalGeneration", "SEQ_2_SEQ_LM",
          ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), "BartConfig",
          dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64),
          generates=True),
    _case("bert-seq-cls", "BERT", "BertForSequenceClassification", "SEQ_CLS",
          ("query", "key", "value", "attention.output.dense", "intermediate.dense"),  # not pooler.dense: PEFT needs 3-D
          "BertConfig", dict(SMALL, num_labels=3)),
    _case("roberta-seq-cls", "RoBERTa", "RobertaForSequenceClassification", "SEQ_CLS", ("query", "value"),
          "RobertaConfig", dict(SMALL, num_labels=3, pad_token_id=1), n_splits=4),
    _case("bert-token-cls", "BERT", "BertForTokenClassification", "TOKEN_CLS", ("query", "value", "dense"),
          "BertConfig", dict(SMALL, num_labels=5)),
    _case("bert-feature", "BERT", "BertModel", "FEATURE_EXTRACTION", ("query", "key", "value"), "BertConfig", SMALL),
    # PEFT keeps a module whole when its name ENDS WITH an entry: SEQ_CLS's "classifier" takes pre_classifier too
    _case("distilbert-seq-cls", "DistilBERT", "DistilBertForSequenceClassification", "SEQ_CLS",
          ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
          "DistilBertConfig", dict(vocab_size=VOCAB, dim=32, hidden_dim=48, n_layers=2, n_heads=4,
                                   max_position_embeddings=64, num_labels=3)),
    # a new output head trained next to the skills (untied)
    _case("llama-trained-lm_head", "Llama", "LlamaForCausalLM", "CAUSAL_LM", ("q_proj", "v_proj"), "LlamaConfig",
          dict(DECODER, tie_word_embeddings=False), generates=True, modules_to_save=("lm_head",)),
]}


@dataclass(frozen=True)
class CaseFiles:
    case: Case
    base_dir: Path
    adapter_dir: Path


def build_base(case: Case, seed: int = 0):
    """The case's base model in float32 eval mode, seeded."""
    import transformers as tf

    torch.manual_seed(seed)
    config = getattr(tf, case.config["class"])(**case.config["kwargs"])
    return getattr(tf, case.model_class)(config).eval()


def load_base(files: CaseFiles):
    """A fresh copy of the saved base, loaded with the class the adapter was trained for."""
    import transformers as tf

    return getattr(tf, files.case.model_class).from_pretrained(files.base_dir, dtype=torch.float32).eval()


def randomize(model, seed: int = 1, logit_scale: float = 2.0) -> None:
    """Non-trivial adapter values: B != 0, task-dependent routing, and trained-looking modules_to_save heads."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "poly_lora_A" in name or "poly_lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "module_logits" in name:
                p.copy_(torch.randn(p.shape, generator=g) * logit_scale)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def _conv1d_as_linear(model) -> None:
    """Swap every transformers Conv1D (y = x @ W + b, W (in, out)) for the equal nn.Linear (W.T)."""
    from transformers.pytorch_utils import Conv1D

    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            d_in, d_out = module.weight.shape
            linear = torch.nn.Linear(d_in, d_out)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                linear.bias.copy_(module.bias)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, linear)


def build_case(name: str, root: Path) -> CaseFiles:
    """Save the case's base under root/base and its adapter (PEFT's, or polytool's) under root/adapter."""
    case = CASES[name]
    base_dir, adapter_dir = root / "base", root / "adapter"
    build_base(case).save_pretrained(base_dir)
    files = CaseFiles(case, base_dir, adapter_dir)
    kwargs = dict(task_type=case.task_type, r=case.r, n_tasks=case.n_tasks, n_skills=case.n_skills,
                  n_splits=case.n_splits, target_modules=list(case.targets))
    if case.modules_to_save:
        kwargs["modules_to_save"] = list(case.modules_to_save)
    if case.maker == "peft":
        import warnings

        from peft import PolyConfig, get_peft_model

        with warnings.catch_warnings():  # a tied lm_head target warns that embeddings are saved too
            warnings.simplefilter("ignore")
            model = get_peft_model(load_base(files), PolyConfig(**kwargs))
            randomize(model)
            model.save_pretrained(adapter_dir)
    else:
        from polytool import PolyConfig, get_poly_model

        model = get_poly_model(load_base(files), PolyConfig(**kwargs))
        randomize(model)
        model.save_pretrained(adapter_dir)
    return files


def peft_model(files: CaseFiles, adapter_dir: Path | None = None):
    """PEFT's own routed model of the adapter (GPT-2: on a copy whose Conv1D layers are equal Linears)."""
    import warnings

    from peft import PeftModel

    base = load_base(files)
    if files.case.maker == "polytool":
        _conv1d_as_linear(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(base, adapter_dir or files.adapter_dir).eval()


def inputs(files: CaseFiles) -> dict:
    """The case's fixed inputs: BATCH x SEQ token ids (seeded); seq2seq models get them as decoder ids too."""
    ids = torch.randint(2, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    kwargs = {"input_ids": ids}
    if files.case.task_type == "SEQ_2_SEQ_LM":
        kwargs["decoder_input_ids"] = ids
    return kwargs


def run(model, files: CaseFiles, task: int | None = None) -> torch.Tensor:
    """The head's output (logits, or hidden states for FEATURE_EXTRACTION) for the fixed inputs."""
    extra = {} if task is None else {"task_ids": torch.full((BATCH,), task)}
    with torch.no_grad():
        out = model(**inputs(files), **extra)
    return out[files.case.output].detach().float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|"""
    return float((a - b).abs().max() / b.abs().max())
