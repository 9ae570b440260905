"""Bad input, interruptions and read-only inputs, through the real CLI.

Every bad input (base directories, artifacts, outputs, adapter fields the other commands read) gets
exit code 2 and one line on stderr naming the problem, documented in docs/troubleshooting.md; no
traceback and nothing left behind. A dense merge killed with SIGKILL never leaves an OUT that looks
complete, and its rerun succeeds; a full disk is one clear line. Every command leaves its inputs
byte for byte as they were, even when they are symbolic links; no source loads pickles unsafely.
(The adapter reader's own bad inputs are in test_adapter.py.)
"""
from __future__ import annotations

import ast
import json
import logging
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from polytool.formats.safetensors import SafetensorsFile
from polytool.formats.safetensors_writer import TensorSpec, SafetensorsWriter, save_file
from polytool.formats.jsonfile import write_json
from polytool.cli import main

from conftest import tree_hash

ROOT = Path(__file__).resolve().parent.parent
POLYTOOL = Path(sys.executable).parent / "polytool"
IDX = "model.safetensors.index.json"
S1, S2, S3 = (f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))
Q = "model.layers.0.self_attn.q_proj.weight"  # in S2 (see sharded_base)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def leftovers(out: Path) -> list[str]:
    """What a run left beside `out`: its temporary or backup directories (named after OUT, maybe shortened)."""
    if not out.parent.is_dir():
        return []
    found = (re.fullmatch(r"\.(.+)\.polytool-(tmp|old)-\d+", p.name) for p in out.parent.iterdir())
    return sorted(m[0] for m in found if m and out.name.startswith(m[1]))


def _template(text: str) -> re.Pattern:
    """A documented message, `<placeholders>` matching anything."""
    return re.compile(".*?".join(re.escape(part) for part in re.split(r"<[^>]*>", text)))


DOCUMENTED = [_template(m) for _, m in re.findall(r"^\| (`+)(.+?)\1 \|", (ROOT / "docs/troubleshooting.md").read_text(), re.M)]


def refused(res, fragment: str, out: Path | None = None) -> str:
    """Exit 2, one documented line naming the problem, no traceback, no output left behind."""
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output
    line = res.stderr.rstrip("\n")
    assert line.startswith("error: ") and "\n" not in line, line
    assert fragment in line, line
    assert any(t.search(line) for t in DOCUMENTED), f"not in docs/troubleshooting.md: {line}"
    if out is not None:
        assert not os.path.lexists(out) and not leftovers(out), leftovers(out)
    return line


# ---- inputs: the shipped tiny Llama split into three shards, the shipped MHR adapter --------------


