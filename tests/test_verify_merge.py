"""verify against every `polytool merge` output: each method, LoRA (rank-truncated) and dense, passes as written
and fails where a wrong formula is put into the product's merge code (the mutant machinery of test_mutations).

verify recomputes the recipe in its own code (polytool/verify/reference_merge.py, truncation.py), so a mutant
of the product's trim, sign election, DARE rescale or generator, or of its truncation, must fail every artifact
it writes (exit 1), and the artifacts it does not write must still pass. The table of exit codes goes into
docs/ci.md between the merge-mutation-table markers (POLYTOOL_WRITE_DOCS=1 rewrites it).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from polytool.cli import main
from test_mutations import Patch, doc_block_is_current, inject, mutated

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
CI_DOC = ROOT / "docs" / "ci.md"
BEGIN, END = "<!-- merge-mutation-table: begin -->", "<!-- merge-mutation-table: end -->"
VERIFY_ARGS = ["--inputs", "2", "--seq-len", "12"]
METHODS = {  # a label -> merge options (DARE's seed given, so that the recorded seed is not the default)
    "linear": ["--method", "linear"], "ties": ["--method", "ties", "--density", "0.5"],
    "ties-mergekit": ["--method", "ties", "--density", "0.4", "--majority-sign", "frequency", "--ties-variant",
                      "mergekit", "--weights", "0.7,-0.5,1.2"],
    "magnitude_prune": ["--method", "magnitude_prune", "--density", "0.5"],
    "dare_linear": ["--method", "dare_linear", "--density", "0.5", "--seed", "7"],
    "dare_ties": ["--method", "dare_ties", "--density", "0.5", "--seed", "7"]}
OUTPUTS = {"lora": ["--rank", "3"], "lora-exact": [], "dense": ["--to", "dense", "--base", str(FIXTURES / "tiny-llama")],
           "lora-energy-bf16": ["--energy", "0.9", "--dtype", "bfloat16"],
           "dense-bf16": ["--to", "dense", "--base", str(FIXTURES / "tiny-llama"), "--dtype", "bfloat16"]}
MM, LR = "polytool.core.merge_methods", "polytool.core.lowrank"


@dataclass(frozen=True)
class Mutant:  # test_mutations.inject takes its name and patches
    name: str
    what: str  # the wrong formula, for the table
    patches: tuple[Patch, ...]
    methods: tuple[str, ...]  # the methods whose merges it changes: those artifacts must fail
    kinds: tuple[str, ...] = ("lora", "dense")  # the outputs it changes


MUTANTS = [
    Mutant("linear-unweighted", "the linear merge's factors side by side without their weights (each source at 1)", (
        Patch("polytool.merge.recipe", "Merge.linear_factors", "np.concatenate([w * b for", "np.concatenate([b for"),),
        ("linear",), ("lora", "lora-exact", "dense")),
    Mutant("trim-threshold", "TIES / magnitude pruning keep 0.9 x int(density * numel) entries (a higher threshold)", (
        Patch(MM, "magnitude_prune", "k = int(density * D.size)", "k = int(0.9 * density * D.size)"),),
        ("ties", "ties-mergekit", "magnitude_prune")),
    Mutant("sign-axis", "TIES' sign elected per column (summed over the rows) instead of per entry over the sources", (
        Patch(MM, "ties_combine", "sign = np.where(elect >= 0,", "sign = np.where(elect.sum(axis=0, keepdims=True) >= 0,"),),
        ("ties", "ties-mergekit", "dare_ties")),
    Mutant("dare-rescale", "DARE's kept entries multiplied by density instead of divided by it", (
        Patch(MM, "dare_prune", "D /= D.dtype.type(density)", "D *= D.dtype.type(density)"),),
        ("dare_linear", "dare_ties")),
    Mutant("dare-seed", "DARE's masks drawn with seed + 1 (the recipe records the seed given)", (
        Patch(MM, "seed_for", "np.random.default_rng([seed, source, tag])",
              "np.random.default_rng([seed + 1, source, tag])"),), ("dare_linear", "dare_ties")),
    Mutant("svd-smallest", "the pruned merges' truncation keeps the smallest singular values", (
        Patch(LR, "truncate_dense", "w, V = np.clip(w[::-1], 0.0, None), V[:, ::-1]", "w, V = np.clip(w, 0.0, None), V"),),
        ("ties", "magnitude_prune", "dare_linear", "dare_ties"), ("lora",)),
    Mutant("svd-drop-last", "the linear merge's truncation zeroes its k-th singular value (rank k, optimum k-1)", (
        Patch(LR, "truncate_factored", "B_k = (Qb @ u[:, :k]) * s[:k]", "B_k = (Qb @ u[:, :k]) * s[:k] * (np.arange(k) < k - 1)"),),
        ("linear",), ("lora",)),
]


def inject_all(mp, mutant: Mutant) -> int:
    """test_mutations.inject for functions; a `Class.method` patch replaces the method on its class."""
    import importlib

    bound = 0
    for patch in mutant.patches:
        if "." not in patch.function:
            bound += inject(mp, Mutant(mutant.name, mutant.what, (patch,), mutant.methods))
            continue
        owner_name, method = patch.function.split(".")
        owner = getattr(importlib.import_module(patch.module), owner_name)
        _, replacement = mutated(Patch(patch.module, method, patch.old, patch.new), mutant.name, owner)
        mp.setattr(owner, method, replacement)
        bound += 1
    return bound


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def write_merges(out: Path, sources: list[str], methods, outputs) -> dict[tuple[str, str], Path]:
    made = {}
    for method in methods:
        for kind in outputs:
            path = out / f"{method}-{kind}"
            res = cli("merge", *sources, *METHODS[method], *OUTPUTS[kind], "--out", path)
            assert res.exit_code == 0, res.output
            made[(method, kind)] = path
    return made


def verify_all(paths: dict) -> dict[tuple[str, str], bool]:
    """One verify run over every artifact: {(method, kind): passed}; exit 1 exactly when one failed. An artifact
    that fails must fail its weight-space proof too (the dense weights, or a truncated LoRA's rank optimality),
    not only the forward: the recomputed recipe alone convicts it (an exact LoRA's proof is its forward)."""
    args = [a for p in paths.values() for a in ("--against", p)]
    res = cli("verify", FIXTURES / "mhr", "--base", FIXTURES / "tiny-llama", *args, *VERIFY_ARGS, "--json")
    assert res.exit_code in (0, 1), res.output
    report = json.loads(res.stdout)
    by_path = {c["artifact"]: c["passed"] for c in report["checks"]}
    for c in report["checks"]:
        proof = c["weights"] if c["kind"] == "dense" else c["truncation"]
        exact_lora = c["kind"] == "lora" and proof is None  # its proof is the forward
        assert c["passed"] or exact_lora or proof["first_bad"], c
    assert res.exit_code == (0 if all(by_path.values()) else 1)
    return {key: by_path[str(p)] for key, p in paths.items()}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two Poly tasks and a LoRA (the collapse of a third task): both kinds of source."""
    out = tmp_path_factory.mktemp("merge-sources")
    assert cli("collapse", FIXTURES / "mhr", "--task", "2", "--out", out / "task2").exit_code == 0
    return [f"{FIXTURES / 'mhr'}:1", f"{FIXTURES / 'mhr'}:3", str(out / "task2")]


@pytest.fixture(scope="module")
def controls(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge-controls")
    made = write_merges(out, sources, METHODS, ("lora", "dense"))
    made.update(write_merges(out, sources, ("ties", "dare_ties"), ("lora-energy-bf16", "dense-bf16")))
    made.update(write_merges(out, sources, ("linear",), ("lora-exact",)))  # the factors side by side
    return made, verify_all(made)


@pytest.fixture(scope="module")
def table(sources, tmp_path_factory):
    """{mutant: {(method, kind): passed}} for the artifacts each mutant writes differently."""
    rows = {}
    for mutant in MUTANTS:
        with pytest.MonkeyPatch.context() as mp:
            assert inject_all(mp, mutant) >= len(mutant.patches)
            made = write_merges(tmp_path_factory.mktemp(mutant.name), sources, mutant.methods, mutant.kinds)
        rows[mutant.name] = verify_all(made)
    return rows


def test_every_method_and_output_passes_as_written(controls):
    made, passed = controls
    assert passed == {key: True for key in made}


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_a_mutant_of_each_method_fails(table, mutant):
    assert table[mutant.name] and not any(table[mutant.name].values()), table[mutant.name]


def render(rows: dict) -> str:
    lines = [BEGIN, "| mutant | wrong formula | methods it changes | LoRA (`--rank 3`; linear also exact): `verify --against` "
             "| dense: `verify --against` |", "| --- | --- | --- | --- | --- |"]
    for m in MUTANTS:
        got = rows[m.name]
        def code(kind):  # 1: every artifact of that kind failed; 0: every one passed
            verdicts = {v for (_, k), v in got.items() if k.startswith(kind)}
            return "-" if not verdicts else "0" if verdicts == {True} else "1" if verdicts == {False} else "mixed"

        lines.append(f"| `{m.name}` | {m.what} | {', '.join(m.methods)} | {code('lora')} | {code('dense')} |")
    return "\n".join(lines + [END])


def test_merge_mutation_table_in_docs(table):
    assert doc_block_is_current(CI_DOC, BEGIN, END, render(table)), \
        "docs/ci.md's merge mutation table is out of date: rerun with POLYTOOL_WRITE_DOCS=1"


def test_a_changed_or_missing_source_is_an_input_error_naming_it(sources, tmp_path):
    lora = tmp_path / "source"
    shutil.copytree(sources[2], lora)
    res = cli("merge", sources[0], lora, "--method", "ties", "--density", "0.5", "--rank", "2", "--out", tmp_path / "m")
    assert res.exit_code == 0, res.output
    weights = lora / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + bytes(4))  # the last value's bytes changed
    res = cli("verify", FIXTURES / "mhr", "--against", tmp_path / "m")
    assert res.exit_code == 2 and f"source {str(lora)!r}" in res.stderr and "changed since the merge" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    shutil.rmtree(lora)
    res = cli("verify", FIXTURES / "mhr", "--against", tmp_path / "m")
    assert res.exit_code == 2 and f"source {str(lora)!r}" in res.stderr


def with_recipe(src: Path, dst: Path, change: dict) -> Path:
    """A copy of artifact `src` at `dst` whose every safetensors file records the recipe with `change` applied."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    for file in dst.glob("*.safetensors"):
        with safe_open(file, "np") as f:
            metadata = f.metadata()
        recipe = {**json.loads(metadata["polytool.recipe"]), **change}
        save_file(load_file(file), file, metadata={**metadata, "polytool.recipe": json.dumps(recipe)})
    return dst


def test_another_seed_in_the_recipe_fails(controls, tmp_path):
    """DARE's masks are the generator's for the recorded seed: the artifact's recipe edited to seed 8 fails."""
    made, _ = controls
    for kind in ("dense", "lora"):
        bad = with_recipe(made[("dare_linear", kind)], tmp_path / kind, {"seed": 8})
        res = cli("verify", FIXTURES / "mhr", "--base", FIXTURES / "tiny-llama", "--against", bad, *VERIFY_ARGS,
                  "--json")
        check = json.loads(res.stdout)["checks"][0]
        assert res.exit_code == 1 and (check["weights"] or check["truncation"])["first_bad"] is not None


def test_an_untied_dense_merge_is_checked_in_one_model_copy(matrix_case, tmp_path):
    """--untie: the tied lm_head target written as its own tensor, a pruned merge of two tasks: it passes in
    one model copy, and the same artifact whose recipe says another density fails (the control)."""
    case = matrix_case("qwen2-tied-lm_head")
    out = tmp_path / "untied"
    res = cli("merge", f"{case.adapter_dir}:0", f"{case.adapter_dir}:1", "--method", "ties", "--density", "0.5",
              "--to", "dense", "--untie", "--base", case.base_dir, "--out", out)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    verify = ["verify", case.adapter_dir, "--base", case.base_dir, *VERIFY_ARGS, "--json", "--against"]
    res = cli(*verify, out)
    assert res.exit_code == 0, res.output
    check = json.loads(res.stdout)["checks"][0]
    assert check["weights"]["first_bad"] is None and check["weights"]["merged"] >= 1 and "weight space" in check["proof"]
    res = cli(*verify, with_recipe(out, tmp_path / "other", {"density": 0.3}))
    assert res.exit_code == 1 and json.loads(res.stdout)["checks"][0]["weights"]["first_bad"] is not None


def test_the_readme_ties_example_verifies_as_written(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)  # the README runs from the repository root (fixtures/ relative)
    out = tmp_path / "out"
    assert cli("collapse", "fixtures/poly", "--task", "1", "--out", out / "poly-task1", "--force").exit_code == 0
    res = cli("merge", "fixtures/mhr:1", "fixtures/mhr:3", out / "poly-task1", "--method", "ties", "--density", "0.5",
              "--rank", "4", "--out", out / "merged", "--force")
    assert res.exit_code == 0, res.output
    res = cli("verify", "fixtures/mhr", "--against", out / "merged")
    assert res.exit_code == 0, res.output
    assert "rank optimality" in res.stdout and "optimum" in res.stdout


@pytest.mark.parametrize("field, value", [("ties_variant", "other"), ("seed", "7"), ("density", 1.5),
                                          ("method", "svd"), ("rank", 0)])
def test_a_recipe_with_a_field_merge_does_not_write_is_refused(controls, tmp_path, field, value):
    made, _ = controls
    bad = with_recipe(made[("dare_ties", "lora")], tmp_path / "bad", {field: value})
    res = cli("verify", FIXTURES / "mhr", "--base", FIXTURES / "tiny-llama", "--against", bad)
    assert res.exit_code == 2 and "the merge recipe's" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_dare_masks_are_the_documented_generator():
    """verify's masks (its own derivation from docs/merge.md) are the product's, bit for bit; another seed,
    source or module draws others."""
    import numpy as np

    from polytool.core.merge_methods import seed_for
    from polytool.verify.reference_merge import dare_keep

    shape, module = (37, 23), "model.layers.0.self_attn.q_proj"
    product = seed_for(5, 1, module).random(shape, dtype=np.float32) < np.float32(0.3)
    assert np.array_equal(dare_keep(shape, 0.3, 5, 1, module), product)
    for other in ((6, 1, module), (5, 0, module), (5, 1, module + "x")):
        assert not np.array_equal(dare_keep(shape, 0.3, *other), product)


def test_selections_within_rounding_are_ambiguous():
    """An exact tie at the trim threshold, and a TIES vote that cancels, are counted as ambiguous and allow
    either value; clear entries are not."""
    import numpy as np

    from polytool.verify.reference_merge import Pruned, top_k

    D = np.array([[4.0, -3.0], [2.0, -2.0]])
    keep, ambiguous = top_k(D, np.full(D.shape, 1e-7), 0.75)  # 3 of 4 kept: 4, -3 and one of the tied 2s
    assert keep.sum() == 3 and ambiguous.tolist() == [[False, False], [True, True]]
    keep, ambiguous = top_k(np.array([[4.0, -3.0], [2.0, -1.0]]), np.full(D.shape, 1e-7), 0.75)
    assert not ambiguous.any()
    recipe = {"method": "ties", "density": 1.0, "majority_sign": "total", "ties_variant": "peft"}
    a, b = np.array([[1.0, 2.0]]), np.array([[-1.0, 1.0]])  # the first entry's vote is exactly 0
    merged = Pruned([a, b], [np.full(a.shape, 1e-8)] * 2, [1.0, 1.0], recipe, "m")
    assert merged.ambiguous == 1 and merged.delta[0, 1] == 1.5
    assert merged.allowance[0, 0] >= 2.0 > 1e-3 > merged.allowance[0, 1]


def test_exact_ties_at_the_threshold_pass_either_way(sources, tmp_path):
    """A LoRA whose factors take two values has deltas full of exact ties, so the trim threshold falls among
    equal magnitudes and the product keeps an arbitrary k of them (as torch.topk does): verify counts them as
    ambiguous, allows either value in weight space, and its forward takes the artifact's own choice there."""
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file

    tied = tmp_path / "tied"
    shutil.copytree(sources[2], tied)
    file = tied / "adapter_model.safetensors"
    rng = np.random.default_rng(0)
    with safe_open(file, "np") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: (np.sign(rng.standard_normal(v.shape)) * (0.25 if "lora_A" in k else 0.5)).astype(v.dtype)
               for k, v in tensors.items()}
    save_file(tensors, file, metadata=metadata)
    made = {}
    for kind, extra in (("dense", OUTPUTS["dense"]), ("lora", ["--rank", "2"])):
        made[kind] = tmp_path / kind
        res = cli("merge", sources[0], tied, "--method", "magnitude_prune", "--density", "0.3", *extra,
                  "--out", made[kind])
        assert res.exit_code == 0, res.output
    res = cli("verify", FIXTURES / "mhr", "--base", FIXTURES / "tiny-llama", *VERIFY_ARGS, "--json",
              *[a for p in made.values() for a in ("--against", p)])
    assert res.exit_code == 0, res.output
    dense, lora = json.loads(res.stdout)["checks"]
    assert dense["weights"]["ambiguous"] > 100 and any(r["ambiguous"] for r in lora["truncation"]["modules"])


def test_a_truncated_merge_missing_a_module_is_refused(controls, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    made, _ = controls
    bad = tmp_path / "bad"
    shutil.copytree(made[("ties", "lora")], bad)
    file = bad / "adapter_model.safetensors"
    with safe_open(file, "np") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if ".layers.1.mlp.down_proj." not in k}
    save_file(tensors, file, metadata=metadata)
    res = cli("verify", FIXTURES / "mhr", "--base", FIXTURES / "tiny-llama", "--against", bad)
    assert res.exit_code == 2 and "model.layers.1.mlp.down_proj" in res.stderr and "missing" in res.stderr
