"""`polytool merge`, `collapse --rank/--energy` and task mixes against PEFT on the same adapters.

PEFT is the reference: LoRAs that PEFT wrote (several ranks, rslora, rank_pattern/alpha_pattern) and a
Poly adapter PEFT wrote, loaded into one PeftModel; `add_weighted_adapter` gives the reference deltas
(`cat`, `svd`, `ties_svd`, `magnitude_prune_svd`), and merge_utils the reference dense ones. polytool's
outputs are loaded by PEFT too, so their configs (r, lora_alpha, rank_pattern) are checked as PEFT reads
them. Every comparison has a negative control that differs."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from polytool.cli import main
from polytool.merge.recipe import from_recipe, open_merge
from polytool.core.merge_methods import dare_prune

from conftest import tree_hash

TARGETS = ["q_proj", "v_proj", "down_proj"]  # conftest's llama Poly adapters target these too
MODULES = [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
LORAS = [  # PEFT LoraConfig keywords: odd ranks, rslora, per-module rank and alpha
    dict(r=4, lora_alpha=8),
    dict(r=3, lora_alpha=5, use_rslora=True),
    dict(r=2, lora_alpha=4, rank_pattern={"model.layers.0.self_attn.q_proj": 5},
         alpha_pattern={"model.layers.1.mlp.down_proj": 3}),
]
TOL = 1e-5  # relative Frobenius error in float32


def run(*args) -> dict:
    res = CliRunner().invoke(main, [str(a) for a in args] + ["--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def fail(*args) -> str:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 2, res.output
    return res.stderr.strip()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def sources(make_base, make_peft_adapter, tmp_path_factory):
    """(base_dir, poly adapter dir, [three PEFT LoRA dirs], collapsed LoRA dir of the Poly task 1)."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    poly, base_dir = make_peft_adapter("llama", r=3, n_splits=2)
    out = tmp_path_factory.mktemp("merge-sources")
    dirs = []
    for i, kw in enumerate(LORAS):
        model = get_peft_model(tf.AutoModelForCausalLM.from_pretrained(base_dir),
                               LoraConfig(task_type="CAUSAL_LM", target_modules=TARGETS, **kw))
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model.save_pretrained(out / f"lora{i}")
        dirs.append(out / f"lora{i}")
    run("collapse", poly, "--task", "1", "--out", out / "poly-task1")
    return base_dir, poly, dirs, out / "poly-task1"


@pytest.fixture(scope="module")
def peft_model(sources):
    """One PeftModel holding the three LoRAs (s0..s2) and the Poly adapter's task 1 as a LoRA (p1)."""
    import transformers as tf
    from peft import PeftModel

    base_dir, _, dirs, task1 = sources
    model = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base_dir), dirs[0], adapter_name="s0")
    for name, d in (("s1", dirs[1]), ("s2", dirs[2]), ("p1", task1)):
        model.load_adapter(d, adapter_name=name)
    return model


def peft_deltas(model, adapter: str) -> dict[str, torch.Tensor]:
    inner = model.base_model.model
    return {m: inner.get_submodule(m).get_delta_weight(adapter).detach() for m in MODULES}


_counter = iter(range(10**6))


def ours(model, directory: Path) -> dict[str, torch.Tensor]:
    """polytool's output LoRA as PEFT loads it (its r, lora_alpha and rank_pattern as PEFT reads them)."""
    name = f"ours{next(_counter)}"
    model.load_adapter(directory, adapter_name=name)
    try:
        return peft_deltas(model, name)
    finally:
        model.delete_adapter(name)


def reference(model, combination: str, weights, **kw) -> dict[str, torch.Tensor]:
    name = f"ref{next(_counter)}"
    model.add_weighted_adapter(["s0", "s1", "s2", "p1"], list(weights), name, combination_type=combination, **kw)
    try:
        return peft_deltas(model, name)
    finally:
        model.delete_adapter(name)


def srcs(sources) -> list[str]:
    _, poly, dirs, _ = sources
    return [*map(str, dirs), f"{poly}:1"]


def assert_equal_deltas(got: dict, want: dict, other: dict) -> None:
    for m in MODULES:
        assert rel(got[m], want[m]) <= TOL, (m, rel(got[m], want[m]))
    assert max(rel(other[m], want[m]) for m in MODULES) > 1e-2  # negative control: other weights differ


W, W2 = (0.7, -0.4, 1.3, 0.5), (0.2, 0.9, -0.6, 1.1)


