"""Fuzzing the readers with hypothesis: whatever the bytes, the outcome is a result or a PolytoolError.

Mutated and generated safetensors files, adapter directories and base-model JSON go through the
safetensors header parser, the adapter reader (inspect and collapse, through the CLI) and the base
reader with the merge planner. Never another exception, and never a hang (each example runs under
an alarm). Examples are derandomized, so a run is reproducible.
"""
from __future__ import annotations

import json
import shutil
import signal
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polytool.formats.adapter import load_adapter
from polytool.formats.base import open_base
from polytool.formats.safetensors import DTYPES, FLOAT_DTYPES, SafetensorsFile
from polytool.formats.safetensors_writer import save_file
from polytool.cli import main
from polytool.errors import PolytoolError
from polytool.collapse.dense import DenseOptions, plan_merge

ROOT = Path(__file__).resolve().parent.parent
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ALARM_S = 20  # far beyond any example's time: only a hang reaches it


@contextmanager
def no_hang():
    def alarm(*_):
        raise TimeoutError(f"no result after {ALARM_S} s: a hang")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(ALARM_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def read_all(path: Path) -> None:
    """Open a safetensors file and read every tensor; only a CheckpointError may stop it."""
    try:
        with SafetensorsFile(path) as f:
            for name in f.keys():
                arr = f.array(name)
                assert arr.nbytes == f.nbytes(name) and arr.shape == f.shape(name)
                if f.dtype(name) in FLOAT_DTYPES:
                    f.float_array(name, np.float32)
    except PolytoolError:
        pass


def valid_file() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        rng = np.random.default_rng(0)
        save_file(Path(d) / "x.safetensors", {
            "a": rng.standard_normal((3, 4)).astype(np.float32), "b": ("BF16", rng.integers(0, 1 << 16, 6, dtype=np.uint16)),
            "c": np.arange(5, dtype=np.int64), "d": np.zeros((0, 3), np.float16)}, {"format": "pt", "k": "v"})
        return (Path(d) / "x.safetensors").read_bytes()


VALID = valid_file()
HEADER_END = 8 + struct.unpack("<Q", VALID[:8])[0]

mutation = st.one_of(
    st.tuples(st.just("set"), st.integers(0, len(VALID) - 1), st.integers(0, 255)),
    st.tuples(st.just("set"), st.integers(0, HEADER_END - 1), st.sampled_from(b'{}[]",:0123456789-e. ')),
    st.tuples(st.just("cut"), st.integers(0, len(VALID)), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, len(VALID)), st.integers(0, 255)),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1), st.just(0)),
)


def mutate(data: bytes, changes) -> bytes:
    buf = bytearray(data)
    for kind, pos, value in changes:
        pos = min(pos, len(buf))
        if kind == "set" and pos < len(buf):
            buf[pos] = value
        elif kind == "cut":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = bytes([value])
        elif kind == "length" and len(buf) >= 8:
            buf[:8] = struct.pack("<Q", pos)
    return bytes(buf)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(changes=st.lists(mutation, min_size=1, max_size=4))
def test_header_parser_on_mutated_bytes(changes, scratch):
    path = scratch / "mutated.safetensors"
    path.write_bytes(mutate(VALID, changes))
    with no_hang():
        read_all(path)


json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.text(max_size=8))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                 st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=12)
dims = st.lists(st.one_of(st.integers(-2, 6), st.integers(0, 2**62), st.booleans(), st.floats(0, 4)), max_size=3)
entry = st.fixed_dictionaries({"dtype": st.one_of(st.sampled_from(list(DTYPES)), json_value), "shape": st.one_of(dims, json_value),
                               "data_offsets": st.one_of(st.lists(st.integers(-8, 200), min_size=2, max_size=2), json_value)})
header = st.one_of(json_value, st.dictionaries(st.one_of(st.text(max_size=10), st.just("__metadata__")),
                                               st.one_of(entry, json_value), max_size=4))


@FUZZ
@given(head=header, data_len=st.integers(0, 256))
def test_header_parser_on_generated_headers(head, data_len, scratch):
    raw = json.dumps(head).encode()
    path = scratch / "generated.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(range(256))[:data_len])
    with no_hang():
        read_all(path)


