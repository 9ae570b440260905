"""`polytool adapt`: a new task learned from JSONL examples. Routing-only training leaves every other byte of
the adapter as it was; PEFT loads the result and routes the new task as polytool does (and as its collapsed
LoRA does); bad data is exit 2 naming the line, nothing written on any error; same seed, same bytes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import tree_hash
from safetensors import safe_open

from polytool.cli import main

ROOT = Path(__file__).resolve().parent.parent
ADAPTER, BASE, DATA = ROOT / "fixtures" / "mhr", ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "adapt-shift3.jsonl"
WEIGHTS = "adapter_model.safetensors"
NEW = 4  # fixtures/mhr has tasks 0..3
INPUT_HASH = tree_hash(ADAPTER)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train fastest on one thread, and on a shared machine two threads can be 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(*args: str):
    return CliRunner().invoke(main, ["adapt", str(ADAPTER), "--base", str(BASE), *args])


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / WEIGHTS), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="session")
def adapted(tmp_path_factory):
    """(output directory, JSON report) of a short routing-only run on the shipped fixtures."""
    out = tmp_path_factory.mktemp("adapt") / "new"
    res = run("--data", str(DATA), "--out", str(out), "--steps", "6", "--lr", "0.2", "--seed", "3", "--json")
    assert res.exit_code == 0, res.output
    return out, json.loads(res.stdout)


def test_routing_only_changes_only_the_new_row(adapted):
    out, report = adapted
    old, new = tensors(ADAPTER), tensors(out)
    assert list(new) == list(old)
    for key, tensor in old.items():
        if key.endswith("module_logits"):
            assert new[key].shape == (tensor.shape[0] + 1, tensor.shape[1])
            assert new[key][:-1].numpy().tobytes() == tensor.numpy().tobytes(), key
            assert new[key][-1].abs().max() > 1e-3, key  # moved away from the uniform init (zeros)
        else:
            assert new[key].numpy().tobytes() == tensor.numpy().tobytes(), key
    config_in = json.loads((ADAPTER / "adapter_config.json").read_text())
    config_out = json.loads((out / "adapter_config.json").read_text())
    assert config_out == {**config_in, "n_tasks": config_in["n_tasks"] + 1}
    assert tree_hash(ADAPTER) == INPUT_HASH  # the input is never written
    assert report["task"] == NEW and report["changed_tasks"] == [] and report["n_tasks"] == 5


def test_only_the_new_rows_train_and_hold_optimizer_state(adapted):
    _, report = adapted
    modules, q_times_s = 8, 4 * 4  # fixtures/mhr: 2 layers x 4 targets, n_splits 4 x n_skills 4
    assert report["trainable_parameters"] == modules * q_times_s
    assert report["optimizer_state_numel"] == 2 * modules * q_times_s + modules  # AdamW moments + step counts


def test_frozen_tensors_get_no_gradient():
    from polytool.adapt.model import build
    from polytool.adapt.train import TrainSettings, train
    from polytool.adapt.data import read_examples, tokenize
    from polytool.formats.adapter import load_adapter

    model = build(load_adapter(ADAPTER), BASE, "mean", "routing")
    items = tokenize(read_examples(DATA), model.tokenizer, False, 256, DATA)
    train(model, items[:8], TrainSettings(steps=2, lr=0.1, batch_size=4, seed=0))
    trainable = {id(p) for p in model.trainable.values()}
    grads = [n for n, p in model.poly.named_parameters() if id(p) not in trainable and p.grad is not None]
    frozen = [n for n, p in model.poly.named_parameters() if id(p) not in trainable and p.requires_grad]
    assert not grads and not frozen and len(trainable) == 8
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable.values())


def test_provenance(adapted):
    out, report = adapted
    record = json.loads((out / "polytool_adapt.json").read_text())
    import hashlib

    assert record["data_sha256"] == hashlib.sha256(DATA.read_bytes()).hexdigest()
    assert record["source_sha256"] == hashlib.sha256((ADAPTER / WEIGHTS).read_bytes()).hexdigest()
    assert (record["steps"], record["lr"], record["train"], record["seed"], record["task"]) == (6, 0.2, "routing", 3, NEW)
    with safe_open(str(out / WEIGHTS), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and json.loads(meta["polytool.adapt"]) == record
    before, after = report["eval_loss"]["before"], report["eval_loss"]["after"]
    assert report["examples"] == {"train": 32, "eval": 8} and after < before  # 6 steps already help


@pytest.fixture(scope="module")
def routed(adapted):
    """Logits of one batch on the new task and on task 0: PEFT's model, polytool's, and the collapsed LoRA."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from polytool import PolyModel

    out, _ = adapted
    ids = torch.tensor([[5 + (7 * i + 3 * j) % 90 for j in range(12)] for i in range(3)])  # (3, 12)
    lora = out.parent / "lora-new"
    res = CliRunner().invoke(main, ["collapse", str(out), "--task", str(NEW), "--base", str(BASE), "--out", str(lora)])
    assert res.exit_code == 0, res.output
    results = {}
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(BASE).eval()
        results["base"] = base(input_ids=ids).logits
        peft = PeftModel.from_pretrained(base, out).eval()
        for task in (NEW, 0):
            results["peft", task] = peft(input_ids=ids, task_ids=torch.full((3,), task)).logits
        ours = PolyModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), out).eval()
        for task in (NEW, 0):
            results["ours", task] = ours(input_ids=ids, task_ids=task).logits
        results["lora"] = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), lora).eval()(
            input_ids=ids).logits
    return results


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_peft_routes_the_new_task_as_polytool_and_its_lora_do(routed):
    want = routed["peft", NEW]
    assert rel(routed["ours", NEW], want) <= 1e-5
    assert rel(routed["lora"], want) <= 1e-5
    assert rel(routed["ours", 0], routed["peft", 0]) <= 1e-5
    # negative controls: another task routes differently, and the adapter changes the base's output
    assert rel(routed["peft", 0], want) > 1e-3
    assert rel(routed["base"], want) > 1e-3