def test_linear_exact_equals_peft_cat(sources, peft_model, tmp_path):
    data = run("merge", *srcs(sources), "--weights", ",".join(map(str, W)), "--out", tmp_path / "a")
    run("merge", *srcs(sources), "--weights", ",".join(map(str, W2)), "--out", tmp_path / "b")
    # rank = the sum of the sources' ranks per module: r the largest, rank_pattern the others
    assert data["r"] == 4 + 3 + 5 + 3 and "truncation" not in data
    assert data["rank_pattern"] == {m: 4 + 3 + 2 + 3 for m in MODULES if m != "model.layers.0.self_attn.q_proj"}
    assert_equal_deltas(ours(peft_model, tmp_path / "a"), reference(peft_model, "cat", W), ours(peft_model, tmp_path / "b"))


@pytest.mark.parametrize("k", [2, 5])
def test_linear_rank_equals_peft_svd(sources, peft_model, tmp_path, k):
    data = run("merge", *srcs(sources), "--weights", ",".join(map(str, W)), "--rank", k, "--out", tmp_path / "a")
    run("merge", *srcs(sources), "--weights", ",".join(map(str, W2)), "--rank", k, "--out", tmp_path / "b")
    want = reference(peft_model, "svd", W, svd_rank=k)
    assert_equal_deltas(ours(peft_model, tmp_path / "a"), want, ours(peft_model, tmp_path / "b"))
    # the reported error is the optimum's: a dense SVD of the exact merged delta, here
    exact = reference(peft_model, "cat", W)
    for t in data["truncation"]:
        s = torch.linalg.svdvals(exact[t["module"]].double())
        assert t["rank"] == k and t["error"] == pytest.approx((s[k:].square().sum() / s.square().sum()).sqrt().item(), rel=1e-6)


@pytest.mark.parametrize("method, density", [("ties", 0.5), ("ties", 0.2), ("magnitude_prune", 0.3)])
def test_pruned_rank_equals_peft_svd_types(sources, peft_model, tmp_path, method, density):
    args = ["--method", method, "--density", density, "--rank", 3]
    run("merge", *srcs(sources), "--weights", ",".join(map(str, W)), *args, "--out", tmp_path / "a")
    run("merge", *srcs(sources), "--weights", ",".join(map(str, W2)), *args, "--out", tmp_path / "b")
    want = reference(peft_model, f"{method}_svd", W, svd_rank=3, density=density)
    assert_equal_deltas(ours(peft_model, tmp_path / "a"), want, ours(peft_model, tmp_path / "b"))


@pytest.mark.parametrize("method, extra", [("ties", ("--majority-sign", "frequency")), ("magnitude_prune", ()),
                                           ("linear", ())])
def test_dense_equals_peft_merge_utils(sources, peft_model, tmp_path, method, extra):
    """--to dense: W' - W equals PEFT's merge_utils applied to PEFT's own deltas (float32 base)."""
    from peft.utils import merge_utils
    from safetensors.torch import load_file

    base_dir = sources[0]
    density = () if method == "linear" else ("--density", 0.4)
    run("merge", *srcs(sources), "--weights", ",".join(map(str, W)), "--method", method, *density, *extra,
        "--to", "dense", "--base", base_dir, "--out", tmp_path / "d")
    deltas = [peft_deltas(peft_model, a) for a in ("s0", "s1", "s2", "p1")]
    merged, base = load_file(tmp_path / "d" / "model.safetensors"), load_file(base_dir / "model.safetensors")
    for m in MODULES:
        ds, w = [d[m] for d in deltas], torch.tensor(W)
        want = {"ties": lambda: merge_utils.ties(ds, w, 0.4, "frequency"),
                "magnitude_prune": lambda: merge_utils.magnitude_prune(ds, w, 0.4),
                "linear": lambda: merge_utils.task_arithmetic(ds, w)}[method]()
        got = merged[m + ".weight"] - base[m + ".weight"]
        assert rel(got, want) <= TOL, (m, rel(got, want))
        assert rel(torch.zeros_like(want), want) == 1.0 and rel(merge_utils.task_arithmetic(ds, torch.tensor(W2)), want) > 1e-2
    with safe_open(tmp_path / "d" / "model.safetensors", "np") as f:
        recipe = json.loads(f.metadata()["polytool.recipe"])
    assert recipe["method"] == method and recipe["weights"] == list(W) and recipe["to"] == "dense"
    files = [d / "adapter_model.safetensors" for d in sources[2]] + [sources[1] / "adapter_model.safetensors"]
    assert [s["sha256"] for s in recipe["sources"]] == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]


