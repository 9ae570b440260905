"""Mutation tests: a wrong formula in the code that writes artifacts makes `verify` fail.

Each mutant edits the source text of one or more product functions (collapse, routing, export, merge),
compiles the edited function and puts it in place of the original everywhere polytool binds it (the
Poly model's own fast path included: a wrong shared formula breaks every user of it). Then, through
the CLI in-process (so the patches apply): `collapse --to lora` and `--to dense`, `verify --against`
each artifact, and the self-check. verify's reference (polytool/verify/reference.py) shares no code with
the mutated functions, so every artifact the mutated code writes must fail (exit 1), and every
artifact it does not write must still pass (exit 0: the gate does not cry wolf).

The table of exit codes goes into docs/ci.md between the mutation-table markers: rewritten when
POLYTOOL_WRITE_DOCS=1, otherwise compared with what this run computes.
"""
from __future__ import annotations

import __future__
import importlib
import inspect
import os
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from polytool.cli import main

ROOT = Path(__file__).resolve().parent.parent
CI_DOC = ROOT / "docs" / "ci.md"
BEGIN, END = "<!-- mutation-table: begin -->", "<!-- mutation-table: end -->"
KINDS = ("lora", "dense", "self")  # the LoRA artifact, the dense artifact, the self-check
VERIFY_ARGS = ["--inputs", "2", "--seq-len", "12"]


@dataclass(frozen=True)
class Patch:
    module: str  # where the function is defined
    function: str
    old: str  # an exact snippet of its source, found once
    new: str


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str  # the wrong formula, for the table
    patches: tuple[Patch, ...]
    writes: tuple[str, ...]  # which of KINDS the mutated code produces: those must fail, the others pass
    case: str = "mhr"  # "mhr": fixtures/mhr on fixtures/tiny-llama (4 splits); "gpt2": the gpt2-conv1d matrix case
    task: str = "1"  # the --task given to collapse (and to the self-check)


FACTORS = "polytool.core.collapse", "collapse_factors"
RETURN_AB = "return A.reshape(lead + (n_splits * d_in, r)), B.reshape(lead + (r, n_splits * d_out))"
PRODUCT = """B_s = einsum("qsrd->srqd", poly_B).reshape((poly_B.shape[1], r, n_splits * d_out))  # (s, r, out)
    delta = einsum("...qs,qsdr,sre->...qde", weights, poly_A, B_s)  # (..., q, in/q, out): sum_s w A_s B_s
    delta = delta.reshape(lead + (n_splits * d_in, n_splits * d_out))
    linalg = sys.modules[type(poly_A).__module__.split(".")[0]].linalg
    U, S, Vh = linalg.svd(delta, full_matrices=False)  # the best rank-r factorisation of the wrong product
    return U[..., :r] * S[..., None, :r], Vh[..., :r, :]"""
SOFTMAX = """x = np.asarray(logits, dtype=np.float64).reshape(n_tasks, n_splits, n_skills)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)"""

