"""`polytool collapse`: every task's LoRA (loaded by PEFT) and dense model (loaded by transformers)
against PEFT's own routed Poly forward, on PEFT-made adapters of several shapes; then the file
contract: byte-for-byte copies, index, extra files, tied weights, refusals, atomicity, JSON."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from polytool.cli import main

from conftest import TASK_TYPES, randomize_poly, tree_hash

SPECS = ("uniform", "mean")
# relative error max|a - b| / max|b| allowed against PEFT's routed forward, per base dtype and artifact;
# the bfloat16 figures are measured bounds (docs/collapse.md), the dense one includes rounding W' to bf16
TOL = {(torch.float32, "lora"): 1e-5, (torch.float32, "dense"): 1e-5,
       (torch.bfloat16, "lora"): 1e-2, (torch.bfloat16, "dense"): 2e-2}
CASES = {
    "llama-f32-q2-single": dict(kind="llama", r=3, n_splits=2),
    "qwen2-f32-q1-sharded": dict(kind="qwen2", r=5, n_splits=1, shard_size="20KB"),
    # not the pooler's dense: PEFT's Poly needs 3-D inputs
    "bert-f32-q2-single": dict(kind="bert", r=3, n_splits=2, targets=("query", "value", "intermediate.dense", "output.dense")),
    "llama-bf16-q4-sharded": dict(kind="llama", r=2, n_splits=4, n_skills=3, dtype=torch.bfloat16, shard_size="20KB",
                                  targets=("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj")),
}


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def collapse_json(*args) -> dict:
    res = run("collapse", *args, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def auto_class(kind: str):
    import transformers as tf

    return tf.AutoModel if TASK_TYPES[kind] == "FEATURE_EXTRACTION" else tf.AutoModelForCausalLM


def forward(model, ids: torch.Tensor, task: int | None = None) -> torch.Tensor:
    kwargs = {} if task is None else {"task_ids": torch.full((ids.shape[0],), task)}
    with torch.no_grad():
        out = model(input_ids=ids, **kwargs)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(record.getMessage())


def load_lora_silently(kind: str, base_dir: Path, lora_dir: Path, dtype):
    """PeftModel.from_pretrained of a collapsed LoRA, asserting PEFT emits no warning at all."""
    from peft import PeftModel

    base = auto_class(kind).from_pretrained(base_dir, dtype=dtype)
    handler, loggers = Recorder(), [logging.getLogger("peft"), logging.getLogger("transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(base, lora_dir).eval()
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    # library deprecations (FutureWarning: transformers' is_gradient_checkpointing, called by PEFT for any
    # adapter) are not about the file; anything else (unknown config keys, missing keys) fails the test
    caught = [w for w in caught if not issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not caught and not handler.records, [str(w.message) for w in caught] + handler.records
    return model


def load_dense(kind: str, directory: Path, dtype):
    model, info = auto_class(kind).from_pretrained(directory, dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def peft_references(kind: str, adapter: Path, base_dir: Path, dtype, ids) -> dict:
    """PEFT's routed Poly outputs for every task, uniform and mean (logits set to give those weights)."""
    from peft import PeftModel

    base = auto_class(kind).from_pretrained(base_dir, dtype=dtype)
    model = PeftModel.from_pretrained(base, adapter).eval()
    n_tasks = json.loads((adapter / "adapter_config.json").read_text())["n_tasks"]
    refs = {t: forward(model, ids, t) for t in range(n_tasks)}
    routers = [m for n, m in model.named_modules() if n.endswith("poly_router.default")]
    saved = [r.module_logits.detach().clone() for r in routers]
    with torch.no_grad():
        for r in routers:  # uniform: logit 0 everywhere -> 1/n_skills after normalisation
            r.module_logits.zero_()
        refs["uniform"] = forward(model, ids, 0)
        for r, logits in zip(routers, saved):  # mean: logit(m) with m the mean normalised weights, in (0, 1)
            w = torch.sigmoid(logits.double()).view(n_tasks, r.n_splits, r.n_skills)
            m = (w / w.sum(-1, keepdim=True)).mean(0).reshape(1, -1)
            r.module_logits.copy_(torch.log(m / (1 - m)).expand_as(logits))
        refs["mean"] = forward(model, ids, 0)
    refs["base"] = forward(auto_class(kind).from_pretrained(base_dir, dtype=dtype).eval(), ids)
    return refs


