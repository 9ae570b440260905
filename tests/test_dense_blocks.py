"""collapse/blocks.py: a merged tensor of the dense merge, block of rows by block of rows, on worker threads.

Threads must not change a byte: every block is what one thread computes. Overflow and NaN are refused on
the fast path (a min/max check instead of a scan per element) as on the full one.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np
import pytest

from polytool.collapse import blocks as blk
from polytool.collapse.dense import Op, factored_delta
from polytool.errors import CheckpointError, PolytoolError
from polytool.formats.base import WeightTarget
from polytool.formats.safetensors import SafetensorsFile, bf16_to_f32, f32_to_bf16
from polytool.formats.safetensors_writer import TensorSpec, save_file

ROWS, COLS, R = 37, 24, 8  # 37 rows: the last block of every size below is short
RNG = np.random.default_rng(24)


def _factors(scale: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    return RNG.standard_normal((COLS, R)) * scale, RNG.standard_normal((R, ROWS)) * scale  # A (in, r), B (r, out)


def merge(tmp_path, bits: np.ndarray, A: np.ndarray, B: np.ndarray, workers: int, block_rows: int, monkeypatch) -> np.ndarray:
    """The merged bfloat16 bits of base `bits` (ROWS, COLS) plus the delta of A, B, through blocks(): what its
    threads wrote at their offsets in a file (after 24 bytes of something else)."""
    path = tmp_path / f"w{len(list(tmp_path.iterdir()))}.safetensors"
    save_file(path, {"w": ("BF16", bits)}, {"format": "pt"})
    monkeypatch.setattr(blk, "BLOCK_BYTES", block_rows * 4 * COLS)
    monkeypatch.setattr(blk, "WORKERS", workers)
    op = Op(TensorSpec("w", "BF16", (ROWS, COLS)), path.name, "w", "BF16", (WeightTarget("m", "w", "w", False, None),))
    fd = os.open(path, os.O_RDONLY)
    out = os.open(tmp_path / f"{path.stem}.out", os.O_RDWR | os.O_CREAT | os.O_EXCL)
    try:
        with SafetensorsFile(path) as st, ThreadPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
            written = list(blk.blocks(op, st, fd, lambda module, wide: factored_delta(A, B, R, wide), pool, (out, 24)))
        assert sum(written) == bits.nbytes
        return np.frombuffer(os.pread(out, bits.nbytes, 24), np.uint16).reshape(bits.shape)
    finally:
        os.close(fd)
        os.close(out)


def test_threads_write_the_bytes_of_one_thread(tmp_path, monkeypatch):
    """2 and 3 workers, blocks of 1, 5 and all rows, each written at its offset in reused buffers: the same bits as
    one thread, within half a bfloat16 ulp (plus float32 arithmetic) of the exact sum; the delta visibly changes
    the weight (the control)."""
    bits = f32_to_bf16((RNG.standard_normal((ROWS, COLS)) * 0.02).astype(np.float32))
    A, B = _factors()
    for block_rows in (1, 5, ROWS):
        one = merge(tmp_path, bits, A, B, 1, block_rows, monkeypatch)
        for workers in (2, 3):
            assert np.array_equal(merge(tmp_path, bits, A, B, workers, block_rows, monkeypatch), one), (workers, block_rows)
    exact = bf16_to_f32(bits).astype(np.float64) + (A @ B).T / R  # (out, in)
    got = bf16_to_f32(one).astype(np.float64)
    assert (np.abs(got - exact) <= np.abs(exact) * 2.0**-8 * 1.001).all()
    assert (one != bits).mean() > 0.5


def test_the_unchecked_rounding_only_takes_blocks_well_inside_bfloat16s_range():
    """The one-pass test (x . x finite) lets no NaN (whatever its payload: 0x7FFFFFFF and 0xFFFFFFFF wrap to zeros
    in the rounding's integer formula), no Inf and no value near bfloat16's largest (3.39e38) through; ordinary
    weights, zeros and subnormals pass."""
    largest = np.float32(np.array(0x7F7F0000, np.uint32).view(np.float32)[()])
    assert f32_to_bf16(np.array([0x7FFFFFFF, 0xFFFFFFFF], np.uint32).view(np.float32), finite=True).tolist() == [0x8000, 0]
    block = (RNG.standard_normal((4, 64)) * 0.02).astype(np.float32)
    block[1, :3] = [0.0, -0.0, 1e-40]
    assert blk._well_inside(block)
    for bits in (0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F800000, 0xFF800000):
        bad = block.copy()
        bad.view(np.uint32)[2, 7] = bits
        assert not blk._well_inside(bad), hex(bits)
    for value in (largest, -largest, np.float32(2.0**64)):
        bad = block.copy()
        bad[3, 63] = value
        assert not blk._well_inside(bad), value


@pytest.mark.parametrize("workers", [1, 2])
def test_overflow_and_nan_refused_on_threads(tmp_path, monkeypatch, workers):
    """A merge that overflows bfloat16 in one block in the middle, and a base weight holding NaN, are refused
    with their messages; a delta that reaches the largest finite bfloat16 without passing it is written."""
    bits = f32_to_bf16((RNG.standard_normal((ROWS, COLS)) * 0.02).astype(np.float32))
    bits[20, 3] = 0x7F7F  # the largest finite bfloat16, 3.39e38
    A, B = np.full((COLS, R), 1e18), np.zeros((R, ROWS))
    B[:, 20] = 1e18  # row 20 of the delta: 8 * 1e36 / 8 = 1e36 in every column, enough to pass bf16's range
    with pytest.raises(PolytoolError, match="tensor 'w': merging the task into it overflows bfloat16"):
        merge(tmp_path, bits, A, B, workers, 3, monkeypatch)
    B[:, 20] = 1e12  # 1e24: vanishes against 3.39e38, so the weight stays the largest finite value
    assert merge(tmp_path, bits, A, B, workers, 3, monkeypatch)[20, 3] == 0x7F7F
    nan = bits.copy()
    nan[30, 5] = 0x7FC0
    with pytest.raises(CheckpointError, match="weight 'w' holds NaN or Inf"):
        merge(tmp_path, nan, *_factors(), workers, 3, monkeypatch)
