"""polytool check: one test per rule, each with an adapter that breaks it and one that does not.

The adapters are PEFT LoRAs written by PEFT itself on the tiny Llama (DoRA, bias, modules_to_save,
rank_pattern, ... are PEFT's own files); a few variants edit a copy's config or tensors to reach a
case PEFT does not write (a wrong prefix, a missing lora_alpha).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from polytool.check.rules import check
from polytool.formats.lora import read_lora_facts
from polytool.formats.safetensors import SafetensorsFile
from polytool.formats.safetensors_writer import save_file
from polytool.cli import main


@pytest.fixture(scope="session")
def peft_lora(tmp_path_factory, make_base):
    """peft_lora(**LoraConfig kwargs) -> a LoRA directory written by PEFT on the tiny Llama (cached)."""
    cache: dict = {}

    def make(**kwargs) -> Path:
        key = json.dumps(kwargs, sort_keys=True)
        if key not in cache:
            import transformers as tf
            from peft import LoraConfig, get_peft_model

            base = tf.AutoModelForCausalLM.from_pretrained(make_base("llama"))
            cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
            model = get_peft_model(base, LoraConfig(**{**cfg, **kwargs}))
            out = tmp_path_factory.mktemp("lora")
            model.save_pretrained(out)
            cache[key] = out
        return cache[key]

    return make


def edited(src: Path, dst: Path, config: dict | None = None, rename=None, drop: tuple = ()) -> Path:
    """A copy of LoRA `src` with config keys replaced (None deletes) and tensors renamed or dropped."""
    shutil.copytree(src, dst)
    cfg = json.loads((src / "adapter_config.json").read_text())
    for k, v in (config or {}).items():
        cfg.pop(k) if v is None else cfg.__setitem__(k, v)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    with SafetensorsFile(src / "adapter_model.safetensors") as st:
        tensors = {(rename(k) if rename else k): st.array(k) for k in st.keys() if k not in drop}
    (dst / "adapter_model.safetensors").unlink()
    save_file(dst / "adapter_model.safetensors", tensors, {"format": "pt"})
    return dst


def finding(data: dict, rule: str) -> dict:
    return next(x for x in data["findings"] if x["rule"] == rule)


@pytest.fixture(scope="module")
def base(make_base):
    return make_base("llama")


def test_clean_lora_is_ready_everywhere(peft_lora, base):
    for stack in ("vllm", "tgi", "llama.cpp", "peft"):
        data = check(peft_lora(), stack, base)
        assert data["ready"], (stack, [x for x in data["findings"] if x["status"] != "ok"])
        assert {x["status"] for x in data["findings"]} == {"ok"}


def test_targets_that_match_nothing(peft_lora, base, tmp_path):
    """The silent no-op: module paths one prefix away from the base's (vLLM #34186)."""
    bad = edited(peft_lora(), tmp_path / "shifted",
                 rename=lambda k: k.replace("base_model.model.model.", "base_model.model.model.language_model."))
    for stack in ("vllm", "tgi", "peft", "llama.cpp"):
        x = finding(check(bad, stack, base), "targets")
        assert x["status"] == "problem" and "none of the adapter's module paths" in x["detail"], x
    assert finding(check(peft_lora(), "vllm", base), "targets")["status"] == "ok"
    # no --base: the recorded base (base_model_name_or_path, a local directory here) is found as collapse
    # finds it; a recorded base that is not at hand leaves the rule skipped
    recorded = check(bad, "vllm")
    assert recorded["base"] and finding(recorded, "targets")["status"] == "problem"
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "gone")}))
    assert finding(check(bad, "vllm"), "targets")["status"] == "skipped"  # no base at hand: cannot tell


def test_missing_or_file_lora_is_one_line(tmp_path):
    for path, message in ((tmp_path / "nope", "no such LoRA directory"),
                          (Path(__file__), "is a file, expected a LoRA directory")):
        res = CliRunner().invoke(main, ["check", str(path), "--for", "vllm"])
        assert res.exit_code == 2 and res.stderr == f"error: {path}: {message}" + (
            " (holding adapter_config.json)\n" if "file" in message else "\n"), res.output


@pytest.mark.parametrize("targets", [["not_a_module"], "model\\.nowhere\\..*", "(.*)*(.*)*(.*)*(.*)*Z"])
def test_target_modules_that_select_nothing_fail_for_peft(peft_lora, base, tmp_path, targets):
    """PEFT raises NoMatchingPeftModuleError for target_modules that select no module of the model, even where
    the tensors' paths are the base's (issue 21); a pattern that could take exponential time selects nothing."""
    bad = edited(peft_lora(), tmp_path / "unmatched", config={"target_modules": targets})
    x = finding(check(bad, "peft", base), "targets")
    assert x["status"] == "problem" and "matches no module of the base" in x["detail"], x
    good = json.loads((peft_lora() / "adapter_config.json").read_text())["target_modules"]
    control = edited(peft_lora(), tmp_path / "matched", config={"target_modules": good})
    assert finding(check(control, "peft", base), "targets")["status"] == "ok"