@pytest.fixture(scope="session", params=list(CASES))
def case(request, make_peft_adapter, tmp_path_factory):
    """One adapter shape: PEFT references, then every collapsed artifact, inputs hashed around it."""
    params = CASES[request.param]
    dtype = params.get("dtype", torch.float32)
    adapter, base_dir = make_peft_adapter(**params)
    n_tasks = 3
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    hashes = tree_hash(adapter), tree_hash(base_dir)
    refs = peft_references(params["kind"], adapter, base_dir, dtype, ids)
    out = tmp_path_factory.mktemp(f"collapse-{request.param}")
    lora_all = collapse_json(adapter, "--task", "all", "--out", out / "lora-all")
    specs = list(range(n_tasks)) + list(SPECS)
    for spec in SPECS:
        collapse_json(adapter, "--task", spec, "--out", out / f"lora-{spec}")
    dense = {spec: collapse_json(adapter, "--task", spec, "--out", out / f"dense-{spec}", "--to", "dense")
             for spec in specs}  # base found through the adapter's base_model_name_or_path
    assert (tree_hash(adapter), tree_hash(base_dir)) == hashes, "an input was written to"
    return dict(params, name=request.param, dtype=dtype, adapter=adapter, base=base_dir, ids=ids, refs=refs,
                out=out, specs=specs, n_tasks=n_tasks, lora_all=lora_all, dense=dense)


def lora_dir(case, spec) -> Path:
    return case["out"] / ("lora-all" if isinstance(spec, int) else f"lora-{spec}") / (f"task-{spec}" if isinstance(spec, int) else "")


def test_lora_matches_peft_poly(case):
    """Each collapsed LoRA, loaded by PEFT without a warning, reproduces PEFT's routed Poly forward."""
    tol = TOL[(case["dtype"], "lora")]
    refs = case["refs"]
    assert rel_err(refs["base"], refs[0]) > 10 * tol, "negative control: the adapter must change the output"
    for spec in case["specs"]:
        model = load_lora_silently(case["kind"], case["base"], lora_dir(case, spec), case["dtype"])
        got = forward(model, case["ids"])
        assert rel_err(got, refs[spec]) <= tol, (spec, rel_err(got, refs[spec]))
        other = (spec + 1) % case["n_tasks"] if isinstance(spec, int) else 0
        assert rel_err(got, refs[other]) > 10 * tol, f"negative control: {spec} vs task {other}"


def test_dense_matches_peft_poly(case):
    """Each merged model, loaded by transformers (no missing keys), reproduces PEFT's routed forward."""
    tol = TOL[(case["dtype"], "dense")]
    refs = case["refs"]
    for spec in case["specs"]:
        model = load_dense(case["kind"], case["out"] / f"dense-{spec}", case["dtype"])
        got = forward(model, case["ids"])
        assert rel_err(got, refs[spec]) <= tol, (spec, rel_err(got, refs[spec]))
        other = (spec + 1) % case["n_tasks"] if isinstance(spec, int) else 0
        assert rel_err(got, refs[other]) > 3 * tol, f"negative control: {spec} vs task {other}"


