"""verify: the live routed forward vs collapsed artifacts. Good artifacts pass; every corruption
fails (exit 1, naming the task and the artifact) or is refused (exit 2); the LoRA applier matches
PEFT's LoRA; one wrong element in any module is caught."""
from __future__ import annotations

import dataclasses

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import TASK_TYPES, build_base, tree_hash
from polytool import verify as V
from polytool.formats.adapter import load_adapter
from polytool.cli import main
from polytool.formats.lora import read_lora
from polytool.verify.lora_apply import attach_lora
from polytool.verify.models import linear_layers

B_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
W_KEY = "model.layers.1.mlp.down_proj.weight"


def run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def collapse(adapter: Path, out: Path, task: str, *extra) -> Path:
    got = run("collapse", adapter, "--task", task, "--out", out, *extra)
    assert got.exit_code == 0, got.output
    return out


def edit_tensor(src: Path, dst: Path, file: str, key: str, change, **metadata: str) -> Path:
    """A copy of the directory `src` with one tensor of `file` changed in place (metadata kept, updated)."""
    shutil.copytree(src, dst)
    from polytool.formats.safetensors import SafetensorsFile

    with SafetensorsFile(dst / file) as st:
        metadata = {**st.metadata, **metadata}
    tensors = load_file(dst / file)
    change(tensors[key])
    save_file(tensors, dst / file, metadata=metadata)
    return dst


def nudge(t: torch.Tensor) -> None:
    t[1, 2] += 0.5


@pytest.fixture(scope="module")
def llama(make_peft_adapter, tmp_path_factory):
    """float32 Llama adapter, its base, and its artifacts: LoRA of task 1, task-all dir, dense of task 1."""
    adapter, base = make_peft_adapter("llama")
    out = tmp_path_factory.mktemp("verify-llama")
    return {"adapter": adapter, "base": base, "lora1": collapse(adapter, out / "lora1", "1"),
            "all": collapse(adapter, out / "all", "all"),
            "dense1": collapse(adapter, out / "dense1", "1", "--to", "dense", "--base", base), "out": out}


@pytest.fixture(scope="module")
def llama_bf16(make_peft_adapter, tmp_path_factory):
    adapter, base = make_peft_adapter("llama", dtype=torch.bfloat16)
    out = tmp_path_factory.mktemp("verify-bf16")
    return {"adapter": adapter, "base": base, "lora1": collapse(adapter, out / "lora1", "1"),
            "all": collapse(adapter, out / "all", "all"),
            "dense1": collapse(adapter, out / "dense1", "1", "--to", "dense", "--base", base), "out": out}


def verify_json(adapter, base, *extra) -> tuple[int, dict]:
    base_args = () if base is None else ("--base", base)
    got = run("verify", adapter, *base_args, "--json", *extra)
    return got.exit_code, json.loads(got.stdout)


# ---- good artifacts pass ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind,task", [("llama", None), ("bert", "1"), ("t5", "uniform"), ("qwen2", "mean")])
def test_self_check_passes(make_peft_adapter, kind, task):
    adapter, base = make_peft_adapter(kind)
    code, report = verify_json(adapter, base, *(["--task", task] if task else []))
    assert code == 0 and report["passed"]
    expected_tasks = [0, 1, 2] if task is None else [int(task) if task.isdigit() else task]
    assert [c["task"] for c in report["checks"]] == [t for t in expected_tasks for _ in ("lora", "dense")]
    assert all(c["max_rel_err"] < 1e-5 and c["adapter_effect"] > 1e-3 and not c["noop"] for c in report["checks"])
    want = {"causal": ["logits"], "encoder": ["last_hidden_state", "pooler_output"],
            "seq2seq": ["encoder_last_hidden_state", "logits"]}[report["family"]]
    assert report["outputs"] == want