def test_keys_without_prefix(peft_lora, base, tmp_path):
    bad = edited(peft_lora(), tmp_path / "noprefix", rename=lambda k: k.removeprefix("base_model.model."))
    x = finding(check(bad, "peft", base), "targets")
    assert x["status"] == "problem" and "base_model.model. prefix" in x["detail"]


def test_rank_names_the_smallest_max_lora_rank(peft_lora, base, tmp_path):
    assert finding(check(peft_lora(), "vllm", base), "rank")["status"] == "ok"  # r 4 <= default 16
    big = peft_lora(r=24)
    x = finding(check(big, "vllm", base), "rank")
    assert x["status"] == "flag" and x["fix"] == "serve with --max-lora-rank 32"
    assert check(big, "vllm", base)["ready"]  # a flag, not a problem
    # a rank above every allowed value (vLLM caps at 512): an edited header, not a 513-rank model
    huge = edited(peft_lora(), tmp_path / "huge", config={"r": 600})
    assert finding(check(huge, "vllm", base), "rank")["status"] == "problem"
    assert finding(check(big, "llama.cpp", base), "rank")["status"] == "ok"


def test_bias(peft_lora, base):
    biased = peft_lora(bias="all")
    for stack, status in (("vllm", "problem"), ("tgi", "problem"), ("llama.cpp", "problem"), ("peft", "ok")):
        assert finding(check(biased, stack, base), "bias")["status"] == status, stack
    assert "lossless" in finding(check(peft_lora(lora_bias=True), "vllm", base), "bias")["fix"]  # B's bias starts at 0
    assert finding(check(peft_lora(), "vllm", base), "bias")["status"] == "ok"


def test_nonzero_bias_is_not_called_lossless(peft_lora, base, tmp_path):
    src = peft_lora(lora_bias=True)
    with SafetensorsFile(src / "adapter_model.safetensors") as st:
        tensors = {k: st.array(k) + (1.0 if k.endswith(".bias") else 0.0) for k in st.keys()}
    dst = tmp_path / "bias"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(dst / "adapter_model.safetensors", tensors, {"format": "pt"})
    assert "lossless" not in finding(check(dst, "vllm", base), "bias")["fix"]


def test_dora(peft_lora, base):
    dora = peft_lora(use_dora=True)
    for stack, status in (("vllm", "problem"), ("tgi", "problem"), ("llama.cpp", "problem"), ("peft", "ok")):
        assert finding(check(dora, stack, base), "dora")["status"] == status, stack
    assert finding(check(peft_lora(), "tgi", base), "dora")["status"] == "ok"


def test_modules_to_save(peft_lora, base):
    saved = peft_lora(modules_to_save=["lm_head"])
    for stack, status in (("vllm", "problem"), ("tgi", "problem"), ("llama.cpp", "problem"), ("peft", "ok")):
        assert finding(check(saved, stack, base), "modules_to_save")["status"] == status, stack
    assert finding(check(peft_lora(), "vllm", base), "modules_to_save")["status"] == "ok"


def test_embedding_and_lm_head_targets(peft_lora, base, make_peft_adapter, tmp_path):
    emb = peft_lora(target_modules=["q_proj", "embed_tokens"])
    assert finding(check(emb, "tgi", base), "embeddings")["status"] == "problem"
    assert finding(check(emb, "vllm", base), "embeddings")["status"] == "warning"
    head = peft_lora(target_modules=["q_proj", "lm_head"])
    x = finding(check(head, "llama.cpp", base), "embeddings")  # the tiny Llama's lm_head is untied
    assert x["status"] == "ok" and x["detail"].endswith("untied")
    assert finding(check(head, "llama.cpp"), "embeddings")["status"] == "ok"  # the recorded base, found locally
    unnamed = shutil.copytree(head, tmp_path / "unnamed")
    config = json.loads((unnamed / "adapter_config.json").read_text())
    (unnamed / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    assert finding(check(unnamed, "llama.cpp"), "embeddings")["status"] == "skipped"  # no base at hand
    assert finding(check(peft_lora(), "tgi", base), "embeddings")["status"] == "ok"


@pytest.fixture(scope="module")
def qwen_tied(matrix_case, tmp_path_factory):
    """(Poly adapter, base) of Qwen2 with tied embeddings and an lm_head target, without the copy of the
    embedding matrix PEFT stores beside it (a Poly-only file that collapse takes)."""
    case = matrix_case("qwen2-tied-lm_head")
    out = tmp_path_factory.mktemp("qwen-tied") / "adapter"
    return edited(case.adapter_dir, out, drop=("base_model.model.lm_head.base_layer.weight",)), case.base_dir


def test_tied_lm_head_for_llama_cpp(qwen_tied, tmp_path):
    """An lm_head tied to the embeddings: llama.cpp's converter refuses its LoRA."""
    adapter, base = qwen_tied
    out = tmp_path / "lora"
    result = CliRunner().invoke(main, ["collapse", str(adapter), "--task", "1", "--out", str(out), "--base", str(base)])
    assert result.exit_code == 0, result.output
    x = finding(check(out, "llama.cpp", base), "embeddings")
    assert x["status"] == "problem" and x["detail"].endswith("tied")
    assert finding(check(out, "tgi", base), "embeddings")["status"] == "ok"  # TGI has an lm_head adapter layer


def test_rank_and_alpha_patterns(peft_lora, base):
    pattern = peft_lora(rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 4})
    for stack, status in (("vllm", "problem"), ("tgi", "problem"), ("llama.cpp", "problem"), ("peft", "ok")):
        assert finding(check(pattern, stack, base), "patterns")["status"] == status, stack
    ranks_only = peft_lora(rank_pattern={"v_proj": 2})
    assert finding(check(ranks_only, "llama.cpp", base), "patterns")["status"] == "ok"  # scale = alpha / own rank
    assert finding(check(ranks_only, "vllm", base), "patterns")["status"] == "problem"


