"""The writing side of polytool.checkpoint: the streaming writer against safetensors' own loader,
bfloat16 rounding against torch's, index files and atomic output directories."""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from polytool.formats.safetensors import SafetensorsFile, bf16_to_f32, cast_float, f32_to_bf16, read_index
from polytool.formats.safetensors_writer import SafetensorsWriter, TensorSpec, save_file
from polytool.formats.atomic import atomic_output_dir, check_output
from polytool.errors import CheckpointError, OutputExistsError, PolytoolError

RNG = np.random.default_rng(0)


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16)


def test_round_trip_against_safetensors(tmp_path):
    """Every dtype we write, empty and 0-d tensors included, reads back identically with safetensors."""
    values = RNG.standard_normal((3, 5)).astype(np.float32)
    tensors = {
        "f32": values, "f64": values.astype(np.float64), "f16": values.astype(np.float16),
        "bf16": ("BF16", f32_to_bf16(values)), "i64": np.arange(7, dtype=np.int64), "u8": np.arange(4, dtype=np.uint8),
        "bool": np.array([True, False]), "empty": np.zeros((0, 4), np.float32), "empty_bf16": ("BF16", np.zeros((2, 0), np.uint16)),
        "scalar": np.array(2.5, dtype=np.float32),
    }
    path = tmp_path / "x.safetensors"
    save_file(path, tensors, {"format": "pt", "note": "hi"})
    loaded = load_file(path)
    assert sorted(loaded) == sorted(tensors)
    assert torch.equal(loaded["f32"], torch.from_numpy(values))
    assert torch.equal(loaded["f64"], torch.from_numpy(values).double())
    assert torch.equal(loaded["f16"], torch.from_numpy(values).half())
    assert loaded["bf16"].dtype == torch.bfloat16 and torch.equal(loaded["bf16"], torch.from_numpy(values).bfloat16())
    assert torch.equal(loaded["i64"], torch.arange(7)) and loaded["bool"].tolist() == [True, False]
    assert loaded["empty"].shape == (0, 4) and loaded["empty_bf16"].shape == (2, 0) and loaded["empty_bf16"].dtype == torch.bfloat16
    assert loaded["scalar"].shape == () and loaded["scalar"].item() == 2.5
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "hi"}
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0, "data must start 8-byte aligned"
    st = SafetensorsFile(path)
    assert st.keys() == list(tensors) and np.array_equal(bf16_to_f32(st.array("bf16")), torch.from_numpy(values).bfloat16().float().numpy())


def test_streaming_chunks_and_copies(tmp_path):
    """A tensor written in row blocks, and runs copied from another file, read back exactly."""
    a, b, c = (RNG.standard_normal(s).astype(np.float32) for s in ((6, 4), (5,), (2, 3)))
    src = tmp_path / "src.safetensors"
    save_file(src, {"a": a, "b": b, "c": c})
    specs = [TensorSpec("big", "F32", (6, 4)), TensorSpec("a", "F32", (6, 4)), TensorSpec("b", "F32", (5,))]
    with SafetensorsFile(src) as source, SafetensorsWriter(tmp_path / "out.safetensors", specs, {"format": "pt"}) as w:
        w.write("big", (a[i : i + 4] * 2 for i in range(0, 6, 4)))
        w.copy(["a", "b"], source)
    out = load_file(tmp_path / "out.safetensors")
    assert np.array_equal(out["big"].numpy(), a * 2) and np.array_equal(out["a"].numpy(), a) and np.array_equal(out["b"].numpy(), b)


def test_place_writes_a_tensor_at_its_offset_in_any_order(tmp_path):
    """`place`: the caller writes a tensor's pieces at their offsets (last piece first here), between tensors
    written in order and copied; the file reads back as if written in order. Fewer bytes than the tensor holds
    are refused (the control)."""
    from polytool.formats.safetensors_writer import pwrite_all

    a, b = RNG.standard_normal((6, 4)).astype(np.float32), RNG.standard_normal(5).astype(np.float32)
    mid = RNG.standard_normal((4, 4)).astype(np.float32)
    src = tmp_path / "src.safetensors"
    save_file(src, {"b": b})
    specs = [TensorSpec("a", "F32", (6, 4)), TensorSpec("mid", "F32", (4, 4)), TensorSpec("b", "F32", (5,))]

    def pieces(fd, start):  # rows 2: first, then rows :2, each where it belongs
        for lo, hi in ((2, 4), (0, 2)):
            view = memoryview(mid[lo:hi].reshape(-1).view(np.uint8))
            pwrite_all(fd, view, start + lo * 16)
            yield view.nbytes

    with SafetensorsFile(src) as source, SafetensorsWriter(tmp_path / "out.safetensors", specs) as w:
        w.write("a", a)
        w.place("mid", pieces)
        w.copy(["b"], source)
    out = load_file(tmp_path / "out.safetensors")
    assert all(np.array_equal(out[k].numpy(), v) for k, v in (("a", a), ("mid", mid), ("b", b)))
    with pytest.raises(CheckpointError, match=r"tensor 'x': got 8 bytes, F32 \[2, 2\] needs 16"):
        with SafetensorsWriter(tmp_path / "short.safetensors", [TensorSpec("x", "F32", (2, 2))]) as w:
            w.place("x", lambda fd, start: [os.pwrite(fd, b"\0" * 8, start)])