def test_mergekit_ties_variant(sources, tmp_path):
    """--ties-variant mergekit: sign elected on the weighted deltas, divided by the agreeing weights."""
    a = open_merge(srcs(sources), list(W), "ties", 0.5, ties_variant="mergekit")
    p = open_merge(srcs(sources), list(W), "ties", 0.5)
    for m in MODULES[:2]:
        pruned = [torch.from_numpy(_magnitude(s, m, 0.5)) for s in a.sources]
        weighted = torch.stack([w * x for w, x in zip(W, pruned)])  # (n, out, in)
        sign = (weighted.sum(0) >= 0).double() * 2 - 1
        mask = weighted.sign() == sign
        w = torch.tensor(W, dtype=torch.float64).view(-1, 1, 1)
        divisor = (w * mask).sum(0)
        want = (weighted * mask).sum(0) / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        assert rel(torch.from_numpy(a.delta(m)), want) <= TOL
        assert rel(torch.from_numpy(p.delta(m)), want) > 1e-2  # PEFT's variant is another merge


def _magnitude(source, module: str, density: float) -> np.ndarray:
    """Magnitude pruning written plainly (torch.topk, as PEFT and mergekit), in float64."""
    b, a = source.factors(module)
    d = torch.from_numpy(b.astype(np.float32) @ a.astype(np.float32)).double()  # float32, as PEFT's get_delta_weight
    k = int(density * d.numel())
    keep = torch.zeros(d.numel(), dtype=torch.bool)
    keep[torch.topk(d.abs().flatten(), k).indices] = True
    return (d * keep.view(d.shape)).numpy()


def test_dare_is_seeded_and_keeps_the_density_rescaled(sources, tmp_path):
    rng = np.random.default_rng(0)
    D = rng.standard_normal((300, 200)).astype(np.float32)
    for density in (0.1, 0.5, 0.9):
        P = dare_prune(D.copy(), density, np.random.default_rng(1))
        kept = P != 0
        n = D.size
        assert abs(kept.mean() - density) < 4 * np.sqrt(density * (1 - density) / n)  # 4 sigma of a binomial share
        np.testing.assert_array_equal(P[kept], D[kept] / np.float32(density))  # the kept ones rescaled by 1/density
        assert abs(P.mean() - D.mean()) < 4 * D.std() * np.sqrt((1 / density - 1) / n) + 1e-3  # unbiased
    # seeded and reproducible end to end; another seed gives other masks
    args = (*srcs(sources), "--method", "dare_ties", "--density", 0.5, "--rank", 3)
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        run("merge", *args, "--seed", seed, "--out", tmp_path / name)
    read = lambda d: (d / "adapter_model.safetensors").read_bytes()
    assert read(tmp_path / "a") == read(tmp_path / "b") != read(tmp_path / "c")
    one = open_merge(srcs(sources)[:1], [1.0], "dare_linear", 0.3, seed=3)
    exact = open_merge(srcs(sources)[:1], [1.0]).delta(MODULES[0])
    got = one.delta(MODULES[0])
    kept = got != 0
    np.testing.assert_allclose(got[kept], exact[kept] / 0.3, rtol=0, atol=1e-6 * np.abs(exact).max() / 0.3)  # float32 deltas


def test_recipe_gives_verify_the_exact_delta(sources, tmp_path):
    run("merge", *srcs(sources), "--method", "dare_linear", "--density", 0.6, "--seed", 5, "--energy", 0.9,
        "--out", tmp_path / "a")
    with safe_open(tmp_path / "a" / "adapter_model.safetensors", "np") as f:
        meta = f.metadata()
    again = from_recipe(meta["polytool.recipe"])
    first = open_merge(srcs(sources), None, "dare_linear", 0.6, seed=5)
    for m in MODULES:
        np.testing.assert_array_equal(again.delta(m), first.delta(m))
    assert json.loads(meta["polytool.truncation"])["energy"] == 0.9