MUTANTS = [
    Mutant("split-A-reversed", "the split blocks of A stacked in reverse order", (
        Patch(*FACTORS, RETURN_AB, RETURN_AB.replace("A.reshape(", "A[..., list(range(n_splits))[::-1], :, :].reshape(")),),
        ("lora", "dense", "self")),
    Mutant("split-B-reversed", "the split blocks of B stacked in reverse order", (
        Patch(*FACTORS, RETURN_AB, RETURN_AB.replace("B.reshape(", "B[..., list(range(n_splits))[::-1], :].reshape(")),),
        ("lora", "dense", "self")),
    Mutant("product-mixed", "sum_s w A_s B_s (the product mixed, then its best rank-r factors) for A and B mixed apart", (
        Patch(*FACTORS, RETURN_AB, PRODUCT),), ("lora", "dense", "self")),
    Mutant("softmax", "softmax of the logits per split instead of sigmoid then normalisation", (
        Patch("polytool.core.routing", "eval_weights",
              "probs = sigmoid(np.asarray(logits, dtype=np.float64))\n"
              "    return normalize_per_split(probs.reshape(n_tasks, n_splits, n_skills))", SOFTMAX),),
        ("lora", "dense", "self")),
    Mutant("no-div-r", "the update without its 1/r (dense delta; LoRA lora_alpha = r)", (
        Patch("polytool.core.collapse", "update_scale", "return r", "return 1"),
        Patch("polytool.collapse.lora", "lora_config", '"lora_alpha": LORA_ALPHA', '"lora_alpha": adapter.r')),
        ("lora", "dense", "self")),
    Mutant("double-div-r", "the update divided by r twice (dense delta; LoRA lora_alpha = 1/r)", (
        Patch("polytool.core.collapse", "update_scale", "return r", "return r * r"),
        Patch("polytool.collapse.lora", "lora_config", '"lora_alpha": LORA_ALPHA', '"lora_alpha": LORA_ALPHA / adapter.r')),
        ("lora", "dense", "self")),
    Mutant("wrong-task", "the next task's router row", (
        Patch("polytool.core.routing", "spec_weights", "return weights[int(spec)]",
              "return weights[(int(spec) + 1) % weights.shape[0]]"),), ("lora", "dense", "self")),
    Mutant("conv1d-untransposed", "a Conv1D's delta laid out as a Linear's (reshaped, not transposed) in the dense merge", (
        Patch("polytool.core.collapse", "stored_delta", "return dense_delta(A[lo:hi], B, r).T",
              "return dense_delta(A, B, r).reshape(A.shape[0], B.shape[1])[lo:hi]"),),
        ("dense", "self"), case="gpt2"),
    # the gate takes the task from the user (or the request recorded as typed), never the product's parse of it
    Mutant("cli-wrong-task", "collapse writes the next task when asked for one (and records it)", (
        Patch("polytool.collapse.command", "collapse", "spec = parse_task_spec(o.task, adapter.n_tasks, allow_all=True)",
              "spec = parse_task_spec(str((int(o.task) + 1) % adapter.n_tasks), adapter.n_tasks, allow_all=True)"),),
        ("lora", "dense")),
    Mutant("mix-missorted", "a mix's coefficients left in the order given while its tasks are sorted", (
        Patch("polytool.core.taskspec", "parse_task_mix", "tuple(raw[i] / total for i in order)",
              "tuple(raw[i] / total for i in range(len(raw)))"),), ("lora", "dense"), task="3:0.7,1:0.3"),
    # the streaming dense writer, in blocks of rows (BLOCK_BYTES is made small for these runs: many blocks)
    Mutant("block-offset", "every block of rows after the first merged with the delta of the rows one above", (
        Patch("polytool.collapse.blocks", "_merge_rows", "delta(a - first, b - first, transposed, x[a - lo:b - lo],",
              "delta(max(a - first - 1, 0), max(a - first - 1, 0) + b - a, transposed, x[a - lo:b - lo],"),),
        ("dense",)),
]
BLOCK_BYTES = 4096  # the dense writer's block in these runs: every merged weight is written in several blocks