@pytest.mark.parametrize("which", ["llama", "llama_bf16"])
def test_good_artifacts_pass(request, which):
    art = request.getfixturevalue(which)
    code, report = verify_json(art["adapter"], art["base"], "--against", art["lora1"], "--against", art["all"])
    assert code == 0, report
    assert [(c["task"], c["kind"], Path(c["artifact"]).name) for c in report["checks"]] == [
        (1, "lora", "lora1"), (1, "lora", "task-1"), (0, "lora", "task-0"), (2, "lora", "task-2")]
    assert all(c["dtype"] == "float32" and c["max_rel_err"] < 1e-5 for c in report["checks"])
    code, report = verify_json(art["adapter"], art["base"], "--against", art["dense1"], "--task", "1")
    assert code == 0, report
    (check,) = report["checks"]
    assert check["kind"] == "dense" and check["dtype"] == ("bfloat16" if which == "llama_bf16" else "float32")
    assert check["top1_agreement"] == 1.0


def strip_provenance(src: Path, dst: Path) -> Path:
    """A copy of a dense artifact whose shards carry only {"format": "pt"}: as if made elsewhere."""
    shutil.copytree(src, dst)
    for shard in dst.glob("*.safetensors"):
        save_file(load_file(shard), shard, metadata={"format": "pt"})
    return dst


def test_dense_provenance_is_read_from_shard_metadata(llama):
    sha = load_adapter(llama["adapter"]).sha256
    from polytool.formats.safetensors import SafetensorsFile

    with SafetensorsFile(llama["dense1"] / "model.safetensors") as st:  # collapse stamped it
        assert st.metadata["polytool.source_sha256"] == sha and st.metadata["polytool.task"] == "1"
    code, report = verify_json(llama["adapter"], llama["base"], "--against", llama["dense1"])
    assert code == 0 and report["checks"][0]["task"] == 1
    keep = lambda t: None  # noqa: E731  (metadata only)
    other = edit_tensor(llama["dense1"], llama["out"] / "dense-other", "model.safetensors", W_KEY, keep,
                        **{"polytool.source_sha256": "0" * 64, "polytool.task": "1"})
    got = run("verify", llama["adapter"], "--base", llama["base"], "--against", other)
    assert got.exit_code == 2 and "was collapsed from another adapter (provenance sha256 000000000000" in got.stderr


def test_human_report_and_summary(llama):
    inputs = [llama[k] for k in ("adapter", "base", "lora1")]
    before = [tree_hash(p) for p in inputs]
    got = run("verify", llama["adapter"], "--base", llama["base"], "--against", llama["lora1"])
    assert got.exit_code == 0 and [tree_hash(p) for p in inputs] == before  # inputs are never written
    lines = got.stdout.splitlines()
    assert lines[-1] == "summary: PASS: 1 of 1 checks passed, 0 failed"
    assert any(line.startswith("PASS  task 1   lora") and str(llama["lora1"]) in line for line in lines)


# ---- the LoRA applier is PEFT's LoRA -------------------------------------------------------------


def test_lora_applier_matches_peft(llama, tmp_path):
    from peft import PeftModel

    rslora = tmp_path / "rslora"
    shutil.copytree(llama["lora1"], rslora)
    config = json.loads((rslora / "adapter_config.json").read_text())
    (rslora / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True, "lora_alpha": 3}))
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    base = torch_base(llama["base"])
    plain = base(ids).logits
    outputs = []
    for lora_dir in (llama["lora1"], rslora, llama["all"] / "task-0"):
        peft_out = PeftModel.from_pretrained(torch_base(llama["base"]), lora_dir).eval()(input_ids=ids).logits
        lora = read_lora(lora_dir)
        handles = attach_lora(linear_layers(base), lora)
        with torch.no_grad():
            ours = base(ids).logits
        for handle in handles:
            handle.remove()
        torch.testing.assert_close(ours, peft_out, rtol=1e-5, atol=1e-6)
        outputs.append(ours)
    assert read_lora(rslora).scaling("model.layers.0.self_attn.q_proj") == pytest.approx(3 / 3 ** 0.5)
    for a, b in [(outputs[0], plain), (outputs[0], outputs[1]), (outputs[0], outputs[2])]:  # negative controls
        assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(base(ids).logits, plain)  # hooks removed: the plain base again


