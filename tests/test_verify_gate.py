"""The gate cannot be fooled: NaN anywhere fails, half-precision merges are judged against their own
rounding floor and checked weight by weight, KL divergence gates language models."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from polytool.formats.adapter import load_adapter
from polytool.cli import main
from polytool.verify import Target, VerifyOptions, run_checks
from polytool.verify.compare import errors, within
from polytool.verify.inputs import prompt_inputs
from polytool.verify.weights import ulps

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
EMBED = "model.embed_tokens.weight"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def verify_json(*args) -> tuple[int, dict]:
    res = cli("verify", *args, "--json")
    return res.exit_code, json.loads(res.stdout)


@pytest.fixture(scope="module")
def dense2(tmp_path_factory):
    out = tmp_path_factory.mktemp("gate") / "dense2"
    assert cli("collapse", FIXTURES / "mhr", "--task", "2", "--to", "dense", "--out", out).exit_code == 0
    return out


def with_tensor(src: Path, dst: Path, key: str, change) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    from polytool.formats.safetensors import SafetensorsFile

    with SafetensorsFile(dst / "model.safetensors") as st:
        metadata = dict(st.metadata)
    change(tensors[key])
    save_file(tensors, dst / "model.safetensors", metadata=metadata)
    return dst


# ---- finding 1: NaN after the first batch ---------------------------------------------------------


def test_nan_in_a_later_batch_is_an_infinite_error():
    ref = {"logits": [torch.ones(2, 3), torch.ones(2, 3)]}
    out = {"logits": [torch.ones(2, 3), torch.tensor([[1.0, math.nan, 1.0], [1.0, 1.0, 1.0]])]}
    assert errors(out, ref)["logits"][0] == math.inf  # Python's max() would have dropped it
    assert within(errors(out, ref), 1e-5, 1e-5) == ["logits"]
    assert within(errors(ref, ref), 1e-5, 1e-5) == []  # the control


def test_nan_in_one_module_only_is_named():
    ref = {"a": [torch.ones(4)], "b": [torch.ones(4)], "c": [torch.ones(4)]}
    out = {"a": [torch.ones(4)], "b": [torch.tensor([1.0, 1.0, math.inf, 1.0])], "c": [torch.ones(4)]}
    assert within(errors(out, ref), 1e-5, 1e-5) == ["b"]


def test_nan_in_the_last_prompt_only_fails_in_the_forward(tmp_path):
    """The review's case: one embedding row NaN, for a character only the last prompt uses. The forward alone
    (weight-space check left out) must fail; through the CLI the weight check names the tensor first. A
    bfloat16 merge of the float32 base is run whole (every tensor converted), so its embeddings are its own."""
    dense = tmp_path / "dense-bf16"
    assert cli("collapse", FIXTURES / "mhr", "--task", "2", "--to", "dense", "--dtype", "bfloat16", "--out",
               dense).exit_code == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("abc abc\nbcd cab\nzebra\n")
    token = 4 + ord("z") - ord(" ")  # the char tokenizer: ' ' is id 4, then ASCII order
    bad = with_tensor(dense, tmp_path / "nan", EMBED, lambda t: t[token].fill_(math.nan))
    adapter = load_adapter(FIXTURES / "mhr")
    batches, _ = prompt_inputs(FIXTURES / "tiny-llama", prompts, None)
    assert all(token not in b["input_ids"] for b in batches[:2]) and token in batches[2]["input_ids"]
    for path, passes in ((bad, False), (dense, True)):  # the unbroken merge is the control
        target = Target(2, "dense", str(path), "bfloat16", path=path)
        _, checks = run_checks(adapter, FIXTURES / "tiny-llama", ("AutoModelForCausalLM", "causal"), [target],
                               batches)
        assert checks[0]["passed"] is passes, checks[0]
    assert "NaN or Inf" in run_checks(adapter, FIXTURES / "tiny-llama", ("AutoModelForCausalLM", "causal"),
                                      [Target(2, "dense", str(bad), "bfloat16", path=bad)], batches)[1][0]["reason"]
    code, rep = verify_json(FIXTURES / "mhr", "--against", bad, "--prompts", prompts)
    assert code == 1 and EMBED in rep["checks"][0]["reason"]


def test_nan_in_the_reference_is_exit_2(tmp_path):
    """An adapter whose update overflows float32: the routed model itself is not finite, no comparison."""
    adapter = tmp_path / "adapter"
    shutil.copytree(FIXTURES / "mhr", adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.poly_lora_B"))
    tensors[key].fill_(1e38)
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    res = cli("verify", adapter, "--task", "0")
    assert res.exit_code == 2 and "the routed model produces NaN or Inf" in res.stderr and "Traceback" not in res.output


# ---- finding 4: half precision against its own floor ----------------------------------------------


@pytest.fixture(scope="module")
def bf16(make_peft_adapter, tmp_path_factory):
    adapter, base = make_peft_adapter("llama", dtype=torch.bfloat16, seed=3)
    out = tmp_path_factory.mktemp("gate-bf16")
    res = cli("collapse", adapter, "--task", "1", "--to", "dense", "--base", base, "--out", out / "dense")
    assert res.exit_code == 0, res.output
    return adapter, base, out / "dense"


def test_a_correct_bf16_merge_passes_with_its_floor_reported(bf16):
    adapter, base, dense = bf16
    code, rep = verify_json(adapter, "--base", base, "--against", dense)
    assert code == 0, rep
    c = rep["checks"][0]
    assert c["dtype"] == "bfloat16" and c["rounding_floor_rel"] > 0 and c["floor_multiple"] == 2.0
    assert c["weights"]["merged"] == 6 and c["weights"]["max_ulps"] <= 1.0 and c["weights"]["first_bad"] is None


def _bf16_ulp_nudge(t: torch.Tensor, n: int) -> None:
    """Move t[1, 2] by n units in the last place of bfloat16 (through its bit pattern)."""
    bits = t.view(torch.int16)
    bits[1, 2] += n


@pytest.mark.parametrize("n, fails", [(1, False), (2, True)])
def test_one_merged_weight_two_ulps_off_fails(bf16, tmp_path, n, fails):
    adapter, base, dense = bf16
    key = "model.layers.1.mlp.down_proj.weight"
    bad = with_tensor(dense, tmp_path / f"nudged{n}", key, lambda t: _bf16_ulp_nudge(t, n))
    code, rep = verify_json(adapter, "--base", base, "--against", bad)
    # one ulp is what rounding float32 vs float64 sums may differ by; two never are
    assert (code, rep["checks"][0]["weights"]["first_bad"]) == ((1, key) if fails else (0, None)), rep["checks"][0]
    # the nudged element is the one that is not the ideal rounding, measured: between n - 1/2 and n + 1/2 units
    w = rep["checks"][0]["weights"]
    assert w["not_ideal"] == 1 and n - 0.5 <= w["max_ulps"] <= n + 0.5


def test_the_floor_of_an_ideally_rounded_artifact_is_its_own_forward(bf16, monkeypatch):
    """When every element is the ideal rounding, verify does not run the floor's forward again: the figures
    must be those of running it (the control: forced to run, it gives the same numbers)."""
    import polytool.verify as v

    adapter, base, dense = bf16
    code, skipped = verify_json(adapter, "--base", base, "--against", dense)
    assert code == 0 and skipped["checks"][0]["weights"]["not_ideal"] == 0
    ran = []
    floor = v.Run.floor
    monkeypatch.setattr(v, "_ideal_weights", lambda target, dtype: False)
    monkeypatch.setattr(v.Run, "floor", lambda self, *a: ran.append(1) or floor(self, *a))
    code, forced = verify_json(adapter, "--base", base, "--against", dense)
    assert code == 0 and ran == [1]
    keys = ("rounding_floor_rel", "max_rel_err", "module_max_rel_err")
    assert {k: forced["checks"][0][k] for k in keys} == {k: skipped["checks"][0][k] for k in keys}


def test_the_self_checks_floor_is_skipped_only_when_its_product_is_the_ideal(bf16, monkeypatch):
    """The self-check compares its product's dense weights with the ideal rounding as it makes them: equal, the
    floor's forward is not run, and forcing it gives the same figures; a product one ulp off somewhere runs it."""
    import polytool.verify as v

    adapter, base, _ = bf16
    ran = []
    floor = v.Run.floor
    monkeypatch.setattr(v.Run, "floor", lambda self, *a: ran.append(1) or floor(self, *a))
    code, skipped = verify_json(adapter, "--base", base, "--task", "1")
    assert code == 0 and ran == []
    monkeypatch.setattr(v, "_ideal_weights", lambda target, dtype: False)
    code, forced = verify_json(adapter, "--base", base, "--task", "1")
    assert code == 0 and ran == [1]
    keys = ("rounding_floor_rel", "max_rel_err", "module_max_rel_err")
    dense = [[c[k] for k in keys] for rep in (skipped, forced) for c in rep["checks"] if c["kind"] == "dense"]
    assert dense[0] == dense[1]
    monkeypatch.undo()
    monkeypatch.setattr(v.Run, "floor", lambda self, *a: ran.append(2) or floor(self, *a))
    import polytool.verify.run as vrun

    product = vrun._product_dense

    def one_ulp_off(*args):  # the control: the first weight's first element moved by one bf16 ulp
        for i, (name, produce) in enumerate(product(*args)):
            def moved(produce=produce, first=i == 0):
                weight = produce()
                if first:
                    weight.view(torch.int16).view(-1)[0] += 1
                return weight
            yield name, moved

    monkeypatch.setattr(vrun, "_product_dense", one_ulp_off)
    verify_json(adapter, "--base", base, "--task", "1")
    assert ran == [1, 2]