def mutated(patch: Patch, name: str, owner=None):
    """The function with `patch.old` replaced by `patch.new` in its source, compiled in its module (`owner`: the
    class holding it, for a method)."""
    module = importlib.import_module(patch.module)
    original = getattr(owner or module, patch.function)
    source = textwrap.dedent(inspect.getsource(original))
    assert source.count(patch.old) == 1, f"{patch.module}.{patch.function} changed: update mutant {name!r}"
    code = compile(source.replace(patch.old, patch.new), f"<mutant {name}: {patch.module}.{patch.function}>", "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    scope: dict = {}
    exec(code, {**vars(module), "sys": sys}, scope)  # noqa: S102 (our own source, edited)
    return original, scope[patch.function]


def inject(monkeypatch, mutant: Mutant) -> int:
    """Put each mutated function in place of the original in every polytool module binding it."""
    bound = 0
    for patch in mutant.patches:
        original, replacement = mutated(patch, mutant.name)
        for name, module in list(sys.modules.items()):
            if name == "polytool" or name.startswith("polytool."):
                for attr, value in list(vars(module).items()):
                    if value is original:
                        monkeypatch.setattr(module, attr, replacement)
                        bound += 1
    return bound


def cli(*args) -> int:
    res = CliRunner().invoke(main, [str(a) for a in args])
    if res.exit_code not in (0, 1):
        raise AssertionError(f"polytool {' '.join(map(str, args))} exited {res.exit_code}: {res.output[-1500:]}")
    return res.exit_code


def exit_codes(adapter: Path, base: Path, task: str, out: Path) -> dict[str, int]:
    """collapse + verify --against for a LoRA and a dense artifact, and the self-check: their exit codes."""
    codes = {}
    for kind in ("lora", "dense"):
        assert cli("collapse", adapter, "--base", base, "--task", task, "--to", kind, "--out", out / kind) == 0
        codes[kind] = cli("verify", adapter, "--base", base, "--against", out / kind, *VERIFY_ARGS)
    codes["self"] = cli("verify", adapter, "--base", base, "--task", task, *VERIFY_ARGS)
    return codes


@pytest.fixture(scope="module")
def cases(matrix_case):
    gpt2 = matrix_case("gpt2-conv1d")
    return {"mhr": (ROOT / "fixtures" / "mhr", ROOT / "fixtures" / "tiny-llama"),
            "gpt2": (gpt2.adapter_dir, gpt2.base_dir)}


@pytest.fixture(scope="module")
def table(cases, tmp_path_factory):
    """{(mutant name, case): {kind: exit code}}, the controls (no mutant) first."""
    from polytool.collapse import blocks as dense_blocks

    rows = {}
    with pytest.MonkeyPatch.context() as blocks:
        blocks.setattr(dense_blocks, "BLOCK_BYTES", BLOCK_BYTES)
        for case in ("mhr", "gpt2"):
            rows[("none", case)] = exit_codes(*cases[case], "1", tmp_path_factory.mktemp(f"control-{case}"))
        rows[("none-mix", "mhr")] = exit_codes(*cases["mhr"], "3:0.7,1:0.3", tmp_path_factory.mktemp("control-mix"))
        for mutant in MUTANTS:
            with pytest.MonkeyPatch.context() as mp:
                assert inject(mp, mutant) >= len(mutant.patches)
                out = tmp_path_factory.mktemp(mutant.name)
                rows[(mutant.name, mutant.case)] = exit_codes(*cases[mutant.case], mutant.task, out)
    return rows


def render(rows: dict) -> str:
    what = {m.name: m.what for m in MUTANTS} | {"none": "no mutant: the product code as shipped (the control)",
                                                  "none-mix": "no mutant, the mix 3:0.7,1:0.3 (the control)"}
    case = {"mhr": "fixtures/mhr", "gpt2": "GPT-2 (Conv1D)"}
    lines = [BEGIN, "| mutant | wrong formula | adapter | LoRA: `verify --against` | dense: `verify --against` "
             "| self-check |", "| --- | --- | --- | --- | --- | --- |"]
    for (name, c), codes in rows.items():
        lines.append(f"| `{name}` | {what[name]} | {case[c]} | {codes['lora']} | {codes['dense']} | {codes['self']} |")
    return "\n".join(lines + [END])


def test_controls_pass(table):
    assert table[("none", "mhr")] == table[("none", "gpt2")] == table[("none-mix", "mhr")] == {k: 0 for k in KINDS}


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_every_artifact_of_a_mutant_fails(table, mutant):
    want = {k: 1 if k in mutant.writes else 0 for k in KINDS}
    assert table[(mutant.name, mutant.case)] == want


def doc_block_is_current(doc: Path, begin: str, end: str, block: str) -> bool:
    """Whether `doc` holds `block` between its one `begin` ... `end` pair; with POLYTOOL_WRITE_DOCS=1 it is
    written there first (the generated tables of docs/ci.md)."""
    text = doc.read_text(encoding="utf-8")
    assert text.count(begin) == 1 and text.count(end) == 1, f"{doc.name} needs one {begin} ... {end} block"
    if os.environ.get("POLYTOOL_WRITE_DOCS") == "1":
        doc.write_text(re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S),
                       encoding="utf-8")
    return block in doc.read_text(encoding="utf-8")


def test_mutation_table_in_docs(table):
    assert doc_block_is_current(CI_DOC, BEGIN, END, render(table)), \
        "docs/ci.md's mutation table is out of date: rerun with POLYTOOL_WRITE_DOCS=1"


def test_a_mutant_changes_what_collapse_writes(tmp_path, monkeypatch):
    """The injection reaches the writer: the mutated LoRA's bytes differ from the real one's."""
    adapter, base = ROOT / "fixtures" / "mhr", ROOT / "fixtures" / "tiny-llama"
    assert cli("collapse", adapter, "--base", base, "--task", 1, "--out", tmp_path / "good") == 0
    inject(monkeypatch, MUTANTS[0])
    assert cli("collapse", adapter, "--base", base, "--task", 1, "--out", tmp_path / "bad") == 0
    name = "adapter_model.safetensors"
    assert (tmp_path / "good" / name).read_bytes() != (tmp_path / "bad" / name).read_bytes()