def test_lora_saved_by_peft_needs_task_and_passes(llama, tmp_path):
    """A LoRA re-saved by PEFT (its full config, no provenance) is an artifact made elsewhere."""
    from peft import PeftModel

    PeftModel.from_pretrained(torch_base(llama["base"]), llama["lora1"]).save_pretrained(tmp_path / "peft")
    got = run("verify", llama["adapter"], "--base", llama["base"], "--against", tmp_path / "peft")
    assert got.exit_code == 2 and "has no polytool provenance (made elsewhere?): pass --task" in got.stderr
    code, report = verify_json(llama["adapter"], llama["base"], "--against", tmp_path / "peft", "--task", "1")
    assert code == 0 and report["checks"][0]["notes"] == []


def test_reference_peft_gives_the_same_verdicts(llama):
    """--reference peft: PEFT's Poly model as the reference and PEFT's loader for the LoRA artifacts."""
    ours = verify_json(llama["adapter"], llama["base"], "--against", llama["lora1"], "--against", llama["all"])
    theirs = verify_json(llama["adapter"], llama["base"], "--against", llama["lora1"], "--against", llama["all"],
                         "--reference", "peft")
    assert ours[0] == theirs[0] == 0
    assert "PEFT" in theirs[1]["reference"] and "independent" in ours[1]["reference"]
    for a, b in zip(ours[1]["checks"], theirs[1]["checks"]):
        assert a["passed"] and b["passed"] and b["max_rel_err"] <= 1e-5


def test_reference_peft_without_peft_is_one_line(llama, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now fails
    got = run("verify", llama["adapter"], "--base", llama["base"], "--reference", "peft")
    assert got.exit_code == 2 and got.stderr.strip() == "error: --reference peft needs PEFT: pip install peft"


def torch_base(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval().requires_grad_(False)


# ---- corruptions fail, naming the task and the artifact ------------------------------------------


def assert_fails(got, task: str, artifact: Path, *words: str) -> None:
    assert got.exit_code == 1, got.output
    fail = [line for line in got.stdout.splitlines() if line.startswith("FAIL")]
    assert fail and all(f"{task} " in line and str(artifact) in line for line in fail), got.stdout
    assert all(word in got.stdout for word in words), got.stdout
    assert got.stdout.splitlines()[-1].startswith("summary: FAIL") and "FAIL:" in got.stderr


def test_nudged_lora_b_fails(llama):
    bad = edit_tensor(llama["lora1"], llama["out"] / "nudged-lora", "adapter_model.safetensors", B_KEY, nudge)
    got = run("verify", llama["adapter"], "--base", llama["base"], "--against", bad)
    assert_fails(got, "task 1", bad, "module model.layers.0.self_attn.q_proj is the first to differ")


@pytest.mark.parametrize("which", ["llama", "llama_bf16"])
def test_nudged_merged_weight_fails(request, which):
    art = request.getfixturevalue(which)
    bad = edit_tensor(art["dense1"], art["out"] / "nudged-dense", "model.safetensors", W_KEY, nudge)
    got = run("verify", art["adapter"], "--base", art["base"], "--against", bad, "--task", "1")
    assert_fails(got, "task 1", bad, "weight model.layers.1.mlp.down_proj.weight is not what it should be")


def test_swapped_task_fails(llama):
    got = run("verify", llama["adapter"], "--base", llama["base"], "--against", llama["lora1"], "--task", "0")
    assert_fails(got, "task 0", llama["lora1"], "its provenance says it holds task 1, but task 0 was asked (--task)")


def test_wrong_scaling_fails(llama):
    bad = llama["out"] / "alpha2"
    shutil.copytree(llama["lora1"], bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 2}))
    assert_fails(run("verify", llama["adapter"], "--base", llama["base"], "--against", bad), "task 1", bad)