def test_ulps():
    want = np.array([1.0, 3.0, 0.0])
    assert ulps(want + np.array([2 ** -7, 0, 0]), want, "BF16") == pytest.approx(1.0)
    assert ulps(want + np.array([0, 2 ** -6, 0]), want, "BF16") == pytest.approx(1.0)  # 3.0 sits in [2, 4)
    assert ulps(want, want, "F32") == 0.0 and ulps(want + np.array([0, 0, np.nan]), want, "F16") == math.inf


# ---- distributions -----------------------------------------------------------------------------------


def test_kl_is_reported_and_gates(dense2):
    code, rep = verify_json(FIXTURES / "mhr", "--against", dense2)
    c = rep["checks"][0]
    assert code == 0 and 0 <= c["kl_mean"] <= c["kl_max"] < 1e-6
    code, rep = verify_json(FIXTURES / "mhr", "--against", dense2, "--max-kl", 0)
    assert code == 1 and "exceeds --max-kl" in rep["checks"][0]["reason"]


# ---- one model copy -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_one_copy_gives_the_figures_of_loading_the_artifact_whole(dense2, tmp_path, dtype):
    """Streamed into the one model (merged weights only; every tensor where the artifact's dtype is not the
    base's, as --dtype float16 makes it), a dense artifact gives the figures of loading it as a second model."""
    adapter = load_adapter(FIXTURES / "mhr")
    from polytool.verify.inputs import random_inputs
    from polytool.verify.models import base_config

    dense = dense2
    if dtype != "float32":
        dense = tmp_path / dtype
        assert cli("collapse", FIXTURES / "mhr", "--task", "2", "--to", "dense", "--dtype", dtype, "--out",
                   dense).exit_code == 0
    batches, _ = random_inputs(base_config(FIXTURES / "tiny-llama"), 2, 16)
    figures = []
    for one_copy in (True, False):
        target = Target(2, "dense", str(dense), dtype, path=dense)
        _, checks = run_checks(adapter, FIXTURES / "tiny-llama", ("AutoModelForCausalLM", "causal"), [target], batches,
                               VerifyOptions(one_copy=one_copy))
        figures.append({k: checks[0][k] for k in ("passed", "max_abs_err", "module_max_rel_err", "kl_max")})
    assert figures[0] == figures[1] and (figures[0]["passed"] or dtype != "float32")
    # after it the one model holds the base's values again (read back): a check that follows is unchanged
    _, alone = verify_json(FIXTURES / "mhr", "--against", dense2, "--task", 2)
    _, after = verify_json(FIXTURES / "mhr", "--against", dense, "--against", dense2, "--task", 2)
    assert after["checks"][-1]["max_abs_err"] == alone["checks"][0]["max_abs_err"]