def test_writer_refuses_mistakes(tmp_path):
    specs = [TensorSpec("x", "F32", (2, 2)), TensorSpec("y", "F32", (3,))]
    with pytest.raises(PolytoolError, match="got tensor 'y', expected 'x' next"):
        with SafetensorsWriter(tmp_path / "a.safetensors", specs) as w:
            w.write("y", np.zeros(3, np.float32))
    with pytest.raises(CheckpointError, match=r"got 12 bytes, F32 \[2, 2\] needs 16"):
        with SafetensorsWriter(tmp_path / "b.safetensors", specs) as w:
            w.write("x", np.zeros(3, np.float32))
    with pytest.raises(PolytoolError, match="got float64 data for a 4-byte dtype"):
        with SafetensorsWriter(tmp_path / "c.safetensors", specs) as w:
            w.write("x", np.zeros(4))
    with pytest.raises(CheckpointError, match="incomplete: 1 tensors not written, next 'y'"):
        with SafetensorsWriter(tmp_path / "d.safetensors", specs) as w:
            w.write("x", np.zeros((2, 2), np.float32))
    with pytest.raises(FileExistsError):
        SafetensorsWriter(tmp_path / "d.safetensors", specs)  # never overwrites
    save_file(tmp_path / "s.safetensors", {"p": np.zeros(2, np.float32), "q": np.zeros(1, np.float32), "y": np.zeros(3, np.float32)})
    with SafetensorsFile(tmp_path / "s.safetensors") as src:
        with pytest.raises(PolytoolError, match="cannot copy 'x': source is F32 \\[2\\]"):
            with SafetensorsWriter(tmp_path / "e.safetensors", specs) as w:
                w.copy(["x"], _renamed(src, "p", "x"))
        with pytest.raises(PolytoolError, match="not adjacent"):
            with SafetensorsWriter(tmp_path / "f.safetensors", [TensorSpec("p", "F32", (2,)), TensorSpec("y", "F32", (3,))]) as w:
                w.copy(["p", "y"], src)


def _renamed(src: SafetensorsFile, old: str, new: str) -> SafetensorsFile:
    src.entries[new] = src.entries[old]
    return src


EDGES = np.array([0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001,
                  0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F7FFF, 0x7F7F8000, 0x00800000, 0x00000001, 0x807FFFFF,
                  0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F807FFF, 0x3F8000FF, 0xBF808000, 0x0000FFFF,
                  0x00008000, 0x00018000, 0x3FFFFFFF], dtype=np.uint32)


def test_f32_to_bf16_equals_torch():
    """Round-to-nearest-even like torch on random values, random bit patterns and edge cases
    (signed zeros, infinities, NaNs, ties to even, overflow to inf, subnormals)."""
    x = np.concatenate([
        RNG.standard_normal(100_000).astype(np.float32) * np.float32(10.0) ** RNG.integers(-30, 30, 100_000).astype(np.float32),
        RNG.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
        EDGES.view(np.float32),
    ])
    ours = f32_to_bf16(x)
    theirs = bf16_bits(torch.from_numpy(x).to(torch.bfloat16))
    nan = np.isnan(x)
    assert np.isnan(bf16_to_f32(ours[nan])).all() and np.isnan(bf16_to_f32(theirs[nan])).all()
    assert np.array_equal(ours[~nan], theirs[~nan])


def _exact_bf16(x: np.ndarray) -> np.ndarray:
    """Reference round-to-nearest-even float64 -> bfloat16 by comparing both neighbours (finite x)."""
    lo = f32_to_bf16_trunc(x)
    hi = lo + 1
    a, b = bf16_to_f32(lo).astype(np.float64), bf16_to_f32(hi).astype(np.float64)
    da, db = np.abs(x - a), np.abs(b - x)
    pick_hi = (db < da) | ((db == da) & (lo & 1 == 1))
    return np.where(pick_hi, hi, lo).astype(np.uint16)