def test_task_mix_collapse_equals_peft_routed(make_peft_adapter, tmp_path):
    """The LoRA of 1:0.7,3:0.3 equals PEFT's Poly model with a router set to the mix's weights."""
    import transformers as tf
    from peft import PeftModel

    adapter, base_dir = make_peft_adapter("llama", r=3, n_tasks=4, n_splits=2)
    hashes = tree_hash(adapter), tree_hash(base_dir)
    run("collapse", adapter, "--task", "1:0.7,3:0.3", "--out", tmp_path / "mix")
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    model = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
    forward = lambda task: model(input_ids=ids, task_ids=torch.full((2,), task)).logits.detach()
    with torch.no_grad():
        task1 = forward(1)
        for name, router in model.named_modules():
            if name.endswith("poly_router.default"):
                w = torch.sigmoid(router.module_logits.double()).view(4, router.n_splits, router.n_skills)
                w = w / w.sum(-1, keepdim=True)  # PEFT's eval weights per task
                mix = 0.7 * w[1] + 0.3 * w[3]
                router.module_logits[0] = torch.logit(mix / 2).flatten().float()  # normalising undoes the / 2
        want = forward(0)
    lora = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "mix").eval()
    with torch.no_grad():
        got = lora(input_ids=ids).logits
    assert rel(got, want) <= TOL
    assert rel(task1, want) > 1e-3  # negative control: task 1 alone routes differently
    run("collapse", adapter, "--task", "1:0.3,3:0.7", "--out", tmp_path / "other")
    with torch.no_grad():
        other = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "other").eval()
        assert rel(other(input_ids=ids).logits, want) > 1e-3
    with safe_open(tmp_path / "mix" / "adapter_model.safetensors", "np") as f:
        assert f.metadata()["polytool.task"] == "1:0.7,3:0.3"
    assert (tree_hash(adapter), tree_hash(base_dir)) == hashes


def test_collapse_rank_and_energy_are_the_optimum(sources, peft_model, tmp_path):
    """collapse --rank / --energy against a dense SVD of the exact task LoRA, as PEFT loads both."""
    poly = sources[1]
    exact = peft_deltas(peft_model, "p1")  # the collapsed task 1 (verified against PEFT's Poly in test_collapse)
    data = run("collapse", poly, "--task", "1", "--rank", 2, "--out", tmp_path / "k2")
    energy = run("collapse", poly, "--task", "1", "--energy", 0.95, "--out", tmp_path / "e")
    got, got_e = ours(peft_model, tmp_path / "k2"), ours(peft_model, tmp_path / "e")
    ranks = {}
    for t, te in zip(data["truncation"], energy["truncation"]):
        m = t["module"]
        U, s, Vh = torch.linalg.svd(exact[m].double(), full_matrices=False)
        best = (U[:, :2] * s[:2]) @ Vh[:2]
        assert rel(got[m], best) <= TOL and t["rank"] == 2
        assert t["error"] == pytest.approx(((exact[m].double() - best).norm() / exact[m].double().norm()).item(), rel=1e-5)
        share = (s.square().cumsum(0) / s.square().sum()).tolist()
        k = next(i + 1 for i, v in enumerate(share) if v >= 0.95)  # the smallest rank keeping 95%
        ranks[m] = k
        assert te["rank"] == k and te["energy"] >= 0.95 and (k == 1 or share[k - 2] < 0.95)
        best_e = (U[:, :k] * s[:k]) @ Vh[:k]
        assert rel(got_e[m], best_e) <= TOL
        assert rel(got[m], exact[m]) > 1e-3  # negative control: rank 2 of 3 is not the exact LoRA
    config = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    r = max(ranks.values())
    assert config["r"] == r and config["rank_pattern"] == {m: k for m, k in ranks.items() if k != r}
    every = run("collapse", poly, "--task", "all", "--rank", 1, "--out", tmp_path / "all")["truncation"]
    assert [(t["task"], t["rank"]) for t in every] == [(task, 1) for task in range(3) for _ in MODULES]
    assert [t["error"] for t in every if t["task"] == 1] == [pytest.approx(e["error"]) for e in run(
        "collapse", poly, "--task", "1", "--rank", 1, "--out", tmp_path / "one")["truncation"]]