def test_a_corrupted_untouched_tensor_is_caught_in_weight_space(dense2, tmp_path):
    key = "model.norm.weight"  # not merged, never swapped into the model: only the weight check sees it
    bad = with_tensor(dense2, tmp_path / "norm", key, lambda t: t.mul_(1.001))
    code, rep = verify_json(FIXTURES / "mhr", "--against", bad)
    assert code == 1 and rep["checks"][0]["weights"]["first_bad"] == key
    assert rep["checks"][0]["max_rel_err"] < 1e-5  # the forward, on one model copy, did not need to see it


# ---- task mixes -----------------------------------------------------------------------------------------


def test_a_task_mix_is_verified_against_the_routed_mix(tmp_path):
    mix = tmp_path / "mix"
    assert cli("collapse", FIXTURES / "mhr", "--task", "1:0.7,3:0.3", "--out", mix).exit_code == 0
    code, rep = verify_json(FIXTURES / "mhr", "--against", mix)
    assert code == 0 and rep["checks"][0]["task"] == "1:0.7,3:0.3"
    code, rep = verify_json(FIXTURES / "mhr", "--against", mix, "--task", "1:0.3,3:0.7")  # the control: another mix
    assert code == 1 and not rep["checks"][0]["passed"]


# ---- merged artifacts (polytool merge) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def merges(tmp_path_factory):
    out = tmp_path_factory.mktemp("merges")
    lora = out / "lora2"
    assert cli("collapse", FIXTURES / "mhr", "--task", "2", "--out", lora).exit_code == 0
    made = {}
    for name, extra in (("lora", []), ("dense", ["--to", "dense"])):
        res = cli("merge", f"{FIXTURES / 'mhr'}:1", lora, "--weights", "0.6,0.4", "--out", out / name, *extra)
        assert res.exit_code == 0, res.output
        made[name] = out / name
    res = cli("merge", f"{FIXTURES / 'mhr'}:1", lora, "--method", "ties", "--density", "0.5", "--rank", "4",
              "--out", out / "ties")
    assert res.exit_code == 0, res.output
    made["ties"] = out / "ties"
    return made


