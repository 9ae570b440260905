"""One merged or converted tensor of the dense merge, block of rows by block of rows, on worker threads.

Each block: its rows read with pread, decoded to the arithmetic dtype, the delta's rows added, rounded once
to the output dtype, refused where that overflows, and written at its place in the output with pwrite. Blocks
are independent, so up to `WORKERS` of them are computed and written at once (numpy's loops, BLAS, pread and
pwrite release the GIL): every block's bytes are what one thread computes, whatever the number of threads.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor, wait
from contextlib import contextmanager
from math import prod
from pathlib import Path
from queue import SimpleQueue
from typing import Callable, Iterator

import numpy as np

from ..errors import CheckpointError, PolytoolError
from ..formats.safetensors import DTYPES, TORCH_NAMES, SafetensorsFile, bf16_to_f32, cast_float
from ..formats.safetensors_writer import pwrite_all

BLOCK_BYTES = 1 << 20  # float32 bytes of one block of rows merged at once
# threads computing blocks: one per core this process may use, up to 4 (a merge is ~0.4 GB/s of bfloat16 per
# thread here, the writing thread ~3 GB/s); one (no pool) on a single core
WORKERS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
# blocks in flight per worker: the writer waits for the oldest block while the others finish; one ahead per
# worker left each worker idle about half the time (py-spy of the 1.08 GB merge), four keep them busy
AHEAD = 4
Delta = Callable[..., None]  # (lo, hi, transposed, into, out): rows lo:hi of the delta as stored, added to `into`
# (computed in the buffer `out` where it is not added in one pass)


def read_rows(fd: int, offset: int, dtype: str, shape: tuple[int, ...], out: np.ndarray | None = None) -> np.ndarray:
    """Rows read with pread (not the mmap: pages read this way do not stay in our resident set), into `out`
    (of the dtype's storage type and `shape`) where given."""
    out = np.empty(shape, dtype=DTYPES[dtype][0]) if out is None else out
    view = memoryview(out.reshape(-1).view(np.uint8)) if out.size else memoryview(b"")
    while view.nbytes:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise CheckpointError("unexpected end of file while reading a tensor")
        view, offset = view[n:], offset + n
    return out


@contextmanager
def block_pool() -> Iterator[Executor | None]:
    """The threads that compute the blocks of one merge (None on a single core: blocks() computes them itself)."""
    if WORKERS < 2:
        yield None
        return
    with ThreadPoolExecutor(WORKERS, "polytool-merge") as pool:
        yield pool


class _Buffers:
    """One block's working arrays, reused block after block (fresh arrays per block cost more in new pages
    than the arithmetic): the rows as read, decoded (float32), the delta's rows, the rounding's scratch and
    result (written before the buffers are reused)."""

    def __init__(self, op, step: int, shape: tuple[int, ...], wide: type):
        bf16 = op.source_dtype == "BF16" and wide is np.float32
        rows = (step,) + tuple(shape[1:])
        self.raw = np.empty(rows, DTYPES[op.source_dtype][0])
        self.decoded = np.empty(rows, np.float32) if bf16 else None
        self.delta = np.empty(rows, wide) if op.targets and not any(t.transposed for t in op.targets) else None
        self.scratch = np.empty(rows, np.uint32) if bf16 and op.out.dtype == "BF16" else None
        self.result = np.empty(rows, np.uint16) if self.scratch is not None else None


def blocks(op, src: SafetensorsFile, fd: int, deltas: Callable, pool: Executor | None,
           out: tuple[int, int]) -> Iterator[int]:
    """The output tensor of a merged or converted op (dense.Op), block of rows by block of rows, each written at
    its place in `out` (fd, offset of the tensor's first byte) by the thread that computed it (os.pwrite: the
    writes of the blocks overlap each other and the arithmetic); yields each block's byte count, in order.
    Computed on `pool`'s threads (None: here), several blocks ahead of the one yielded."""
    shape = src.shape(op.source) or (1,)
    rows, row_len = shape[0], prod(shape[1:])
    wide = np.float64 if "F64" in (op.source_dtype, op.out.dtype) or op.out.dtype == "F32" else np.float32
    row_bytes = row_len * DTYPES[op.out.dtype][1]

    def written(lo: int, array: np.ndarray) -> int:
        view = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        pwrite_all(out[0], view, out[1] + lo * row_bytes)
        return view.nbytes

    if op.replace:  # a trained head: small, written whole
        yield written(0, cast_float(op.replace().astype(wide), op.out.dtype))
        return
    step = max(1, min(rows, BLOCK_BYTES // max(1, 4 * row_len)))
    start = src.data_start + src.entries[op.source]["offsets"][0]
    # each module's delta and the rows of the tensor it is merged into (all of them, or its block of a fused key)
    parts = [((t.rows or (0, rows)), deltas(t.module, wide), t.transposed) for t in op.targets]
    spare: SimpleQueue = SimpleQueue()  # buffer sets not in use: one per block in flight at most

    def block(lo: int, hi: int) -> int:
        bufs = spare.get() if not spare.empty() else _Buffers(op, step, shape, wide)
        try:
            return written(lo, _merge_rows(op, src, fd, start + lo * row_len * DTYPES[op.source_dtype][1], lo, hi,
                                           parts, bufs, wide))
        finally:
            spare.put(bufs)

    if pool is None:
        for lo in range(0, rows, step):
            yield block(lo, min(rows, lo + step))
        return
    ahead: deque = deque()
    try:
        for lo in range(0, rows, step):
            ahead.append(pool.submit(block, lo, min(rows, lo + step)))
            if len(ahead) > AHEAD * WORKERS:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()
    finally:  # stopped early (an error): nothing may read the file once the caller closes it
        for future in ahead:
            future.cancel()
        wait(ahead)


def _merge_rows(op, src: SafetensorsFile, fd: int, offset: int, lo: int, hi: int, parts: list,
                bufs: _Buffers, wide: type) -> np.ndarray:
    """Rows lo:hi of the output tensor, in one of `bufs` or a new array (valid until the buffers are reused);
    `parts` [((first, last), Delta, transposed)]: each module's delta, added to the rows [first, last) of the
    tensor that hold its weight."""
    n = hi - lo
    raw = read_rows(fd, offset, op.source_dtype, (n,) + bufs.raw.shape[1:], bufs.raw[:n])
    x = bf16_to_f32(raw, None if bufs.decoded is None else bufs.decoded[:n]) if op.source_dtype == "BF16" else raw
    scratch = None if bufs.scratch is None else bufs.scratch[:n]
    result = None if bufs.result is None else bufs.result[:n]
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, in one line
        x = x.astype(wide, copy=False)
        for (first, last), delta, transposed in parts:
            a, b = max(lo, first), min(hi, last)
            if a < b:  # (rows, in), or (rows, out) for Conv1D
                delta(a - first, b - first, transposed, x[a - lo:b - lo], None if bufs.delta is None else bufs.delta[:b - a])
        if op.out.dtype == "BF16" and x.dtype == np.float32 and x.size and _well_inside(x):
            return cast_float(x, "BF16", scratch, finite=True, out=result)  # no NaN, nothing rounds to Inf
        out = cast_float(x, op.out.dtype, scratch)
    if not _finite(out, op.out.dtype).all():
        source = read_rows(fd, offset, op.source_dtype, (n,) + bufs.raw.shape[1:])
        _check_non_finite(op, source, out, src.path)
    return out


def _well_inside(x: np.ndarray) -> bool:
    """Every value of the (contiguous, float32) block finite and below 2^64 in magnitude, far inside bfloat16's
    range, in one BLAS pass: x . x is finite only then (a NaN or Inf, or a square beyond float32's range, makes it
    NaN or Inf), where min and max take two passes (4% of a block's arithmetic). A block it turns away (its sum of
    squares may overflow with every value in range) takes the checked path, which writes the same bytes."""
    flat = x.reshape(-1)
    return bool(np.isfinite(np.dot(flat, flat)))


def _finite(values: np.ndarray, dtype: str) -> np.ndarray:
    """Elementwise: not NaN or Inf (BF16 as uint16 bit patterns: exponent bits all ones means NaN or Inf)."""
    return (values & 0x7F80) != 0x7F80 if dtype == "BF16" else np.isfinite(values)


def _check_non_finite(op, source: np.ndarray, out: np.ndarray, shard: Path) -> None:
    """Refuse a block holding NaN/Inf that polytool made (an overflow) or that an adapted base weight holds.
    NaN/Inf a converted tensor already held (e.g. a -inf mask buffer) are kept as the base has them."""
    if (_finite(source, op.source_dtype) & ~_finite(out, op.out.dtype)).any():
        what = "merging the task into it" if op.targets else "converting it"
        raise PolytoolError(f"tensor {op.out.name!r}: {what} overflows {TORCH_NAMES[op.out.dtype]} "
                            "(values beyond its range): write a wider dtype with --dtype float32")
    if op.targets:
        raise CheckpointError(f"weight {op.source!r} holds NaN or Inf: the base checkpoint is broken", shard)