def test_lora_files(case):
    """--task all: one LoRA per task and an index; PEFT's config keys; provenance in the metadata."""
    out = case["out"] / "lora-all"
    index = json.loads((out / "polytool_tasks.json").read_text())
    assert index["tasks"] == {str(t): f"task-{t}" for t in range(case["n_tasks"])}
    assert sorted(p.name for p in out.iterdir()) == (["SERVING.md", "polytool_tasks.json", "serving.json"]
                                                     + [f"task-{t}" for t in range(case["n_tasks"])])
    assert case["lora_all"]["files"][-3:] == ["polytool_tasks.json", "serving.json", "SERVING.md"]
    assert case["lora_all"]["task"] == "all" and set(case["lora_all"]["manifest"]) == {"vllm", "tgi"}
    raw = (out / "task-1" / "adapter_config.json").read_text()
    config = json.loads(raw)
    assert list(config) == sorted(config)
    assert (config["peft_type"], config["lora_alpha"], config["r"], config["use_rslora"], config["bias"]) == \
        ("LORA", 1, case["r"], False, "none")
    assert config["fan_in_fan_out"] is False and config["lora_dropout"] == 0
    with safe_open(out / "task-1" / "adapter_model.safetensors", "pt") as f:
        meta = f.metadata()
        key = next(k for k in f.keys() if k.endswith(".lora_A.weight"))
        assert key.startswith("base_model.model.") and f.get_tensor(key).dtype == torch.float32
    assert meta["format"] == "pt" and meta["polytool.task"] == "1"
    assert len(meta["polytool.source_sha256"]) == 64
    routing = json.loads(meta["polytool.routing"])
    assert len(routing) * 2 == case["lora_all"]["tensors"] // case["n_tasks"]
    assert "PeftModel.from_pretrained" in (out / "task-1" / "README.md").read_text()


def test_dense_layout(case):
    """Untouched tensors byte for byte, the index and total_size kept, format pt on every shard."""
    base, out = case["base"], case["out"] / "dense-0"
    data = case["dense"][0]
    assert data["tensors_merged"] > 0 and data["tensors_converted"] == 0
    base_files = sorted({p.name for p in base.iterdir()} | {"README.md"})  # the merged model's own card
    assert sorted(p.name for p in out.iterdir()) == base_files == data["files"]
    index = base / "model.safetensors.index.json"
    if index.exists():
        assert json.loads((out / index.name).read_text()) == json.loads(index.read_text())
    merged = 0
    for shard in (p.name for p in base.glob("*.safetensors")):
        with safe_open(base / shard, "pt") as a, safe_open(out / shard, "pt") as b:
            assert b.metadata()["format"] == "pt" and list(a.keys()) == list(b.keys())
            for key in a.keys():
                x, y = a.get_tensor(key), b.get_tensor(key)
                assert x.dtype == y.dtype and x.shape == y.shape
                if torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
                    continue
                merged += 1
    assert merged == data["tensors_merged"]  # every other tensor is the same bytes
    assert data["tensors_copied"] + merged == sum(1 for _ in _all_keys(base))


def _all_keys(directory: Path):
    for shard in directory.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            yield from f.keys()


# ---- the file contract, on the llama float32 adapter ---------------------------------------


@pytest.fixture(scope="session")
def llama(make_peft_adapter):
    return make_peft_adapter("llama", r=3, n_splits=2, shard_size="20KB")