def test_a_linear_merge_is_verified_against_its_recipe(merges):
    code, rep = verify_json(FIXTURES / "mhr", "--against", merges["lora"], "--against", merges["dense"])
    assert code == 0, rep
    assert all(c["task"].startswith("merge:") and c["max_rel_err"] < 1e-5 for c in rep["checks"])
    assert rep["checks"][1]["weights"]["merged"] == 8 and rep["checks"][1]["weights"]["first_bad"] is None


def test_a_merge_with_other_weights_fails(merges, tmp_path):
    from polytool.formats.safetensors import SafetensorsFile

    bad = tmp_path / "swapped"
    shutil.copytree(merges["lora"], bad)
    with SafetensorsFile(bad / "adapter_model.safetensors") as st:
        metadata = dict(st.metadata)
    recipe = json.loads(metadata["polytool.recipe"])
    recipe["weights"] = recipe["weights"][::-1]  # the recipe now claims 0.4, 0.6
    tensors = load_file(bad / "adapter_model.safetensors")
    save_file(tensors, bad / "adapter_model.safetensors", metadata={**metadata, "polytool.recipe": json.dumps(recipe)})
    code, rep = verify_json(FIXTURES / "mhr", "--against", bad)
    assert code == 1 and not rep["checks"][0]["passed"]