@pytest.fixture(scope="session")
def sharded_base(tmp_path_factory) -> Path:
    """fixtures/tiny-llama in three shards with an index (q_proj of layer 0 lies in the second)."""
    out = tmp_path_factory.mktemp("sharded") / "base"
    out.mkdir()
    with SafetensorsFile(ROOT / "fixtures/tiny-llama/model.safetensors") as st:
        keys = st.keys()
        weight_map = {}
        for shard, group in zip((S1, S2, S3), (keys[:7], keys[7:14], keys[14:])):
            save_file(out / shard, {k: st.array(k) for k in group}, {"format": "pt"})
            weight_map.update(dict.fromkeys(group, shard))
        total = sum(st.nbytes(k) for k in keys)
    assert weight_map[Q] == S2
    write_json(out / IDX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    for f in (ROOT / "fixtures/tiny-llama").iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def adapter(tmp_path_factory, sharded_base) -> Path:
    """fixtures/mhr (4 tasks, 4 splits, r 4) naming the sharded base as its base model."""
    out = tmp_path_factory.mktemp("mhr") / "adapter"
    shutil.copytree(ROOT / "fixtures/mhr", out)
    config = json.loads((out / "adapter_config.json").read_text())
    write_json(out / "adapter_config.json", {**config, "base_model_name_or_path": str(sharded_base)})
    return out


def edit_json(name: str, fn):
    def mutate(d: Path) -> None:
        data = json.loads((d / name).read_text())
        fn(data)
        (d / name).write_text(json.dumps(data))
    return mutate


def edit_header(fn, shard: str = S2):
    """Edit a shard's raw header JSON (`fn(header)` may also return new raw bytes), keeping the data."""
    def mutate(d: Path) -> None:
        raw = (d / shard).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        text = fn(header) or json.dumps(header).encode()
        (d / shard).write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    return mutate


def set_tensor(key: str, fn, shard: str = S2):
    """Rewrite one tensor of a shard: fn(array) -> new array (any shape)."""
    def mutate(d: Path) -> None:
        with SafetensorsFile(d / shard) as st:
            tensors = {k: st.array(k).copy() for k in st.keys()}
        tensors[key] = fn(tensors.get(key))
        (d / shard).unlink()
        save_file(d / shard, tensors, {"format": "pt"})
    return mutate


def poke(index, value):
    def fn(a: np.ndarray) -> np.ndarray:
        a.flat[index] = value
        return a
    return fn


def setq(**entry):
    return edit_header(lambda h: h[Q].update(entry))


def write(name: str, data: bytes | str):
    return lambda d: (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def rename_q(d: Path) -> None:  # the adapter's q_proj weight is absent
    edit_header(lambda h: h.__setitem__("model.layers.0.self_attn.other.weight", h.pop(Q)))(d)
    edit_json(IDX, lambda j: j["weight_map"].__setitem__("model.layers.0.self_attn.other.weight", j["weight_map"].pop(Q)))(d)


def stored_twice(d: Path) -> None:
    with SafetensorsFile(d / S2) as st:
        save_file(d / "extra.safetensors", {Q: st.array(Q)}, {"format": "pt"})
    edit_json(IDX, lambda j: j["weight_map"].__setitem__("model.norm.weight", "extra.safetensors"))(d)


def every(fragment: str, commands: str = "dense lora verify") -> dict[str, str]:
    return dict.fromkeys(commands.split(), fragment)


DEEP = "[" * 100_000 + "]" * 100_000
BASE_CASES = {
    "truncated shard": (lambda d: (d / S2).write_bytes((d / S2).read_bytes()[:-1000]), every("truncated or corrupt: tensor")),
    "garbage shard": (write(S2, np.random.default_rng(0).bytes(5000)), every("not a safetensors file or truncated: header length")),
    "empty shard": (write(S2, b""), every("not a safetensors file (0 bytes")),
    "header lies about the dtype": (setq(dtype="F16"), every("F16 [64, 64] needs 8192 bytes but its offsets span 16384")),
    "header lies about the shape": (setq(shape=[64, 32]), every("F32 [64, 32] needs 8192 bytes but its offsets span 16384")),
    "header offsets past the end": (setq(data_offsets=[10**9, 10**9 + 16384]), every("claims bytes 1000000000..1000016384")),
    "header dtype unknown": (setq(dtype="Q4"), every("has unknown dtype 'Q4'")),
    "header dtype not a string": (setq(dtype=["F32"]), every("has unknown dtype ['F32']")),
    "header not UTF-8": (edit_header(lambda h: b'{"\xff": 1}    '), every("corrupt safetensors header (UnicodeDecodeError")),
    "header nested too deeply": (edit_header(lambda h: DEEP.encode()), every("corrupt safetensors header (JSONDecodeError: nested too deeply")),
    "config.json not JSON": (write("config.json", "{"), {**every("config.json: cannot read (JSONDecodeError", "dense lora"),
                                                          "verify": "cannot read config.json (OSError"}),
    "config.json not an object": (write("config.json", "[]"), every("config.json: not a JSON object", "dense lora")),
    "config.json nested too deeply": (write("config.json", DEEP), {**every("nested too deeply", "dense lora"),
                                                                    "verify": "cannot read config.json (RecursionError"}),
    "config.json not UTF-8": (write("config.json", b'{"model_type": "\xff"}'), every("config.json: cannot read (UnicodeDecodeError", "dense lora")),
    "config.json contradicts itself": (edit_json("config.json", lambda c: c.__setitem__("tie_word_embeddings", "no")),
                                       {**every("tie_word_embeddings must be true or false, got 'no'", "dense lora"),
                                        "verify": "cannot read config.json (StrictDataclassFieldValidationError"}),
    "no config.json": (lambda d: (d / "config.json").unlink(), every("no config.json")),
    "index not JSON": (write(IDX, "{"), {**every("cannot read the shard index (JSONDecodeError", "dense lora"),
                                         "verify": "cannot load the model (JSONDecodeError"}),
    "index nested too deeply": (write(IDX, DEEP), every("cannot read the shard index (JSONDecodeError: nested too deeply", "dense lora")),
    "index names a missing shard": (edit_json(IDX, lambda j: j["weight_map"].__setitem__(Q, "model-00009-of-00009.safetensors")),
                                    {**every("shard model-00009-of-00009.safetensors named by the index is missing", "dense lora"),
                                     "verify": "cannot load the model (FileNotFoundError"}),
    "index puts a key in the wrong shard": (edit_json(IDX, lambda j: j["weight_map"].__setitem__(Q, S1)),
                                            every(f"the index maps '{Q}' to {S1}, which does not hold it", "dense lora")),
    "index names a tensor no shard holds": (edit_json(IDX, lambda j: j["weight_map"].__setitem__("x.weight", S1)),
                                            every(f"the index maps 'x.weight' to {S1}, which does not hold it", "dense lora")),
    "index names a file outside": (edit_json(IDX, lambda j: j["weight_map"].__setitem__(Q, "../" + S2)),
                                   every("weight_map names files outside the directory: '../", "dense lora")),
    "index without a weight_map": (edit_json(IDX, lambda j: j.__setitem__("weight_map", [1])), every("not a shard index", "dense lora")),
    "index metadata not an object": (edit_json(IDX, lambda j: j.__setitem__("metadata", [1])),
                                     every("the index's metadata is not an object", "dense lora")),
    "a shard is a directory": (lambda d: ((d / S3).unlink(), (d / S3).mkdir()),
                               {**every(f"shard {S3} named by the index is not a regular file", "dense lora"),
                                "verify": "cannot read: Is a directory"}),
    "a tensor stored twice": (stored_twice, every(f"tensor '{Q}' is stored twice", "dense lora")),
    "no weights": (lambda d: [(d / n).unlink() for n in (S1, S2, S3, IDX)],
                   {"dense": "no model.safetensors or model.safetensors.index.json", "verify": "cannot load the model (OSError"}),
    "only .bin weights": (lambda d: ([(d / n).unlink() for n in (S1, S2, S3, IDX)], (d / "pytorch_model.bin").write_bytes(b"x")),
                          {"dense": "holds only PyTorch .bin weights"}),
    "adapted weight missing": (rename_q, {**every("module 'model.layers.0.self_attn.q_proj' of the adapter has no weight", "dense lora"),
                                          "verify": f"incomplete checkpoint: 1 weights missing or mis-shaped (e.g. {Q})"}),
    "adapter for another base (shape)": (set_tensor(Q, lambda a: a[:32]),
                                         {**every(f"the adapter needs a weight of shape [64, 64] (out, in), but {Q} is [32, 64]",
                                                  "dense lora"), "verify": "incomplete checkpoint: 1 weights missing or mis-shaped"}),
    "NaN in an adapted weight": (set_tensor(Q, poke(5, np.nan)), {"dense": f"weight '{Q}' holds NaN or Inf: the base checkpoint is broken",
                                                                   "verify": "the model's own outputs contain NaN or Inf"}),
    "Inf in an adapted weight": (set_tensor(Q, poke(0, -np.inf)), {"dense": f"weight '{Q}' holds NaN or Inf"}),
    "a broken symlink": (lambda d: os.symlink(d / "nowhere", d / "tokenizer.model"),
                         {"dense": "tokenizer.model is a broken symbolic link, which cannot be copied along"}),
    "a symlink loop": (lambda d: ((d / "sub").mkdir(), os.symlink("..", d / "sub" / "up")),
                       {"dense": "sub/up is a symbolic link to a directory that contains it (a loop)"}),
    "a named pipe": (lambda d: os.mkfifo(d / "pipe"), {"dense": "pipe is not a regular file or directory (a pipe, socket or device)"}),
    "an empty directory": (lambda d: [p.unlink() for p in d.iterdir()], every("no config.json")),
}
COMMANDS = {
    "dense": lambda adapter, base, out: ("collapse", adapter, "--task", "0", "--to", "dense", "--base", base, "--out", out),
    "lora": lambda adapter, base, out: ("collapse", adapter, "--task", "0", "--base", base, "--out", out),
    "verify": lambda adapter, base, out: ("verify", adapter, "--base", base, "--task", "0", "--inputs", "1", "--seq-len", "4"),
}


@pytest.mark.parametrize("case, command", [(c, cmd) for c, (_, frags) in BASE_CASES.items() for cmd in frags])
def test_bad_base(case, command, adapter, sharded_base, tmp_path, caplog):
    mutate, fragments = BASE_CASES[case]
    base = tmp_path / "base"
    shutil.copytree(sharded_base, base)
    mutate(base)
    before = tree_hash(base), tree_hash(adapter)
    out = tmp_path / "out"
    refused(run(*COMMANDS[command](adapter, base, out)), fragments[command], out)
    assert (tree_hash(base), tree_hash(adapter)) == before
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]  # e.g. transformers' tables


def test_bad_base_in_a_real_process(adapter, sharded_base, tmp_path):
    """What the user sees, library logging included: one line (in-process runs cannot see that stream)."""
    base = tmp_path / "base"
    shutil.copytree(sharded_base, base)
    set_tensor(Q, lambda a: a[:32])(base)
    res = subprocess.run([str(POLYTOOL), *map(str, COMMANDS["verify"](adapter, base, None))], capture_output=True, text=True)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == f"error: {base}: incomplete checkpoint: 1 weights missing or mis-shaped (e.g. {Q})\n"


def test_base_that_is_a_file(adapter, sharded_base, tmp_path):
    for command in COMMANDS:
        refused(run(*COMMANDS[command](adapter, sharded_base / "config.json", tmp_path / "out")),
                "config.json: is a file, expected a base model directory", tmp_path / "out")


def test_total_size_is_recomputed(adapter, sharded_base, tmp_path):
    """A wrong total_size says nothing about the weights (transformers ignores it): the output's is right."""
    base = tmp_path / "base"
    shutil.copytree(sharded_base, base)
    edit_json(IDX, lambda j: j["metadata"].__setitem__("total_size", 5))(base)
    assert run(*COMMANDS["dense"](adapter, base, tmp_path / "out")).exit_code == 0
    index = json.loads((tmp_path / "out" / IDX).read_text())
    assert index["metadata"]["total_size"] == json.loads((sharded_base / IDX).read_text())["metadata"]["total_size"]


def test_overflow_is_refused_and_stored_infinities_kept(adapter, sharded_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(sharded_base, base)
    set_tensor(Q, poke(3, 70000.0))(base)  # finite in float32, beyond float16's 65504
    out = tmp_path / "out"
    refused(run(*COMMANDS["dense"](adapter, base, out), "--dtype", "float16"),
            f"tensor '{Q}': merging the task into it overflows float16 (values beyond its range)", out)
    set_tensor(Q, poke(3, 1.0))(base)
    set_tensor("model.norm.weight", poke(0, 1e6), S3)(base)  # not adapted: converted only
    refused(run(*COMMANDS["dense"](adapter, base, out), "--dtype", "float16"),
            "tensor 'model.norm.weight': converting it overflows float16", out)
    set_tensor("model.norm.weight", poke(0, -np.inf), S3)(base)  # already -inf in the base (a mask, say): kept
    assert run(*COMMANDS["dense"](adapter, base, out), "--dtype", "float16").exit_code == 0
    with SafetensorsFile(out / S3) as st:
        assert st.float_array("model.norm.weight")[0] == -np.inf


# ---- outputs ------------------------------------------------------------------------------------


def test_bad_outputs(adapter, sharded_base, tmp_path):
    (tmp_path / "file").write_text("x")
    long = tmp_path / ("o" * 300)
    for command in ("dense", "lora"):
        refused(run(*COMMANDS[command](adapter, sharded_base, tmp_path / "file" / "out")),
                "cannot create the output: ", tmp_path / "file" / "out")
        refused(run(*COMMANDS[command](adapter, sharded_base, long)), "invalid output path (File name too long)", long)
        refused(run(*COMMANDS[command](adapter, sharded_base, adapter / "sub"), "--force"), "overlaps the input")
        refused(run(*COMMANDS[command](adapter, sharded_base, sharded_base), "--force"), "overlaps the input")
    # without --base, a LoRA export still reads the adapter's recorded base: it is an input too
    refused(run("collapse", adapter, "--task", "0", "--out", sharded_base, "--force"), "overlaps the input")
    assert (tmp_path / "file").read_text() == "x"


def test_long_output_names_fit(adapter, sharded_base, tmp_path):
    """250 bytes is a valid name; the temporary directory beside it is shortened to fit too."""
    for command in ("dense", "lora"):
        out = tmp_path / (command[0] * 250)
        assert run(*COMMANDS[command](adapter, sharded_base, out)).exit_code == 0
        assert out.is_dir() and not leftovers(out)


def test_non_utf8_and_long_names(adapter, sharded_base, tmp_path):
    """Non-UTF-8 directory names work where polytool opens the files itself; verify (torch's safetensors
    opens only UTF-8 paths) says so. A 20,000-character tensor name is carried like any other."""
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/ad\xff\xfe"))
    shutil.copytree(adapter, odd)
    assert run("inspect", odd, "--json").exit_code == 0
    res = run("collapse", odd, "--task", "0", "--base", sharded_base, "--json",
              "--out", Path(os.fsdecode(bytes(tmp_path) + b"/o\xff")))
    assert res.exit_code == 0, res.output
    assert "\\udcff" in (tmp_path / os.fsdecode(b"o\xff") / "README.md").read_text()
    refused(run("verify", odd, "--base", sharded_base, "--task", "0"), "the path is not valid UTF-8")
    base = tmp_path / "base"
    shutil.copytree(sharded_base, base)
    name = "x" * 20_000
    set_tensor(name, lambda _: np.ones(3, np.float32), S3)(base)
    edit_json(IDX, lambda j: j["weight_map"].__setitem__(name, S3))(base)
    assert run(*COMMANDS["dense"](adapter, base, tmp_path / "out")).exit_code == 0
    with SafetensorsFile(tmp_path / "out" / S3) as st:
        assert st.float_array(name).tolist() == [1, 1, 1]


# ---- artifacts (verify --against) and the adapter fields the other commands read -----------------


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, adapter, sharded_base) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("artifacts")
    for name, args in {"lora": ("--task", "0"), "all": ("--task", "all"), "dense": ("--task", "0", "--to", "dense")}.items():
        assert run("collapse", adapter, *args, "--base", sharded_base, "--out", root / name).exit_code == 0
    return {p.name: p for p in root.iterdir()}


ARTIFACT_CASES = {
    "an empty directory": ("empty", lambda d: None, "not a collapsed artifact"),
    "a file": ("lora/adapter_config.json", lambda d: None, "is a file, expected an artifact directory"),
    "LoRA config not JSON": ("lora", write("adapter_config.json", "{"), "cannot read the LoRA config (JSONDecodeError"),
    "LoRA weights truncated": ("lora", lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x10" + b"\0" * 20),
                               "not a safetensors file or truncated"),
    "task index nested too deeply": ("all", write("polytool_tasks.json", DEEP), "cannot read the task index (JSONDecodeError: nested too deeply"),
    "task index points outside": ("all", edit_json("polytool_tasks.json", lambda j: j["tasks"].__setitem__("0", "../lora")),
                                  "the task index names '../lora', not a subdirectory of its own"),
    "dense shard truncated": ("dense", lambda d: (d / S2).write_bytes((d / S2).read_bytes()[:500]), "not a safetensors file or truncated"),
}


@pytest.mark.parametrize("case", ARTIFACT_CASES)
def test_bad_artifact(case, artifacts, adapter, sharded_base, tmp_path):
    which, mutate, fragment = ARTIFACT_CASES[case]
    shutil.copytree(artifacts["lora"].parent, tmp_path / "a")
    (tmp_path / "a" / "empty").mkdir()
    path = tmp_path / "a" / which
    mutate(path)
    before = tree_hash(tmp_path)
    refused(run("verify", adapter, "--base", sharded_base, "--against", path), fragment)
    assert tree_hash(tmp_path) == before


ADAPTER_FIELDS = {
    "modules_to_save": (5, "modules_to_save must be a module name, a list of names or null, got 5"),
    "target_modules": ([1, "q_proj"], "target_modules must be a module name, a list of names or null, got [1, 'q_proj']"),
    "task_type": (["CAUSAL_LM"], "task_type must be a string or null, got ['CAUSAL_LM']"),
    "base_model_name_or_path": (5, "base_model_name_or_path must be a string or null, got 5"),
    "revision": ({"main": 1}, "revision must be a string or null"),
}


@pytest.mark.parametrize("field", ADAPTER_FIELDS)
def test_adapter_fields_of_the_wrong_type(field, adapter, tmp_path):
    value, fragment = ADAPTER_FIELDS[field]
    bad = tmp_path / "adapter"
    shutil.copytree(adapter, bad)
    edit_json("adapter_config.json", lambda c: c.__setitem__(field, value))(bad)
    for args in (("inspect", bad), ("collapse", bad, "--task", "0", "--out", tmp_path / "out"),
                 ("collapse", bad, "--task", "0", "--to", "dense", "--out", tmp_path / "out")):
        refused(run(*args), fragment, tmp_path / "out")


@pytest.mark.parametrize("name", ["x" * 5000, "a\x00b", ""])
def test_unusable_recorded_base(name, adapter, tmp_path):
    """A base_model_name_or_path no file system takes is 'not found', never a crash."""
    bad = tmp_path / "adapter"
    shutil.copytree(adapter, bad)
    edit_json("adapter_config.json", lambda c: c.__setitem__("base_model_name_or_path", name))(bad)
    fragment = "pass --base DIR"
    refused(run("collapse", bad, "--task", "0", "--to", "dense", "--out", tmp_path / "out"), fragment, tmp_path / "out")
    assert run("collapse", bad, "--task", "0", "--out", tmp_path / "out").exit_code == 0  # a LoRA needs no base


def test_broken_adapter_through_the_other_commands(adapter, sharded_base, tmp_path):
    bad = tmp_path / "adapter"
    shutil.copytree(adapter, bad)
    raw = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(raw[: len(raw) // 2])
    for command in COMMANDS:
        refused(run(*COMMANDS[command](bad, sharded_base, tmp_path / "out")), "truncated or corrupt: tensor", tmp_path / "out")


# ---- symbolic links: read through, never written through -----------------------------------------


@pytest.fixture(scope="session")
def cached(tmp_path_factory, sharded_base, adapter) -> tuple[Path, Path]:
    """(hub cache, adapter naming 'org/tiny'): the base as a Hugging Face cache snapshot, every file a
    symbolic link to a blob outside the snapshot directory."""
    hub = tmp_path_factory.mktemp("hub")
    repo = hub / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    for f in sharded_base.iterdir():
        shutil.copy(f, repo / "blobs" / f"blob-{f.name}")
        os.symlink(f"../../blobs/blob-{f.name}", repo / "snapshots" / "abc" / f.name)
    named = tmp_path_factory.mktemp("cached-adapter") / "adapter"
    shutil.copytree(adapter, named)
    edit_json("adapter_config.json", lambda c: c.__setitem__("base_model_name_or_path", "org/tiny"))(named)
    return hub, named


READ_ONLY_COMMANDS = [
    ("inspect", "{a}"), ("inspect", "{a}", "--json"), ("inspect", "{a}", "--plot", "{o}/heat.png"),
    ("inspect", "{a}", "--report", "{o}/report.html"),
    ("collapse", "{a}", "--task", "0", "--out", "{o}/lora"),
    ("collapse", "{a}", "--task", "all", "--out", "{o}/all"),
    ("collapse", "{a}", "--task", "1", "--to", "dense", "--out", "{o}/dense"),
    ("collapse", "{a}", "--task", "mean", "--to", "dense", "--dtype", "bfloat16", "--max-shard-size", "100KB", "--out", "{o}/dense-bf16"),
    ("collapse", "{a}", "--task", "0", "--to", "dense", "--out", "{o}/dense", "--force"),
    ("verify", "{a}", "--task", "2", "--inputs", "1", "--seq-len", "8"),
    ("verify", "{a}", "--against", "{o}/lora", "--against", "{o}/dense", "--against", "{o}/all", "--inputs", "1", "--seq-len", "8"),
]


def test_every_command_leaves_its_inputs_alone(cached, tmp_path, monkeypatch):
    """Hash the adapter and the cache (blobs and links) around every command; outputs are plain files."""
    hub, named = cached
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    before = tree_hash(named), tree_hash(hub)
    for args in READ_ONLY_COMMANDS:
        res = run(*[a.format(a=named, o=tmp_path) for a in args])
        assert res.exit_code == 0, (args, res.output)
        assert (tree_hash(named), tree_hash(hub)) == before, args
    written = [p for p in tmp_path.rglob("*")]
    assert written and not any(p.is_symlink() for p in written)
    blobs = {p.stat().st_ino for p in (hub / "models--org--tiny" / "blobs").iterdir()}
    assert not blobs & {p.stat().st_ino for p in written if p.is_file()}  # copies, not hard links


def test_never_written_through_a_symlink(adapter, sharded_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(sharded_base, base)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("keep")
    before = tree_hash(base), tree_hash(adapter)
    # OUT a link to an input, OUT inside a linked input: refused even with --force
    os.symlink(base, tmp_path / "to-base")
    os.symlink(adapter, tmp_path / "to-adapter")
    refused(run(*COMMANDS["dense"](adapter, base, tmp_path / "to-base"), "--force"), "overlaps the input")
    refused(run(*COMMANDS["lora"](adapter, base, tmp_path / "to-adapter" / "out")), "overlaps the input")
    # the plot never lands in the adapter, not even through a link to its weights file
    os.symlink(adapter / "adapter_model.safetensors", tmp_path / "weights.png")
    refused(run("inspect", adapter, "--plot", tmp_path / "weights.png", "--force"), "overlaps the input")
    refused(run("inspect", adapter, "--plot", adapter / "heat.png"), "overlaps the input")
    os.symlink(adapter / "adapter_config.json", tmp_path / "config.html")
    refused(run("inspect", adapter, "--report", tmp_path / "config.html", "--force"), "overlaps the input")
    refused(run("inspect", adapter, "--report", adapter / "report.html"), "overlaps the input")
    # OUT a link elsewhere: --force replaces the link, never what it points to
    os.symlink(elsewhere, tmp_path / "out")
    assert run(*COMMANDS["dense"](adapter, base, tmp_path / "out"), "--force").exit_code == 0
    assert not (tmp_path / "out").is_symlink() and (elsewhere / "keep").read_text() == "keep"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep"]
    # a stale temporary name that is a link into an input: the link is removed, the input kept
    stale = tmp_path / ".out2.polytool-tmp-999999999"
    os.symlink(base, stale)
    assert run(*COMMANDS["dense"](adapter, base, tmp_path / "out2")).exit_code == 0
    assert not stale.is_symlink() and (tree_hash(base), tree_hash(adapter)) == before


# ---- interruptions and a full disk (real subprocesses) -------------------------------------------

LAYERS, HIDDEN, INTER, VOCAB = 3, 512, 1024, 2048
PROJ = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
        "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}


@pytest.fixture(scope="session")
def big(tmp_path_factory) -> tuple[Path, Path, int]:
    """(adapter, base, bytes): a float32 Llama-shaped base of about 40 MB in four shards, written with
    numpy and polytool's writer, and a Poly adapter on all seven projections."""
    root = tmp_path_factory.mktemp("big")
    base, adapter = root / "base", root / "adapter"
    base.mkdir()
    adapter.mkdir()
    rng = np.random.default_rng(0)
    tensors = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        tensors += [(f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}.weight", s) for p, s in PROJ.items()]
    tensors += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    groups = [tensors[i::4] for i in range(4)]
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-00004.safetensors"
        with SafetensorsWriter(base / name, [TensorSpec(n, "F32", s) for n, s in group], {"format": "pt"}) as w:
            for n, s in group:
                w.write(n, rng.standard_normal(s, dtype=np.float32) * 0.02)
        weight_map.update(dict.fromkeys((n for n, _ in group), name))
    nbytes = sum(int(np.prod(s)) * 4 for _, s in tensors)
    write_json(base / IDX, {"metadata": {"total_size": nbytes}, "weight_map": weight_map})
    write_json(base / "config.json", {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False})
    poly = {}
    for n, (d_out, d_in) in tensors[1:-2]:
        key = "base_model.model." + n.removesuffix(".weight")
        poly[key + ".poly_lora_A"] = rng.standard_normal((1, 2, d_in, 4), dtype=np.float32) * 0.1
        poly[key + ".poly_lora_B"] = rng.standard_normal((1, 2, 4, d_out), dtype=np.float32) * 0.1
        poly[key + ".poly_router.module_logits"] = rng.standard_normal((2, 2), dtype=np.float32)
    save_file(adapter / "adapter_model.safetensors", poly, {"format": "pt"})
    write_json(adapter / "adapter_config.json", {"peft_type": "POLY", "poly_type": "poly", "r": 4, "n_tasks": 2,
                                                 "n_skills": 2, "n_splits": 1, "target_modules": list(PROJ),
                                                 "base_model_name_or_path": str(base)})
    return adapter, base, nbytes


def merge_args(big, out: Path, task: int = 0) -> list[str]:
    adapter, base, _ = big
    return [str(POLYTOOL), "collapse", str(adapter), "--task", str(task), "--to", "dense", "--out", str(out)]


def written(tmp: Path) -> int:
    try:
        return sum(e.stat().st_size for e in os.scandir(tmp))
    except FileNotFoundError:  # renamed or removed meanwhile
        return 0


def kill_when(args: list[str], tmp: Path, nbytes: int) -> bool:
    """Start a merge, SIGKILL it once its temporary directory holds `nbytes`; True if it was still running."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = tmp.parent / tmp.name.replace("PID", str(proc.pid))
    while proc.poll() is None and not (work.is_dir() and written(work) >= nbytes):
        time.sleep(0.001)  # a poll interval, not a timing assumption
    proc.kill()
    return proc.wait() == -signal.SIGKILL


def test_sigkill_mid_merge_leaves_no_complete_looking_output(big, tmp_path):
    _, _, nbytes = big
    ref = tmp_path / "ref"
    assert subprocess.run(merge_args(big, ref)).returncode == 0
    want = tree_hash(ref)
    out = tmp_path / "out"
    killed = []
    for fraction in (0.0, 0.3, 0.7, 1.0):
        killed.append(kill_when(merge_args(big, out), tmp_path / ".out.polytool-tmp-PID", int(fraction * nbytes)))
        assert not out.exists() or tree_hash(out) == want  # absent, or complete (it finished first)
        force = ["--force"] if out.exists() else []
        rerun = subprocess.run(merge_args(big, out) + force, capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr
        assert tree_hash(out) == want and not leftovers(out)  # the killed run's temporary directory is gone
        shutil.rmtree(out)
    assert any(killed), "every run finished before the kill: nothing was tested"
    # replacing an existing output with --force: killed half way, the old output is intact
    old = tmp_path / "old"
    assert subprocess.run(merge_args(big, old, task=1)).returncode == 0
    before = tree_hash(old)
    kill_when(merge_args(big, old) + ["--force"], tmp_path / ".old.polytool-tmp-PID", nbytes // 2)
    assert tree_hash(old) in (before, want)
    assert subprocess.run(merge_args(big, old) + ["--force"]).returncode == 0
    assert tree_hash(old) == want and not leftovers(old)


def limit_file_size(limit: int):
    def preexec() -> None:  # in the child: writes past `limit` bytes fail with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


@pytest.mark.parametrize("to, limit", [("dense", 5 << 20), ("lora", 2048)])
def test_file_size_limit_is_one_clear_line(to, limit, big, tmp_path):
    adapter, base, _ = big
    out = tmp_path / "out"
    args = [str(POLYTOOL), "collapse", str(adapter), "--task", "0", "--to", to, "--out", str(out)]
    res = subprocess.run(args, capture_output=True, text=True, preexec_fn=limit_file_size(limit))
    assert res.returncode == 2 and res.stdout == "" and "Traceback" not in res.stderr
    line = res.stderr.rstrip("\n")
    assert "\n" not in line and "failed while writing the output: File too large" in line, line
    assert any(t.search(line) for t in DOCUMENTED)
    assert not out.exists() and not leftovers(out)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk(big, small_disk):
    adapter, base, _ = big
    out = small_disk / "out"
    res = subprocess.run(merge_args(big, out), capture_output=True, text=True)  # checked before writing
    assert res.returncode == 2 and "not enough disk space for" in res.stderr and not out.exists()
    res = subprocess.run([str(POLYTOOL), "collapse", str(adapter), "--task", "all", "--out", str(out)],
                         capture_output=True, text=True)  # a LoRA is not: the disk fills half way
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "failed while writing the output: No space left on device" in res.stderr
    assert not out.exists() and not leftovers(out)


# ---- no unsafe deserialisation anywhere in polytool/ ---------------------------------------------


def unsafe_calls(source: str) -> list[str]:
    """torch.load without weights_only=True, pickle/marshal/dill/joblib loads, np.load(allow_pickle=True),
    trust_remote_code=True: each as 'line: code'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        module, _, name = func.rpartition(".")
        kw = {k.arg: k.value for k in node.keywords}

        def true(key: str) -> bool:
            return isinstance(kw.get(key), ast.Constant) and kw[key].value is True

        torch_load = func == "torch.load" or (name == "load" and "weights_only" in kw)
        pickled = module in ("pickle", "marshal", "dill", "joblib", "cloudpickle") and name in ("load", "loads", "Unpickler")
        numpy_pickle = func in ("np.load", "numpy.load") and true("allow_pickle")
        if (torch_load and not true("weights_only")) or pickled or numpy_pickle or true("trust_remote_code"):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_unsafe_deserialisation():
    control = "import torch, pickle\ntorch.load(f)\npickle.loads(b)\nAutoModel.from_pretrained(p, trust_remote_code=True)\n"
    assert len(unsafe_calls(control)) == 3  # the scan sees what it must refuse
    assert unsafe_calls("torch.load(f, map_location='cpu', weights_only=True)\n") == []
    found = {str(f.relative_to(ROOT)): unsafe_calls(f.read_text()) for f in sorted((ROOT / "polytool").rglob("*.py"))}
    assert not {f: calls for f, calls in found.items() if calls}


def test_an_unforeseen_system_error_is_one_line(adapter, tmp_path, monkeypatch):
    """An OSError no check foresaw (here an I/O error reading the adapter) is exit 2 and one line;
    --debug shows the traceback instead."""
    import errno

    import polytool.formats.adapter

    def failing(*_args, **_kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(adapter / "adapter_model.safetensors"))

    monkeypatch.setattr(polytool.formats.adapter, "load_adapter", failing)
    res = CliRunner().invoke(main, ["inspect", str(adapter)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.stderr.strip().splitlines() == [
        f"error: Input/output error: {adapter / 'adapter_model.safetensors'} (rerun with --debug for a traceback)"]
    res = CliRunner().invoke(main, ["--debug", "inspect", str(adapter)])
    assert res.exit_code != 0 and isinstance(res.exception, OSError)  # the control: raised, not swallowed