def test_extra_files_and_foreign_weights(llama, tmp_path):
    """Every non-weight file and folder comes along; stale .bin weights do not; shard files are copied
    whole when nothing in them is merged."""
    adapter, base = llama
    copy = tmp_path / "base"
    shutil.copytree(base, copy)
    (copy / "modules.json").write_text('[{"idx": 0, "path": ""}]')
    (copy / "1_Pooling").mkdir()
    (copy / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (copy / "tokenizer.json").write_text("{}")
    (copy / "pytorch_model.bin").write_bytes(b"stale")
    data = collapse_json(adapter, "--task", "2", "--out", tmp_path / "out", "--to", "dense", "--base", copy)
    out = tmp_path / "out"
    for rel in ("modules.json", "1_Pooling/config.json", "tokenizer.json", "config.json", "generation_config.json"):
        assert (out / rel).read_bytes() == (copy / rel).read_bytes(), rel
    assert not (out / "pytorch_model.bin").exists() and "1_Pooling/config.json" in data["files"]
    untouched = [s for s in copy.glob("model-*.safetensors")
                 if not any(k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")) for k in safe_open(s, "pt").keys())]
    assert untouched, "the fixture should have a shard without adapted tensors"
    for shard in untouched:
        assert (out / shard.name).read_bytes() == shard.read_bytes()


def test_output_refused_without_force(llama, tmp_path):
    adapter, base = llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    for to in ("lora", "dense"):
        res = run("collapse", adapter, "--task", "0", "--out", out, "--to", to)
        assert res.exit_code == 2 and "already exists" in res.stderr and "--force" in res.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "keep").exists()
    # --force replaces only what polytool wrote: a folder of someone's files is not (issue 21)
    res = run("collapse", adapter, "--task", "0", "--out", out, "--to", "dense", "--force")
    assert res.exit_code == 2 and "not an output polytool wrote" in res.stderr and (out / "keep").exists()
    (out / "keep").unlink()  # an empty folder may be replaced
    collapse_json(adapter, "--task", "0", "--out", out, "--to", "dense", "--force")
    collapse_json(adapter, "--task", "1", "--out", out, "--to", "lora", "--force")  # polytool's own: replaced
    assert (out / "adapter_config.json").exists() and not (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("args, message", [
    (("--task", "3"), "task 3 is out of range: this adapter has tasks 0..2"),
    (("--task", "x"), "invalid task 'x'"),
    (("--task", "all", "--to", "dense"), "--task all writes one LoRA per task"),
    (("--task", "0", "--to", "dense", "--base", "{bert}"), "has no weight in the base checkpoint"),
    (("--task", "0", "--to", "dense", "--base", "{binonly}"), "holds only PyTorch .bin weights"),
    (("--task", "0", "--to", "dense", "--base", "{adapter}"), "no config.json"),
    (("--task", "0", "--out", "{adapter}/sub"), "overlaps the input"),
])
def test_refused_runs_write_nothing(llama, make_base, tmp_path, args, message):
    adapter, base = llama
    binonly = tmp_path / "binonly"
    binonly.mkdir()
    (binonly / "config.json").write_text('{"model_type": "llama"}')
    (binonly / "pytorch_model.bin").write_bytes(b"x")
    fill = {"bert": make_base("bert"), "binonly": binonly, "adapter": adapter}
    args = [a.format(**fill) for a in args]
    if "--out" not in args:
        args += ["--out", tmp_path / "out"]
    before = tree_hash(adapter), sorted(p.name for p in tmp_path.iterdir())
    res = run("collapse", adapter, *args)
    assert res.exit_code == 2, res.output
    assert message in res.stderr and "Traceback" not in res.output
    assert (tree_hash(adapter), sorted(p.name for p in tmp_path.iterdir())) == before


@pytest.fixture(scope="session")
def tied(tmp_path_factory):
    """A llama with tie_word_embeddings and a PEFT Poly adapter on lm_head and q_proj."""
    import transformers as tf
    from peft import PolyConfig, get_peft_model

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    base_dir = tmp_path_factory.mktemp("tied-base")
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(base_dir)
    with warnings.catch_warnings():  # PEFT warns that it cannot tie adapters: the point of this fixture
        warnings.simplefilter("ignore")
        model = get_peft_model(tf.AutoModelForCausalLM.from_pretrained(base_dir),
                               PolyConfig(task_type="CAUSAL_LM", r=2, n_tasks=2, n_skills=2, n_splits=2,
                                          target_modules=["lm_head", "q_proj"]))
    randomize_poly(model)
    adapter = tmp_path_factory.mktemp("tied-adapter")
    model.save_pretrained(adapter, save_embedding_layers=False)  # Poly tensors only
    return adapter, base_dir


def test_tied_lm_head_refused_then_untied(tied, tmp_path):
    adapter, base = tied
    with safe_open(base / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # stored once, as the embeddings
    res = run("collapse", adapter, "--task", "1", "--out", tmp_path / "out", "--to", "dense")
    assert res.exit_code == 2 and "tied to model.embed_tokens.weight" in res.stderr and "--untie" in res.stderr
    assert not any(tmp_path.iterdir())
    data = collapse_json(adapter, "--task", "1", "--out", tmp_path / "out", "--to", "dense", "--untie")
    assert data["untied"] == ["lm_head.weight"]
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    with safe_open(base / "model.safetensors", "pt") as a, safe_open(out / "model.safetensors", "pt") as b:
        assert torch.equal(a.get_tensor("model.embed_tokens.weight"), b.get_tensor("model.embed_tokens.weight"))
        assert "lm_head.weight" in b.keys()
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():  # PEFT: "no implementation exists to tie the adapters"
        warnings.simplefilter("ignore")
        refs = peft_references("llama", adapter, base, torch.float32, ids)
    got = forward(load_dense("llama", out, torch.float32), ids)
    assert rel_err(got, refs[1]) <= 1e-5 and rel_err(got, refs[0]) > 1e-3


def test_base_found_in_hf_cache(llama, tmp_path, monkeypatch):
    """base_model_name_or_path 'org/tiny' resolves to the cached snapshot (offline); else exit 2."""
    adapter, base = llama
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / "abc123"
    shutil.copytree(base, snapshot)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("abc123")
    moved = tmp_path / "adapter"
    shutil.copytree(adapter, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/tiny"}))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    data = collapse_json(moved, "--task", "0", "--out", tmp_path / "out", "--to", "dense")
    assert Path(data["base"]) == snapshot
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    res = run("collapse", moved, "--task", "0", "--out", tmp_path / "out2", "--to", "dense")
    assert res.exit_code == 2 and "'org/tiny' is neither a local directory nor in the Hugging Face cache" in res.stderr
    assert "--base" in res.stderr and not (tmp_path / "out2").exists()


def test_human_output_and_no_torch(llama, tmp_path):
    """Human output is a few lines; neither path imports torch."""
    adapter, base = llama
    code = (
        "import sys; from polytool.cli import main\n"
        "for args in (['--out', sys.argv[2]], ['--out', sys.argv[3], '--to', 'dense']):\n"
        "    try: main(['collapse', sys.argv[1], '--task', 'mean', *args])\n"
        "    except SystemExit as e: assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(adapter), str(tmp_path / "l"), str(tmp_path / "d")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("wrote LoRA for task mean") and lines[2].startswith("wrote dense model")
    assert "copied byte for byte" in lines[3] and res.stderr == ""


def test_half_precision_lora(llama, tmp_path):
    """--dtype bfloat16 rounds the LoRA factors once; PEFT loads them silently; close to float32's."""
    adapter, base = llama
    data = collapse_json(adapter, "--task", "1", "--out", tmp_path / "bf16", "--dtype", "bfloat16")
    collapse_json(adapter, "--task", "1", "--out", tmp_path / "f32")
    assert data["dtype"] == "bfloat16"
    with safe_open(tmp_path / "bf16" / "adapter_model.safetensors", "pt") as h, \
            safe_open(tmp_path / "f32" / "adapter_model.safetensors", "pt") as f:
        for key in f.keys():
            assert h.get_tensor(key).dtype == torch.bfloat16
            assert torch.equal(h.get_tensor(key), f.get_tensor(key).to(torch.bfloat16)), key
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    half = forward(load_lora_silently("llama", base, tmp_path / "bf16", torch.float32), ids)
    full = forward(load_lora_silently("llama", base, tmp_path / "f32", torch.float32), ids)
    assert 0 < rel_err(half, full) < 1e-2
    res = run("collapse", adapter, "--task", "1", "--out", tmp_path / "x", "--untie")
    assert res.exit_code == 2 and "--max-shard-size and --untie apply to --to dense only" in res.stderr