def test_a_truncated_linear_merge_is_judged_against_the_optimum(merges, tmp_path):
    """The rank-2 merge differs from the exact merge (its forward alone would fail), but it is the best rank-2
    approximation: each module's error equals the Eckart-Young optimum, and the forward equals the best rank-2."""
    lora = tmp_path / "r2"
    res = cli("merge", f"{FIXTURES / 'mhr'}:1", f"{FIXTURES / 'mhr'}:3", "--rank", "2", "--out", lora)
    assert res.exit_code == 0, res.output
    code, rep = verify_json(FIXTURES / "mhr", "--against", lora)
    check = rep["checks"][0]
    assert code == 0 and check["max_rel_err"] < 1e-5 and "truncated" in check["notes"][0]
    rows = check["truncation"]["modules"]
    assert len(rows) == 8 and all(r["rank"] == 2 and r["passed"] for r in rows)
    assert all(r["error"] > 0.3 and abs(r["error"] - r["optimum"]) <= r["slack"] for r in rows)
    assert "rank optimality" in check["proof"]


def test_a_pruning_merge_is_recomputed(merges):
    code, rep = verify_json(FIXTURES / "mhr", "--against", merges["ties"])
    assert code == 0 and rep["checks"][0]["proof"].startswith("merge recipe recomputed (ties")


def test_a_non_finite_floor_allows_nothing():
    ref = {"logits": [torch.ones(3)]}
    out = {"logits": [torch.full((3,), 2.0)]}
    floor = {"logits": (math.inf, 1.0)}
    assert within(errors(out, ref), 1e-5, 1e-5, floor, 2.0) == ["logits"]
    assert within(errors(out, ref), 1e-5, 1e-5, {"logits": (1.0, 1.0)}, 2.0) == []  # a finite floor of 1 allows it


# ---- larger than memory ---------------------------------------------------------------------------------


def test_max_memory_offloads_and_gives_the_same_verdicts(dense2, tmp_path):
    lora = tmp_path / "lora2"
    assert cli("collapse", FIXTURES / "mhr", "--task", "2", "--out", lora).exit_code == 0
    args = ("--against", dense2, "--against", lora, "--inputs", 2, "--seq-len", 12)
    code, plain = verify_json(FIXTURES / "mhr", *args)
    code_off, off = verify_json(FIXTURES / "mhr", *args, "--max-memory", "100KB", "--offload-dir", tmp_path / "off")
    assert code == code_off == 0 and off["offloaded"] and not plain["offloaded"]  # the model (~0.4 MB) left memory
    for a, b in zip(plain["checks"], off["checks"]):
        assert a["passed"] and b["passed"] and b["max_rel_err"] == pytest.approx(a["max_rel_err"], rel=0.5, abs=1e-6)
        assert b["top1_agreement"] == a["top1_agreement"]
    bad = with_tensor(dense2, tmp_path / "nudged", "model.layers.1.mlp.down_proj.weight", lambda t: t[1, 2].add_(0.5))
    code, rep = verify_json(FIXTURES / "mhr", "--against", bad, "--max-memory", "100KB")  # the control
    assert code == 1 and rep["checks"][0]["first_failing_module"] == "model.layers.1.mlp.down_proj"


def test_max_memory_is_the_runs_budget(dense2):
    """SIZE counts what the process already holds: a budget that leaves room for the model keeps it in memory;
    one smaller than the process (torch alone holds more than the ~0.4 MB model) offloads it. (Half of what it held
    when the test began: the resident set may shrink before the run, as earlier tests' memory is returned.)"""
    from polytool.verify.models import resident_bytes

    held = resident_bytes()
    assert held > 50 * 10**6  # torch and transformers are loaded in this process
    for size, offloaded in ((held + 10**9, False), (held // 2, True)):
        code, rep = verify_json(FIXTURES / "mhr", "--against", dense2, "--inputs", 1, "--max-memory", str(size))
        assert code == 0 and rep["offloaded"] is offloaded, (size, rep["offloaded"])