@pytest.fixture(scope="module")
def adapter_dir(scratch) -> Path:
    out = scratch / "adapter"
    shutil.copytree(ROOT / "fixtures/poly", out)
    return out


def run_cli(*args) -> None:
    """inspect/collapse: exit 0 or 2 (a PolytoolError), never an escaped exception."""
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code in (0, 2) and (res.exception is None or isinstance(res.exception, SystemExit)), res.exception
    assert "Traceback" not in res.output


@FUZZ
@given(changes=st.lists(mutation, min_size=1, max_size=3), header_only=st.booleans())
def test_adapter_reader_on_mutated_weights(changes, header_only, adapter_dir, scratch):
    weights = adapter_dir / "adapter_model.safetensors"
    good = (ROOT / "fixtures/poly/adapter_model.safetensors").read_bytes()
    end = 8 + struct.unpack("<Q", good[:8])[0]
    # positions drawn for the small VALID file: scaled onto this header, or anywhere in the file
    scale = (end if header_only else len(good)) / len(VALID)
    weights.write_bytes(mutate(good, [(k, int(p * scale) if k != "length" else p, v) for k, p, v in changes]))
    with no_hang():
        run_cli("inspect", adapter_dir, "--json")


CONFIG_FIELDS = ["peft_type", "poly_type", "r", "n_tasks", "n_skills", "n_splits", "target_modules", "exclude_modules",
                 "modules_to_save", "base_model_name_or_path", "revision", "task_type", "fan_in_fan_out"]


@FUZZ
@given(edits=st.dictionaries(st.sampled_from(CONFIG_FIELDS), json_value, min_size=1, max_size=3), to=st.sampled_from(["lora", "dense"]))
def test_adapter_config_fields(edits, to, adapter_dir, scratch):
    (adapter_dir / "adapter_model.safetensors").write_bytes((ROOT / "fixtures/poly/adapter_model.safetensors").read_bytes())
    config = json.loads((ROOT / "fixtures/poly/adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(ROOT / "fixtures/tiny-llama")
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, **edits}))
    out = Path(tempfile.mkdtemp(dir=scratch)) / "out"
    with no_hang():
        run_cli("collapse", adapter_dir, "--task", "0", "--to", to, "--out", out)
    shutil.rmtree(out.parent)


with SafetensorsFile(ROOT / "fixtures/tiny-llama/model.safetensors") as _f:
    KEYS = _f.keys()
SHARDS = {k: f"model-0000{1 + (i >= 10)}-of-00002.safetensors" for i, k in enumerate(KEYS)}  # the right weight_map


@pytest.fixture(scope="module")
def base_and_adapter(scratch):
    """fixtures/tiny-llama in two shards (its index and config are what each example writes), fixtures/poly."""
    base = scratch / "base"
    shutil.copytree(ROOT / "fixtures/tiny-llama", base)
    with SafetensorsFile(base / "model.safetensors") as f:
        for shard in sorted(set(SHARDS.values())):
            save_file(base / shard, {k: f.array(k) for k in KEYS if SHARDS[k] == shard}, {"format": "pt"})
    (base / "model.safetensors").unlink()
    return base, load_adapter(ROOT / "fixtures/poly")


weight_map = st.one_of(json_value, st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=20)),
                                                   st.one_of(st.sampled_from(sorted(set(SHARDS.values())) + ["", "..", "../x", "nope"]),
                                                             json_value), max_size=4).map(lambda edits: {**SHARDS, **edits}))
index = st.one_of(json_value, st.fixed_dictionaries({"weight_map": weight_map}, optional={"metadata": json_value}))
base_config = st.one_of(json_value, st.dictionaries(st.sampled_from(["model_type", "tie_word_embeddings", "text_config", "dtype"]),
                                                    json_value, max_size=3))


@FUZZ
@given(index=index, config=base_config)
def test_base_reader_and_planner(index, config, base_and_adapter):
    base, adapter = base_and_adapter
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    (base / "config.json").write_text(json.dumps(config))
    with no_hang():
        try:
            plan_merge(adapter, 0, open_base(base), DenseOptions("BF16", untie=True, max_shard_size=50_000))
        except PolytoolError:
            pass