def test_rslora(peft_lora, base):
    rs = peft_lora(use_rslora=True)
    x = finding(check(rs, "llama.cpp", base), "rslora")
    assert x["status"] == "problem" and "lora_alpha 16" in x["fix"]  # 8 * sqrt(4)
    assert finding(check(rs, "vllm", base), "rslora")["status"] == "ok"
    assert finding(check(peft_lora(), "llama.cpp", base), "rslora")["status"] == "ok"


def test_missing_lora_alpha(peft_lora, base, tmp_path):
    bad = edited(peft_lora(), tmp_path / "noalpha", config={"lora_alpha": None})
    for stack in ("vllm", "tgi", "llama.cpp", "peft"):
        assert finding(check(bad, stack, base), "lora_alpha")["status"] == "problem", stack


def test_dtype(peft_lora, base, tmp_path):
    src = peft_lora()
    with SafetensorsFile(src / "adapter_model.safetensors") as st:
        tensors = {k: st.array(k) for k in st.keys()}
    half = tmp_path / "half"
    shutil.copytree(src, half, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(half / "adapter_model.safetensors",
              {k: v.astype("float16") for k, v in tensors.items()}, {"format": "pt"})
    x = finding(check(half, "vllm", base), "dtype")
    assert (x["status"], x["detail"]) == ("ok", "stored F16")
    ints = tmp_path / "ints"
    shutil.copytree(src, ints, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(ints / "adapter_model.safetensors", {k: v.astype("int8") for k, v in tensors.items()}, {"format": "pt"})
    assert finding(check(ints, "vllm", base), "dtype")["status"] == "problem"


def test_conv1d_for_llama_cpp(matrix_case, tmp_path):
    """GPT-2's LoRA through llama.cpp's converter comes out transposed (tests/test_gguf.py runs it)."""
    case = matrix_case("gpt2-conv1d")
    out = tmp_path / "lora"
    result = CliRunner().invoke(main, ["collapse", str(case.adapter_dir), "--task", "1", "--out", str(out),
                                       "--base", str(case.base_dir)])
    assert result.exit_code == 0, result.output
    assert finding(check(out, "llama.cpp", case.base_dir), "conv1d")["status"] == "problem"
    assert finding(check(out, "peft", case.base_dir), "conv1d")["status"] == "ok"


def test_cli_exit_codes_and_json(peft_lora, base, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(main, ["check", str(peft_lora()), "--for", "vllm", "--base", str(base)])
    assert ok.exit_code == 0 and "READY for vllm" in ok.output
    bad = runner.invoke(main, ["check", str(peft_lora(use_dora=True)), "--for", "vllm", "--json"])
    assert bad.exit_code == 1
    data = json.loads(bad.stdout)
    assert data["ready"] is False and finding(data, "dora")["status"] == "problem"
    missing = runner.invoke(main, ["check", str(tmp_path / "nope"), "--for", "tgi"])
    assert missing.exit_code == 2 and missing.stderr.count("\n") == 1
    poly = runner.invoke(main, ["check", "fixtures/poly", "--for", "peft"])
    assert poly.exit_code == 2 and "not 'LORA'" in poly.stderr


def test_collapse_for_stack(qwen_tied, tmp_path):
    """collapse --for runs the same rules first: a tied lm_head is refused for llama.cpp, nothing written."""
    adapter, base = qwen_tied
    runner = CliRunner()
    args = ["collapse", str(adapter), "--task", "1", "--base", str(base)]
    refused = runner.invoke(main, args + ["--to", "gguf", "--for", "llama.cpp", "--out", str(tmp_path / "x.gguf")])
    assert refused.exit_code == 2 and "tied" in refused.stderr and not (tmp_path / "x.gguf").exists()
    ok = runner.invoke(main, args + ["--for", "vllm", "--out", str(tmp_path / "v")])
    assert ok.exit_code == 0, ok.output
    mismatch = runner.invoke(main, args + ["--for", "llama.cpp", "--out", str(tmp_path / "w")])
    assert mismatch.exit_code == 2 and "--to gguf" in mismatch.stderr


def test_facts_read_header_only(peft_lora):
    facts = read_lora_facts(peft_lora())
    assert facts.modules == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert facts.ranks == [4] * 4 and facts.bias_zero is None