@pytest.mark.parametrize("args, message", [
    (("{lora0}", "{poly}"), "is a Poly/MHR adapter: name a task"),
    (("{lora0}", "nowhere:1"), "source 'nowhere:1': no such directory"),
    (("{lora0}", "{other}:0"), "adapt different modules"),
    (("{lora0}", "{lora1}", "--method", "ties"), "--method ties needs --density D"),
    (("{lora0}", "{lora1}", "--density", "0.5"), "--density 0.5: expected a share in (0, 1], with --method"),
    (("{lora0}", "{lora1}", "--weights", "1"), "--weights: expected 2 finite numbers (one per source), got 1"),
    (("{lora0}", "{lora1}", "--method", "ties", "--density", "0.5"), "gives a full-rank delta: a LoRA output needs --rank K"),
    (("{lora0}", "{lora1}", "--seed", "3"), "--seed applies to --method dare_linear and dare_ties only"),
    (("{lora0}", "{lora1}", "--to", "dense", "--rank", "2"), "--rank and --energy apply to a LoRA output"),
    (("{lora0}", "{lora1}", "--rank", "2", "--energy", "0.9"), "--rank and --energy are alternatives"),
    (("{lora0}", "{poly}:9"), "task 9 is out of range"),
])
def test_refusals(sources, make_peft_adapter, tmp_path, args, message):
    _, poly, dirs, _ = sources
    other, _ = make_peft_adapter("llama", r=2, n_splits=1, targets=("q_proj", "k_proj"))
    names = {"lora0": dirs[0], "lora1": dirs[1], "poly": poly, "other": other}
    err = fail("merge", *[a.format(**names) for a in args], "--out", tmp_path / "out")
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_human_output_and_no_torch(sources, tmp_path):
    """merge (LoRA and dense), collapse of a mix with --rank and inspect --task: a few lines each, no torch."""
    import subprocess
    import sys

    base_dir, poly, dirs, _ = sources
    code = (
        "import sys; from polytool.cli import main\n"
        "poly, lora, base, out = sys.argv[1:]\n"
        "for args in (['merge', f'{poly}:0', lora, '--out', out + '/m1'],\n"
        "             ['merge', f'{poly}:0', lora, '--method', 'ties', '--density', '0.5', '--energy', '0.9', '--out', out + '/m2'],\n"
        "             ['merge', f'{poly}:0', lora, '--to', 'dense', '--base', base, '--out', out + '/m3'],\n"
        "             ['collapse', poly, '--task', '0,2', '--rank', '2', '--out', out + '/c'],\n"
        "             ['inspect', poly, '--task', '0:1,2:3']):\n"
        "    try: main(args)\n"
        "    except SystemExit as e: assert e.code == 0, (args, e.code)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(poly), str(dirs[0]), str(base_dir), str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert f"wrote LoRA merging 2 sources (linear) to {tmp_path}/m1" in out and "exact: rank 7 (6 modules)" in out
    assert "wrote LoRA merging 2 sources (ties)" in out and "retained energy >= 0.9" in out
    assert "wrote dense model merging 2 sources (linear)" in out and "6 tensors merged" in out
    assert "wrote LoRA for task 0:0.5,2:0.5" in out and "rank 2 (6 modules)" in out
    assert "task 0:0.25,2:0.75: skill weights" in out
    assert res.stderr == ""


def test_a_registered_method_merges(sources):
    """docs/architecture.md's recipe for a merge method: one function and a `register` line. A toy method (the
    element-wise maximum of |D_i|, signed by the sum) is taken by open_merge and computes what it says; the
    built-in methods are the control (it differs from linear's weighted sum)."""
    from polytool.core import merge_methods

    @merge_methods.register("toy_max", density=True)
    def toy_max(deltas, weights, options, module):
        stack = np.stack([d.astype(np.float64) * w for d, w in zip(deltas, weights)])  # (n, out, in)
        return np.sign(stack.sum(0)) * np.abs(stack).max(0)

    try:
        _check_toy_method(sources, toy_max)
    finally:
        del merge_methods.METHODS["toy_max"]  # the registry as it was


def _check_toy_method(sources, toy_max):
    toy = open_merge(srcs(sources), [0.5, 0.5, 1.0, 0.7], "toy_max", 0.5)
    deltas = [b.astype(np.float32) @ a.astype(np.float32) for b, a in (s.factors(MODULES[0]) for s in toy.sources)]
    want = toy_max(deltas, toy.weights, toy.options, MODULES[0])
    np.testing.assert_array_equal(toy.delta(MODULES[0]), want)
    assert toy.recipe()["method"] == "toy_max" and toy.recipe()["seed"] is None  # no seed: the method takes none
    linear = open_merge(srcs(sources), [0.5, 0.5, 1.0, 0.7]).delta(MODULES[0])
    assert np.abs(toy.delta(MODULES[0]) - linear).max() > 1e-3 * np.abs(linear).max()
    from polytool.errors import PolytoolError

    with pytest.raises(PolytoolError, match="--seed applies to"):
        open_merge(srcs(sources), None, "toy_max", 0.5, seed=1)
