"""collapse --to gguf, proven in llama.cpp itself (llama-cpp-python) and against llama.cpp's own converter.

Bases are converted once per session by llama.cpp's convert_hf_to_gguf.py, run from llama.cpp's
sources: the unpacked llama-cpp-python sdist's vendor/llama.cpp ($POLYTOOL_LLAMA_CPP_SRC when set, else
fetched once by `pip download` of the installed version's sdist, pip's cache first, and unpacked into
~/.cache/polytool). The converter needs a SentencePiece tokenizer.model: a tiny one is trained here,
seeded. Cases: Llama MHR (llama.cpp's q/k row permutation) and Phi-3 (fused qkv and gate_up).
"""
from __future__ import annotations

import glob
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from polytool.formats.adapter import load_adapter
from polytool.cli import main
from polytool.errors import PolytoolError

gguf = pytest.importorskip("gguf", reason="the gguf package (polytool[gguf]) is not installed")
SENTENCES = ["the quick brown fox jumps over the lazy dog", "poly adapters route skills per task",
             "llama cpp runs gguf files", "a tiny vocabulary for tests", "every task mixes its skills"]


def llama_cpp_src() -> Path | None:
    """llama.cpp's sources with its converters: $POLYTOOL_LLAMA_CPP_SRC, else one unpacked before (our cache,
    or an sdist unpacked under /tmp)."""
    candidates = [os.environ.get("POLYTOOL_LLAMA_CPP_SRC", ""), str(_sdist_dir() / "vendor" / "llama.cpp")]
    candidates += sorted(glob.glob("/tmp/*/llama_cpp_python-*/vendor/llama.cpp"))
    return next((Path(c) for c in candidates if c and (Path(c) / "convert_lora_to_gguf.py").is_file()), None)


def _sdist_dir() -> Path:
    """Where the installed llama-cpp-python's sdist is unpacked: ~/.cache/polytool/llama_cpp_python-<version>."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("llama-cpp-python")
    except PackageNotFoundError:
        installed = "none"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "polytool"
    return cache / f"llama_cpp_python-{installed}"


def fetch_llama_cpp_src() -> Path:
    """`pip download` the installed llama-cpp-python's sdist (pip's cache serves it when the build left it
    there) and unpack it into _sdist_dir(), atomically; the converters only it carries are then found."""
    import tarfile
    import tempfile

    target = _sdist_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        spec = f"llama-cpp-python=={target.name.rpartition('-')[2]}"
        res = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                              spec, "-d", tmp], capture_output=True, text=True)
        archives = glob.glob(os.path.join(tmp, "llama_cpp_python-*.tar.gz"))
        if res.returncode != 0 or not archives:
            pytest.fail(f"llama.cpp's converters: `pip download {spec}` failed ({res.stderr.strip()[-300:]}); "
                        "set POLYTOOL_LLAMA_CPP_SRC to an unpacked llama-cpp-python sdist's vendor/llama.cpp")
        with tarfile.open(archives[0]) as tar:
            tar.extractall(tmp, filter="data")
        unpacked = next(p for p in Path(tmp).iterdir() if p.is_dir())
        if not target.exists():
            unpacked.rename(target)
    return target / "vendor" / "llama.cpp"


@pytest.fixture(scope="session")
def converters() -> Path:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    pytest.importorskip("sentencepiece", reason="sentencepiece (llama.cpp's converter needs it) is not installed")
    return llama_cpp_src() or fetch_llama_cpp_src()


@pytest.fixture(scope="session")
def tokenizer_model(converters) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 20), model_writer=buf, vocab_size=60,
                                   model_type="bpe", character_coverage=1.0, num_threads=1, minloglevel=2)
    return buf.getvalue()


def run_converter(script: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr[-2000:]


# GPT-2's converter takes a BPE tokenizer only when it knows its pre-tokenizer's hash, which a tiny test
# tokenizer cannot have: this wrapper names it "gpt-2" (tokenizer metadata only; the weights and the
# logits for given token ids do not depend on it). transformers 5 no longer writes GPT-2's n_ctx.
GPT2_WRAPPER = """
import runpy, sys
src = sys.argv[1]
sys.path[:0] = [src, src + "/gguf-py"]
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def gpt2_tokenizer(base: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES * 20, trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>"],
                                                                show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "n_ctx": config["n_positions"]}))