def f32_to_bf16_trunc(x: np.ndarray) -> np.ndarray:
    """bfloat16 bits of x truncated toward zero (x float64, finite, in float32 range)."""
    y = x.astype(np.float32)
    back = y.astype(np.float64)
    bits = y.view(np.uint32).copy()
    bits[np.abs(back) > np.abs(x)] -= 1  # float32 rounding went away from zero
    return (bits >> 16).astype(np.uint16)


def test_cast_float_rounds_once():
    """float64 -> bfloat16 is one correct rounding (no double rounding through float32);
    float16 and float32 are numpy's own single roundings."""
    base = RNG.standard_normal(50_000) * 10.0 ** RNG.integers(-8, 8, 50_000)
    bf = bf16_to_f32(f32_to_bf16(base.astype(np.float32))).astype(np.float64)
    halfway = bf + np.abs(bf) * 2.0**-9  # exact bf16 ties, then nudged below/above by less than a float32 ulp
    x = np.concatenate([base, halfway, halfway * (1 + 2.0**-30), halfway * (1 - 2.0**-30)])
    assert np.array_equal(cast_float(x, "BF16"), _exact_bf16(x))
    double_rounded = f32_to_bf16(x.astype(np.float32))
    assert not np.array_equal(double_rounded, _exact_bf16(x)), "the nudged ties should trip double rounding"
    small = x[np.abs(x) < 6e4]
    assert np.array_equal(cast_float(small, "F16"), small.astype(np.float16))
    assert np.array_equal(cast_float(x, "F32"), x.astype(np.float32))
    with pytest.raises(PolytoolError, match="cannot round to I64"):
        cast_float(x, "I64")


def test_read_index(tmp_path):
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(json.dumps({"metadata": {"total_size": 12}, "weight_map": {"a": "model-1.safetensors"}}))
    assert read_index(path) == ({"total_size": 12}, {"a": "model-1.safetensors"})
    path.write_text(json.dumps({"weight_map": {"a": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match="names files outside the directory"):
        read_index(path)
    path.write_text("{")
    with pytest.raises(CheckpointError, match="cannot read the shard index"):
        read_index(path)


def test_atomic_output_dir(tmp_path):
    out = tmp_path / "a" / "out"
    mark = b'{"__metadata__": {"polytool.version": "x"}}'  # what makes an output polytool's (--force may replace it)
    with atomic_output_dir(out) as tmp:
        assert tmp.name == f".out.polytool-tmp-{__import__('os').getpid()}" and tmp.parent == out.parent
        (tmp / "f.safetensors").write_bytes(mark)
        assert not out.exists()
    assert (out / "f.safetensors").read_bytes() == mark and sorted(p.name for p in out.parent.iterdir()) == ["out"]
    with pytest.raises(OutputExistsError, match="already exists; pass --force"):
        with atomic_output_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, force=True) as tmp:
            (tmp / "g").write_text("2")
            raise RuntimeError("failed half way")
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"] and (out / "f.safetensors").exists()  # intact
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "g").write_text("2")
        assert (out / "f.safetensors").exists()  # replaced only once the new one is complete
    assert sorted(p.name for p in out.iterdir()) == ["g"] and sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_check_output_protects_inputs(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for out in (src, src / "sub", tmp_path):
        with pytest.raises(PolytoolError, match="overlaps the input"):
            check_output(out, force=True, inputs=[src])
    check_output(tmp_path / "other", force=False, inputs=[src])


def test_released_pages_read_again_and_tensor_views(tmp_path):
    """SafetensorsFile.release drops a tensor's mapped pages; reading it again must give the same values, and
    .tensor() is a zero-copy view in the stored dtype (bf16 included) equal to the decoded array."""
    import torch

    from polytool.formats.safetensors import SafetensorsFile
    from polytool.formats.safetensors_writer import save_file

    rng = np.random.default_rng(0)
    path = tmp_path / "t.safetensors"
    big = rng.standard_normal((300, 1000)).astype(np.float32)  # spans many pages
    save_file(path, {"big": big, "half": ("BF16", f32_to_bf16(big[:3]))})
    with SafetensorsFile(path) as st:
        before = st.float_array("big")
        st.release("big")
        assert np.array_equal(st.float_array("big"), before) and np.array_equal(before, big)
        view = st.tensor("half")
        assert view.dtype == torch.bfloat16 and view.shape == (3, 1000)
        assert np.array_equal(view.float().numpy(), st.float_array("half", np.float32))
        del view