def test_one_wrong_element_in_any_module_is_caught(make_peft_adapter, tmp_path):
    """+0.5 on one lora_B element of each module in turn (BERT: 11 modules, the pooler included)."""
    adapter_dir, base = make_peft_adapter("bert")
    adapter = load_adapter(adapter_dir)
    lora = read_lora(collapse(adapter_dir, tmp_path / "bert-lora", "2"))
    targets = []
    for name, (A, B) in lora.weights.items():
        B = B.copy()
        B[B.shape[0] // 2, 0] += 0.5
        nudged = dataclasses.replace(lora, weights={**lora.weights, name: (A, B)})
        targets.append(V.Target(2, "lora", name, "float32", lora=nudged))
    batches, _ = V.random_inputs(V.base_config(base), V.DEFAULT_INPUTS, V.DEFAULT_SEQ_LEN)
    _, checks = V.run_checks(adapter, base, ("AutoModel", "encoder"), targets, batches)
    assert len(checks) == len(adapter.modules) == 11
    assert all(not c["passed"] and c["first_failing_module"] == c["artifact"] for c in checks), checks


# ---- refused inputs (exit 2) ---------------------------------------------------------------------


def test_artifact_of_another_adapter_is_refused(llama, make_peft_adapter, tmp_path):
    other, _ = make_peft_adapter("llama", seed=2)
    lora = collapse(other, tmp_path / "other", "1")
    got = run("verify", llama["adapter"], "--base", llama["base"], "--against", lora)
    assert got.exit_code == 2 and "was collapsed from another adapter" in got.stderr and got.stdout == ""
    got = run("verify", llama["adapter"], "--base", llama["base"], "--against", collapse(other, tmp_path / "oall", "all"))
    assert got.exit_code == 2 and "polytool_tasks.json: was collapsed from another adapter" in got.stderr


def test_bad_inputs_exit_2(llama, tmp_path):
    a, b = llama["adapter"], llama["base"]
    corrupt = tmp_path / "corrupt"
    shutil.copytree(llama["lora1"], corrupt)
    data = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    other_model = tmp_path / "gpt2"
    build_base("gpt2").save_pretrained(other_model)
    cases = [
        (("--base", tmp_path / "nope"), "no such base model directory"),
        (("--base", b, "--against", corrupt), "truncated"),
        (("--base", b, "--task", "7"), "task '7' is not a task spec of this adapter: expected a task id in [0, 3)"),
        (("--base", b, "--task", "seven"), "task 'seven' is not a task spec of this adapter"),
        (("--base", b, "--against", strip_provenance(llama["dense1"], tmp_path / "bare")), "has no polytool provenance"),
        (("--base", b, "--against", tmp_path), "not a collapsed artifact"),
        (("--base", b, "--against", a), "not 'LORA'"),
        (("--base", b, "--against", llama["all"], "--task", "uniform"), "holds no LoRA for task uniform"),
        (("--base", b, "--against", other_model, "--task", "1"), "is a 'gpt2' model, the base a 'llama' one"),
        (("--base", b, "--prompts", tmp_path / "none.txt"), "cannot read the prompts file"),
        (("--base", b, "--seq-len", "1000"), "max_position_embeddings"),
    ]
    if not torch.cuda.is_available():
        cases.append((("--base", b, "--device", "cuda"), "no CUDA device is available"))
    for args, message in cases:
        got = run("verify", a, *args)
        assert got.exit_code == 2 and message in got.stderr, (args, got.output)
        assert "Traceback" not in got.output


def test_unknown_lora_feature_is_refused(llama, tmp_path):
    dora = tmp_path / "dora"
    shutil.copytree(llama["lora1"], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    got = run("verify", llama["adapter"], "--base", llama["base"], "--against", dora)
    assert got.exit_code == 2 and "uses the LoRA feature use_dora=True, which polytool cannot apply" in got.stderr


def test_prompts_need_a_tokenizer_and_work_with_one(llama, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat sat\n\non the mat with a hat\n")
    got = run("verify", llama["adapter"], "--base", llama["base"], "--task", "0", "--prompts", prompts)
    assert got.exit_code == 2 and "has no usable tokenizer for --prompts" in got.stderr
    base = tmp_path / "base-with-tokenizer"
    shutil.copytree(llama["base"], base)
    words = "[UNK] the cat sat on mat with a hat".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(base)
    code, report = verify_json(llama["adapter"], base, "--task", "0", "--prompts", prompts)
    assert code == 0 and report["inputs"]["source"] == "prompts" and report["inputs"]["sequences"] == 2


# ---- the no-op control, and JSON vs human output -------------------------------------------------


@pytest.fixture(scope="module")
def noop_adapter(make_base, tmp_path_factory):
    """A freshly initialised PEFT Poly adapter (B = 0): it changes nothing."""
    from peft import PolyConfig, get_peft_model

    base = make_base("llama")
    model = get_peft_model(build_base("llama"), PolyConfig(task_type=TASK_TYPES["llama"], r=2, n_tasks=2, n_skills=2,
                                                           target_modules=["q_proj", "v_proj"]))
    out = tmp_path_factory.mktemp("noop")
    model.save_pretrained(out)
    return out, base


def test_noop_adapter_fails_unless_allowed(noop_adapter):
    adapter, base = noop_adapter
    got = run("verify", adapter, "--base", base, "--task", "1")
    assert got.exit_code == 1 and "no-op: the adapter does not change the base's output" in got.stdout
    code, report = verify_json(adapter, base, "--allow-noop")
    assert code == 0 and all(c["noop"] and c["passed"] and c["adapter_effect"] == 0 for c in report["checks"])


def test_a_noop_of_small_outputs_says_atol_covers_the_effect():
    """Outputs of scale 1.35e-5 (SwiftFormer at init) moved 0.17% by the adapter: within atol 1e-5, so a no-op,
    and the reason says why and how to judge them relative to their scale; with atol 0 the check passes.
    Control: an effect of 0 (a fresh adapter) gets no such clause."""
    from types import SimpleNamespace

    from polytool.verify.compare import Measured, Rule, make_check

    target = SimpleNamespace(notes=[], spec=1, label="dense", kind="dense", dtype="float32")
    final = {"logits": (1.8e-12, 1.35e-5)}
    small = make_check(target, Measured(final, {}, {"logits": (2.31e-8, 1.35e-5)}), Rule((1e-5, 1e-5)))
    assert small["noop"] and not small["passed"]
    assert "(logits is small, max |b| 1.35e-05: the adapter moves it by 2.31e-08, 1.7e-03 of that, under atol " \
           "1e-05; a smaller --atol, 0 for max |b| alone" in small["reason"]
    assert make_check(target, Measured(final, {}, {"logits": (2.31e-8, 1.35e-5)}), Rule((0.0, 1e-5)))["passed"]
    none = make_check(target, Measured(final, {}, {"logits": (0.0, 1.35e-5)}), Rule((1e-5, 1e-5)))
    assert none["noop"] and "--atol" not in none["reason"]


def test_json_agrees_with_human_output(llama):
    bad = edit_tensor(llama["lora1"], llama["out"] / "json-nudged", "adapter_model.safetensors", B_KEY, nudge)
    args = ("verify", llama["adapter"], "--base", llama["base"], "--against", llama["all"], "--against", bad)
    human, machine = run(*args), run(*args, "--json")
    assert human.exit_code == machine.exit_code == 1
    report = json.loads(machine.stdout)
    assert report["passed"] is False and report["summary"] == {"checks": 4, "passed": 3, "failed": 1}
    lines = [line for line in human.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert [line.startswith("PASS") for line in lines] == [c["passed"] for c in report["checks"]]
    for line, check in zip(lines, report["checks"]):
        assert check["artifact"] in line and f"task {check['task']} " in line
        assert set(check) >= {"task", "artifact", "kind", "max_abs_err", "max_rel_err", "top1_agreement", "atol",
                              "rtol", "passed"}


def test_base_defaults_to_the_adapters_recorded_base(llama):
    code, report = verify_json(llama["adapter"], None, "--task", "0")  # no --base: base_model_name_or_path
    assert code == 0 and Path(report["base"]) == llama["base"]
    assert [c["kind"] for c in report["checks"]] == ["lora", "dense"]