@pytest.fixture(scope="session")
def gguf_case(matrix_case, converters, tokenizer_model, tmp_path_factory):
    """gguf_case(name) -> (adapter_dir, base_dir, base.gguf): the matrix case's base with a tokenizer, converted."""
    cache: dict = {}

    def make(name: str):
        if name not in cache:
            case = matrix_case(name)
            root = tmp_path_factory.mktemp(f"gguf-{name}")
            base = root / "base"
            shutil.copytree(case.base_dir, base)
            args = [str(base), "--outfile", str(root / "base.gguf"), "--outtype", "f32"]
            if case.case.arch == "GPT-2":
                gpt2_tokenizer(base)
                (root / "convert_gpt2.py").write_text(GPT2_WRAPPER)
                run_converter(root / "convert_gpt2.py", str(converters), *args)
            else:
                (base / "tokenizer.model").write_bytes(tokenizer_model)
                run_converter(converters / "convert_hf_to_gguf.py", *args)
            cache[name] = (case.adapter_dir, base, root / "base.gguf")
        return cache[name]

    return make


def collapse(*args: str) -> dict:
    result = CliRunner().invoke(main, ["collapse", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("name", ["llama-mhr", "phi3-fused"])
def test_every_task_matches_the_routed_model_in_llama_cpp(gguf_case, name, tmp_path):
    """collapse --task all --to gguf: every task, run by llama.cpp, within the floor rule; a GGUF of
    another task fails (the negative control)."""
    from polytool.verify.gguf import GGUF_FLOOR_MULTIPLE as FLOOR_MULTIPLE, verify_gguf

    adapter, base, base_gguf = gguf_case(name)
    out = tmp_path / "ggufs"
    data = collapse(str(adapter), "--task", "all", "--to", "gguf", "--base", str(base), "--out", str(out))
    n_tasks = load_adapter(adapter).n_tasks
    assert data["files"][:n_tasks] == [f"task-{t}.gguf" for t in range(n_tasks)]
    assert "--lora" in data["manifest"]["llama.cpp"]["lines"][0]
    checks = verify_gguf(adapter, base, out, base_gguf, n_inputs=2, seq_len=16)
    assert [c["task"] for c in checks] == list(range(n_tasks))
    for c in checks:
        assert c["passed"], c
        assert c["max_abs_err"] <= FLOOR_MULTIPLE * c["floor"] and c["adapter_effect"] > 100 * c["floor"], c
        assert abs(c["gguf_effect"] - c["adapter_effect"]) <= 0.05 * c["adapter_effect"]  # llama.cpp applied it
    wrong = verify_gguf(adapter, base, out / "task-2.gguf", base_gguf, task="1", n_inputs=2, seq_len=16)[0]
    assert not wrong["passed"] and wrong["max_abs_err"] > 10 * wrong["allowed"], wrong


def test_gpt2_conv1d_in_llama_cpp(gguf_case, converters, tmp_path):
    """GPT-2 (Conv1D targets): our untransposed GGUF matches the routed model in llama.cpp, while what
    convert_lora_to_gguf.py writes from the same PEFT LoRA (transposed like the Conv1D weights) is
    refused by llama.cpp and by verify."""
    from polytool.verify.gguf import verify_gguf

    adapter, base, base_gguf = gguf_case("gpt2-conv1d")
    ours = tmp_path / "t1.gguf"
    collapse(str(adapter), "--task", "1", "--to", "gguf", "--base", str(base), "--out", str(ours))
    check = verify_gguf(adapter, base, ours, base_gguf, n_inputs=2, seq_len=16)[0]
    assert check["passed"] and check["adapter_effect"] > 100 * check["floor"], check
    collapse(str(adapter), "--task", "1", "--base", str(base), "--out", str(tmp_path / "lora"))
    run_converter(converters / "convert_lora_to_gguf.py", str(tmp_path / "lora"), "--base", str(base),
                  "--outfile", str(tmp_path / "theirs.gguf"), "--outtype", "f32")
    with pytest.raises(PolytoolError, match="its tensors are not this adapter's"):
        verify_gguf(adapter, base, tmp_path / "theirs.gguf", base_gguf, task="1")
    from polytool.verify.gguf import llama_logits

    with pytest.raises(PolytoolError, match="has incorrect shape"):  # llama.cpp's own refusal, surfaced
        llama_logits(base_gguf, np.zeros((1, 4), dtype=np.int64), tmp_path / "theirs.gguf")


def test_cli_exit_codes(gguf_case, tmp_path):
    """exit 0 for the right GGUF, 1 for another task's, 1 for a wrong q/k permutation, 2 for another base's."""
    from polytool.collapse.gguf import plan_gguf, write_gguf

    adapter, base, base_gguf = gguf_case("llama-mhr")
    runner = CliRunner()
    good = tmp_path / "t1.gguf"
    collapse(str(adapter), "--task", "1", "--to", "gguf", "--base", str(base), "--out", str(good))
    verify = ["verify", str(adapter), "--base", str(base), "--gguf-base", str(base_gguf), "--inputs", "2",
              "--seq-len", "16", "--against"]
    ok = runner.invoke(main, verify + [str(good), "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["checks"][0]["kind"] == "gguf"
    other_task = runner.invoke(main, verify + [str(good), "--task", "0"])
    assert other_task.exit_code == 1 and "FAIL" in other_task.stdout
    # llama.cpp's RoPE layout needs q/k rows permuted: the same file without it must fail
    adapter_obj = load_adapter(adapter)
    plan = plan_gguf(adapter_obj, base)
    unpermuted = replace(plan, targets=[replace(t, permute_heads=None) for t in plan.targets])
    write_gguf(adapter_obj, 1, unpermuted, tmp_path / "noperm.gguf")
    noperm = runner.invoke(main, verify + [str(tmp_path / "noperm.gguf"), "--json"])
    assert noperm.exit_code == 1 and not json.loads(noperm.stdout)["checks"][0]["passed"]
    # a GGUF LoRA for another base: refused before anything runs (provenance, then llama.cpp itself)
    phi_adapter, phi_base, phi_gguf = gguf_case("phi3-fused")
    collapse(str(phi_adapter), "--task", "1", "--to", "gguf", "--base", str(phi_base), "--out", str(tmp_path / "p.gguf"))
    foreign = runner.invoke(main, verify + [str(tmp_path / "p.gguf")])
    assert foreign.exit_code == 2 and "another adapter" in foreign.stderr
    wrong_base = runner.invoke(main, ["verify", str(adapter), "--base", str(base), "--gguf-base", str(phi_gguf),
                                      "--against", str(good), "--inputs", "2", "--seq-len", "16"])
    assert wrong_base.exit_code == 2 and "does not compute the HF base" in wrong_base.stderr
    no_base = runner.invoke(main, ["verify", str(adapter), "--base", str(base), "--against", str(good)])
    assert no_base.exit_code == 2 and "--gguf-base" in no_base.stderr
    tolerance = runner.invoke(main, verify + [str(good), "--atol", "1"])
    assert tolerance.exit_code == 2 and "do not apply to a GGUF check" in tolerance.stderr


def test_every_kind_in_one_run(gguf_case, tmp_path):
    """verify --against a GGUF folder, a LoRA, a dense model and a merge at once: the GGUF files run in llama.cpp,
    the others in transformers, one report lists each check with the proof that applied; --task 1 asked of all
    of them fails those that hold another task (exit 1), and the task-1 ones still pass."""
    adapter, base, base_gguf = gguf_case("llama-mhr")
    collapse(str(adapter), "--task", "all", "--to", "gguf", "--base", str(base), "--out", str(tmp_path / "ggufs"))
    collapse(str(adapter), "--task", "1", "--base", str(base), "--out", str(tmp_path / "lora"))
    collapse(str(adapter), "--task", "2", "--to", "dense", "--base", str(base), "--out", str(tmp_path / "dense"))
    merged = CliRunner().invoke(main, ["merge", f"{adapter}:0", f"{adapter}:1", "--method", "ties", "--density",
                                       "0.5", "--rank", "2", "--out", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    run = ["verify", str(adapter), "--base", str(base), "--gguf-base", str(base_gguf), "--inputs", "2", "--seq-len", "16"]
    against = lambda *names: [a for name in names for a in ("--against", str(tmp_path / name))]  # noqa: E731
    args = run + against("ggufs", "lora", "dense", "merged")
    res = CliRunner().invoke(main, args + ["--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    kinds = [c["kind"] for c in report["checks"]]
    assert kinds.count("gguf") == load_adapter(adapter).n_tasks and {"lora", "dense"} <= set(kinds)
    assert all(c["proof"] for c in report["checks"]) and report["summary"]["checks"] == len(kinds)
    text = CliRunner().invoke(main, args)
    assert text.exit_code == 0 and "proof: llama.cpp" in text.stdout and "all: PASS" in text.stdout
    wrong = CliRunner().invoke(main, run + against("ggufs", "lora", "dense") + ["--task", "1", "--json"])
    assert wrong.exit_code == 1
    verdicts = {(c["kind"], c["task"], c["passed"]) for c in json.loads(wrong.stdout)["checks"]}
    assert ("lora", 1, True) in verdicts and ("gguf", 1, True) in verdicts and ("dense", 1, False) in verdicts


@pytest.mark.parametrize("name", ["llama-mhr", "phi3-fused"])
def test_equals_llama_cpp_converter_tensor_for_tensor(gguf_case, converters, name, tmp_path):
    """Our GGUF == what convert_lora_to_gguf.py writes from our PEFT LoRA (collapse --to lora): names,
    shapes, types and bytes at f32; at f16 within one f16 step (it rounds the f32 LoRA, we round once); at q8_0
    the same types tensor by tensor (Q8_0, F16 where rows do not split into blocks of 32) and values within one
    quantisation step."""
    adapter, base, _ = gguf_case(name)
    collapse(str(adapter), "--task", "1", "--base", str(base), "--out", str(tmp_path / "lora"))
    for dtype, outtype in (("float32", "f32"), ("float16", "f16"), ("q8_0", "q8_0")):
        ours, theirs = tmp_path / f"ours-{outtype}.gguf", tmp_path / f"theirs-{outtype}.gguf"
        collapse(str(adapter), "--task", "1", "--to", "gguf", "--dtype", dtype, "--base", str(base), "--out", str(ours))
        run_converter(converters / "convert_lora_to_gguf.py", str(tmp_path / "lora"), "--base", str(base),
                      "--outfile", str(theirs), "--outtype", outtype)
        a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
        for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"):
            assert a.fields[key].contents() == b.fields[key].contents(), key
        ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
        assert list(ta) == list(tb) and len(ta) == 2 * len(load_adapter(adapter).modules)
        for k in ta:
            assert (ta[k].tensor_type, list(ta[k].shape)) == (tb[k].tensor_type, list(tb[k].shape)), k
            if outtype == "f32":
                assert np.array_equal(ta[k].data, tb[k].data), k
            elif ta[k].tensor_type == gguf.GGMLQuantizationType.Q8_0:
                x, y = (gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64) for t in (ta[k], tb[k]))
                assert np.abs(x - y).max() <= 1.01 * np.abs(y).max() / 127, k  # one step of the largest block
            else:
                x, y = ta[k].data.astype(np.float64), tb[k].data.astype(np.float64)
                assert np.all(np.abs(x - y) <= np.spacing(np.abs(ta[k].data)).astype(np.float64)), k
        assert a.fields["polytool.task"].contents() == "1"  # our provenance rides along


def test_refusals_are_one_line(matrix_case, tmp_path):
    """What llama.cpp cannot apply is refused before anything is written (exit 2, one line)."""
    runner = CliRunner()
    cases = {"qwen2-tied-lm_head": "an lm_head tied to the input embeddings",  # llama.cpp has no output tensor
             "t5-gated": "no GGUF LoRA support", "bert-feature": "no GGUF LoRA support"}
    for name, message in cases.items():
        case = matrix_case(name)
        out = tmp_path / f"{name}.gguf"
        result = runner.invoke(main, ["collapse", str(case.adapter_dir), "--task", "0", "--to", "gguf", "--base",
                                      str(case.base_dir), "--out", str(out)])
        assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.output
        assert not out.exists() and not list(tmp_path.glob(".*polytool-tmp*"))


def test_tied_lm_head_is_refused(matrix_case, tmp_path):
    from polytool.formats.safetensors import SafetensorsFile
    from polytool.formats.safetensors_writer import save_file

    case = matrix_case("qwen2-tied-lm_head")
    adapter = tmp_path / "adapter"
    shutil.copytree(case.adapter_dir, adapter, ignore=shutil.ignore_patterns("*.safetensors"))
    with SafetensorsFile(case.adapter_dir / "adapter_model.safetensors") as st:
        tensors = {k: st.array(k) for k in st.keys() if "base_layer" not in k}
    save_file(adapter / "adapter_model.safetensors", tensors, {"format": "pt"})
    result = CliRunner().invoke(main, ["collapse", str(adapter), "--task", "0", "--to", "gguf", "--base",
                                       str(case.base_dir), "--out", str(tmp_path / "x.gguf")])
    assert result.exit_code == 2 and "tied to the input embeddings" in result.stderr


def test_output_is_atomic_and_never_replaced_without_force(matrix_case, tmp_path):
    case = matrix_case("llama-mhr")
    args = ["collapse", str(case.adapter_dir), "--task", "0", "--to", "gguf", "--base", str(case.base_dir), "--out"]
    out = tmp_path / "t.gguf"
    out.write_text("keep")
    refused = CliRunner().invoke(main, args + [str(out)])
    assert refused.exit_code == 2 and out.read_text() == "keep"
    refused = CliRunner().invoke(main, args + [str(out), "--force"])  # not polytool's: --force does not take it
    assert refused.exit_code == 2 and "not an output polytool wrote" in refused.output and out.read_text() == "keep"
    out.unlink()
    stale = tmp_path / ".t.gguf.polytool-tmp-999999999"  # what a killed export leaves (its pid is gone)
    stale.write_bytes(b"half a GGUF")
    assert CliRunner().invoke(main, args + [str(out)]).exit_code == 0
    assert CliRunner().invoke(main, args + [str(out), "--force"]).exit_code == 0  # polytool's own: replaced
    assert out.read_bytes()[:4] == b"GGUF" and sorted(p.name for p in tmp_path.iterdir()) == ["t.gguf"]
    bad = CliRunner().invoke(main, args + [str(tmp_path / "u.gguf"), "--dtype", "float16", "--untie"])
    assert bad.exit_code == 2


def test_permute_rows_is_llama_cpp_permutation():
    """permute_rows on lora_b == LlamaModel.permute (convert_hf_to_gguf) on the dense delta B @ A."""
    from polytool.collapse.gguf import permute_rows

    rng = np.random.default_rng(0)
    n_head, head_dim, r, d_in = 4, 8, 3, 32
    lora_b, lora_a = rng.normal(size=(n_head * head_dim, r)), rng.normal(size=(r, d_in))
    dense = lora_b @ lora_a  # (out, in)
    reference = dense.reshape(n_head, 2, head_dim // 2, d_in).swapaxes(1, 2).reshape(dense.shape)
    assert np.array_equal(permute_rows(lora_b, n_head) @ lora_a, reference)
    assert not np.array_equal(permute_rows(lora_b, n_head), lora_b)  # it does move rows


def test_lora_manifest_lines(matrix_case, tmp_path):
    """collapse --task all (LoRA) writes and prints the vLLM, TGI lines users paste."""
    case = matrix_case("llama-mhr")
    out = tmp_path / "loras"
    result = CliRunner().invoke(main, ["collapse", str(case.adapter_dir), "--task", "all", "--out", str(out),
                                       "--base", str(case.base_dir)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "serving.json").read_text())
    paths = [str(out.absolute() / f"task-{t}") for t in range(3)]
    assert manifest["tgi"]["lines"] == ["LORA_ADAPTERS=" + ",".join(f"task-{t}={p}" for t, p in enumerate(paths))]
    vllm = manifest["vllm"]["lines"]
    assert "--max-lora-rank 8 --max-loras 3" in vllm[0] and all(f"task-{t}={p}" in vllm[0] for t, p in enumerate(paths))
    tokens = shlex.split(vllm[1])
    assert json.loads(tokens[tokens.index("--lora-modules") + 1]) == {
        "name": "task-0", "path": paths[0], "base_model_name": load_adapter(case.adapter_dir).base_model_name_or_path}
    assert manifest["tgi"]["lines"][0] in result.stdout and (out / "SERVING.md").is_file()


def test_shipped_gguf_base_is_llama_cpps_conversion_of_the_fixture(converters, tmp_path):
    """fixtures/tiny-llama.gguf is what fixtures/make_gguf_base.py makes with llama.cpp's converter, byte for
    byte, and llama.cpp computes the HF fixture with it: the README's `verify --gguf-base` line rests on it."""
    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    sys.path.insert(0, str(fixtures))
    import make_gguf_base

    out = tmp_path / "tiny-llama.gguf"
    make_gguf_base.convert(converters, out)
    assert out.read_bytes() == make_gguf_base.OUT.read_bytes()
    # and a correct GGUF LoRA of a trained adapter passes on it, another task's fails (the negative control)
    collapse(str(fixtures / "mhr"), "--task", "2", "--to", "gguf", "--out", str(tmp_path / "t2.gguf"))
    for task, code in (("2", 0), ("1", 1)):
        res = CliRunner().invoke(main, ["verify", str(fixtures / "mhr"), "--against", str(tmp_path / "t2.gguf"), "--task",
                                        task, "--gguf-base", str(make_gguf_base.OUT), "--json"])
        assert res.exit_code == code, res.output