def test_commands_work_on_the_result(adapted, tmp_path):
    out, _ = adapted
    inspected = CliRunner().invoke(main, ["inspect", str(out), "--json"])
    assert inspected.exit_code == 0 and json.loads(inspected.stdout)["n_tasks"] == 5
    merged = CliRunner().invoke(main, ["merge", f"{out}:{NEW}", f"{out}:1", "--out", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    verified = CliRunner().invoke(main, ["verify", str(out), "--base", str(BASE), "--task", str(NEW), "--inputs", "2"])
    assert verified.exit_code == 0, verified.output


def test_same_seed_same_bytes_other_seed_differs(adapted, tmp_path):
    out, _ = adapted
    again = run("--data", str(DATA), "--out", str(tmp_path / "again"), "--steps", "6", "--lr", "0.2", "--seed", "3")
    other = run("--data", str(DATA), "--out", str(tmp_path / "other"), "--steps", "6", "--lr", "0.2", "--seed", "4")
    assert again.exit_code == 0 and other.exit_code == 0, again.output + other.output
    assert (tmp_path / "again" / WEIGHTS).read_bytes() == (out / WEIGHTS).read_bytes()
    assert (tmp_path / "other" / WEIGHTS).read_bytes() != (out / WEIGHTS).read_bytes()


BAD_LINES = {
    "not json": ("{\"text\": \"abc\"", "line 3: invalid JSON"),
    "not an object": ("[1, 2]", "line 3: expected a JSON object"),
    "no text": ("{\"txt\": \"abc\"}", "line 3: expected \"text\", or \"input\" and \"target\" (keys found: txt)"),
    "no target": ("{\"input\": \"abc\"}", "line 3: \"target\" must be a string (missing)"),
    "a number": ("{\"text\": 7}", "line 3: \"text\" must be a string (a int)"),
    "empty": ("{\"text\": \"\"}", "line 3: \"text\" is empty"),
    "both": ("{\"text\": \"ab\", \"input\": \"a\", \"target\": \"b\"}", "line 3: give either"),
    "too short": ("{\"text\": \"a\"}", "line 3: gives no token to learn from"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_a_bad_line_is_exit_2_naming_it_and_nothing_is_written(case, tmp_path):
    line, message = BAD_LINES[case]
    data = tmp_path / "data.jsonl"
    data.write_text("{\"text\": \"abcdef\"}\n\n" + line + "\n{\"text\": \"ghijkl\"}\n")
    res = run("--data", str(data), "--out", str(tmp_path / "out"), "--steps", "1")
    assert res.exit_code == 2 and message in res.stderr and str(data) in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


@pytest.mark.parametrize("args, message", [
    (["--init", "9"], "--init must be uniform, mean or a task id 0..3, got '9'"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--lr", "-1"], "--lr must be a finite number > 0"),
    (["--eval-split", "1"], "--eval-split must be in [0, 1)"),
])
def test_bad_options_are_exit_2(args, message, tmp_path):
    res = run("--data", str(DATA), "--out", str(tmp_path / "out"), *args)
    assert res.exit_code == 2 and message in res.stderr, res.output
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(adapted, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    res = run("--data", str(DATA), "--out", str(out), "--steps", "1")
    assert res.exit_code == 2 and "already exists" in res.stderr and not any(out.iterdir())


def test_interrupt_writes_nothing(tmp_path):
    from polytool.adapt.command import AdaptOptions, adapt

    def interrupt(state: dict) -> None:
        if state["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        adapt(AdaptOptions(ADAPTER, DATA, tmp_path / "out", BASE, steps=5), progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_the_example_data_is_what_its_script_makes(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "fixtures"))
    import make_adapt_data

    assert DATA.read_text(encoding="utf-8") == "\n".join(make_adapt_data.lines()) + "\n"


def test_initial_rows():
    from polytool.adapt.model import initial_row

    table = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    assert initial_row(table, "uniform").tolist() == [0.0, 0.0]
    assert initial_row(table, "mean").tolist() == [2.0, 1.0]
    assert initial_row(table, 1).tolist() == [3.0, 4.0]


def test_train_all_changes_the_skills_and_says_so(tmp_path):
    out = tmp_path / "all"
    res = run("--data", str(DATA), "--out", str(out), "--steps", "2", "--train", "all", "--init", "1", "--json")
    assert res.exit_code == 0, res.output
    report, record = json.loads(res.stdout), json.loads((out / "polytool_adapt.json").read_text())
    assert report["changed_tasks"] == record["changed_tasks"] == [0, 1, 2, 3] and "existing tasks" in record["note"]
    old, new = tensors(ADAPTER), tensors(out)
    skills = [k for k in old if k.endswith(("poly_lora_A", "poly_lora_B"))]
    assert all(not torch.equal(old[k], new[k]) for k in skills)
    logits = [k for k in old if k.endswith("module_logits")]
    assert all(torch.equal(old[k], new[k][:-1]) for k in logits)


@pytest.fixture(scope="module")
def t5_case(tmp_path_factory):
    """A tiny T5 base with the fixtures' character tokenizer, and a PEFT-written SEQ_2_SEQ_LM Poly adapter."""
    import transformers as tf
    from peft import PolyConfig, get_peft_model
    from conftest import randomize_poly

    root = tmp_path_factory.mktemp("adapt-t5")
    torch.manual_seed(0)
    cfg = tf.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_decoder_layers=1, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=2)
    tf.T5ForConditionalGeneration(cfg).save_pretrained(root / "base")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BASE / name, root / "base" / name)
    base = tf.T5ForConditionalGeneration.from_pretrained(root / "base")
    model = get_peft_model(base, PolyConfig(task_type="SEQ_2_SEQ_LM", r=2, n_tasks=2, n_skills=3, n_splits=2,
                                            target_modules=["q", "v"]))
    randomize_poly(model)
    model.save_pretrained(root / "adapter")
    lines = [json.dumps({"input": f"copy {w}", "target": w}) for w in ("abc", "hello", "poly", "route", "skill", "mix")]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_seq2seq_learns_the_target_only_routing(t5_case, tmp_path):
    out = tmp_path / "t5"
    res = CliRunner().invoke(main, ["adapt", str(t5_case / "adapter"), "--base", str(t5_case / "base"), "--data",
                                    str(t5_case / "data.jsonl"), "--out", str(out), "--steps", "3", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["examples"] == {"train": 5, "eval": 1}
    old, new = tensors(t5_case / "adapter"), tensors(out)
    assert all(torch.equal(old[k], new[k][:-1] if k.endswith("module_logits") else new[k]) for k in old)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{\"input\": \"a\", \"target\": \"b\"}\n{\"text\": \"no target here\"}\n")
    res = CliRunner().invoke(main, ["adapt", str(t5_case / "adapter"), "--base", str(t5_case / "base"), "--data",
                                    str(bad), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "line 2: this base is an encoder-decoder model" in res.stderr


def test_the_worked_example_in_the_docs_is_the_real_output(tmp_path, monkeypatch):
    import re

    monkeypatch.chdir(ROOT)  # the example shows relative paths
    doc = (ROOT / "docs" / "adapt.md").read_text(encoding="utf-8")
    command, shown = re.search(r"^\$ (polytool adapt fixtures/mhr .*?)\n(.*?)^```", doc, re.M | re.S).groups()
    args = command.split()[1:]
    args[args.index("--out") + 1] = str(tmp_path / "mhr-shift3")
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    got = res.stdout.replace(str(tmp_path / "mhr-shift3"), "out/mhr-shift3").splitlines()
    assert got[:2] == shown.splitlines()[:2]  # the third line is the speed, which varies


def test_progress_line_and_no_held_out_set(capsys, tmp_path):
    from polytool.cli.adapt import _Progress

    bar = _Progress()
    bar({"step": 3, "steps": 5, "loss": 2.0, "examples_per_s": 10.25})
    bar.end()
    assert capsys.readouterr().err == "\rstep 3/5  loss 2.0000  10.2 examples/s\n"
    res = run("--data", str(DATA), "--out", str(tmp_path / "out"), "--steps", "1", "--eval-split", "0")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[1] == "  no held-out loss (--eval-split 0)"
    assert "on 40 examples" in res.stdout and res.stderr == ""  # no progress line when stderr is not a terminal
