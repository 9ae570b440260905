"""Writing safetensors files: a streaming writer that takes a tensor (or chunks of one) at a time and copies
untouched tensors file to file in the kernel, and `save_file` for small files. The layout is the format's:
an 8-byte header length, the JSON header padded to 8 bytes, the tensors back to back in the header's order.
"""
from __future__ import annotations

import json
import os
import struct
from concurrent.futures import Executor
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Callable, Iterable, Union

import numpy as np

from ..errors import CheckpointError, PolytoolError
from .safetensors import DTYPES, SafetensorsFile


ALIGN = 8  # safetensors pads the header with spaces so that the data starts 8-byte aligned


COPY_CHUNK = 8 << 20


NUMPY_TO_ST = {np.dtype(v[0]).str: k for k, v in reversed(DTYPES.items()) if k not in ("BF16", "F8_E4M3", "F8_E5M2")}


Buffer = Union[bytes, bytearray, memoryview, np.ndarray]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a file to be written: name, safetensors dtype, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * DTYPES[self.dtype][1]


def st_dtype(arr: np.ndarray) -> str:
    """The safetensors dtype of a numpy array (uint16 reads as U16: name BF16 explicitly)."""
    name = NUMPY_TO_ST.get(arr.dtype.str)
    if name is None:
        raise PolytoolError(f"numpy dtype {arr.dtype} has no safetensors equivalent")
    return name


def encode_header(specs: list[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    """8-byte length + JSON header for `specs` laid out back to back, in order."""
    header: dict = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise PolytoolError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for spec in specs:
        if spec.dtype not in DTYPES:
            raise PolytoolError(f"tensor {spec.name!r}: unknown dtype {spec.dtype!r}, allowed: {', '.join(DTYPES)}")
        if spec.name in header:
            raise PolytoolError(f"tensor {spec.name!r} is listed twice")
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % ALIGN)
    return struct.pack("<Q", len(raw)) + raw


def _write_all(fd: int, view: memoryview) -> None:
    while view.nbytes:
        view = view[os.write(fd, view) :]


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    """All of `view` written at `offset` of `fd` (the file position is not used nor moved)."""
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _as_bytes(chunk: Buffer, itemsize: int, name: str) -> memoryview:
    if isinstance(chunk, np.ndarray):
        if chunk.dtype.itemsize != itemsize:
            raise PolytoolError(f"tensor {name!r}: got {chunk.dtype} data for a {itemsize}-byte dtype")
        chunk = np.ascontiguousarray(chunk)
        return memoryview(chunk.reshape(-1).view(np.uint8))
    return memoryview(chunk).cast("B")


def copy_range(src: int, offset: int, dst: int, length: int) -> None:
    """Copy `length` bytes at `offset` of fd `src` to fd `dst`'s position, in the kernel when it can."""
    try:
        while length:
            n = os.copy_file_range(src, dst, length, offset)
            if n == 0:
                raise OSError("unexpected end of file")
            offset, length = offset + n, length - n
    except (AttributeError, OSError):  # no copy_file_range here, or not between these files
        buf = bytearray(min(COPY_CHUNK, max(length, 1)))
        while length:
            n = os.preadv(src, [memoryview(buf)[: min(length, len(buf))]], offset)
            if n == 0:
                raise OSError("unexpected end of file") from None
            _write_all(dst, memoryview(buf)[:n])
            offset, length = offset + n, length - n


class SafetensorsWriter:
    """Write one safetensors file in a single pass: the header, then each tensor's bytes in order.

    Memory is whatever the caller hands over at once (a tensor, or chunks of one); `copy` moves
    tensors file to file without passing through Python. The file is created exclusively and,
    on `close`, checked complete and its writeback to disk started (not waited for: callers that
    need durability fsync, as `atomic_output_dir` does); on an exception it is closed as it stands.
    `background`: an executor that starts the writeback and closes the file (`released`, a future the
    caller waits for), so that the writing thread goes on with the next file meanwhile. (Waiting for the
    writeback there too, an fsync per file, kept a worker from the arithmetic: slower in the merge.)
    """

    def __init__(self, path: str | Path, specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None,
                 background: Executor | None = None):
        self.path = Path(path)
        self.specs = list(specs)
        self.background, self.released = background, None
        header = encode_header(self.specs, metadata)
        self._next = 0
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        _write_all(self._fd, memoryview(header))
        self._start = len(header)  # where the next tensor's bytes go
        self.size = len(header) + sum(s.nbytes for s in self.specs)

    def _take(self, name: str) -> TensorSpec:
        if self._next >= len(self.specs) or self.specs[self._next].name != name:
            want = self.specs[self._next].name if self._next < len(self.specs) else "nothing (all written)"
            raise PolytoolError(f"writer for {self.path}: got tensor {name!r}, expected {want!r} next")
        self._next += 1
        self._start += self.specs[self._next - 1].nbytes
        return self.specs[self._next - 1]

    def write(self, name: str, data: Buffer | Iterable[Buffer]) -> None:
        """Write tensor `name` (the next one) from one buffer or an iterable of chunks, row-major."""
        spec = self._take(name)
        chunks = [data] if isinstance(data, (bytes, bytearray, memoryview, np.ndarray)) else data
        written = 0
        for chunk in chunks:
            view = _as_bytes(chunk, DTYPES[spec.dtype][1], name)
            _write_all(self._fd, view)
            written += view.nbytes
        self._check_size(spec, written)

    def _check_size(self, spec: TensorSpec, written: int) -> None:
        if written != spec.nbytes:
            raise CheckpointError(f"tensor {spec.name!r}: got {written} bytes, {spec.dtype} {list(spec.shape)} needs "
                                  f"{spec.nbytes}", self.path)

    def place(self, name: str, chunks: Callable[[int, int], Iterable[int]]) -> None:
        """Tensor `name` (the next one) written by the caller at its place in the file, in any order and from any
        thread: `chunks` is called with (fd, offset of the tensor's first byte) and yields the byte count of each
        piece written (os.pwrite, e.g. pwrite_all), all of them written once it is exhausted."""
        offset = self._start
        spec = self._take(name)
        os.lseek(self._fd, self._start, os.SEEK_SET)  # what is written next in order goes after it
        written = sum(chunks(self._fd, offset))
        self._check_size(spec, written)

    def copy(self, names: list[str], source: SafetensorsFile) -> None:
        """Copy tensors that lie back to back in `source` byte for byte (same dtype and shape)."""
        begin = end = None
        for name in names:
            spec = self._take(name)
            if (source.dtype(name), source.shape(name)) != (spec.dtype, spec.shape):
                raise PolytoolError(f"cannot copy {name!r}: source is {source.dtype(name)} {list(source.shape(name))}, writing {spec.dtype} {list(spec.shape)}")
            b, e = source.entries[name]["offsets"]
            if end is not None and b != end:
                raise PolytoolError(f"cannot copy {name!r} in one run: not adjacent to the previous tensor in {source.path}")
            begin, end = (b if begin is None else begin), e
        if begin is not None and end > begin:
            with open(source.path, "rb") as fh:
                copy_range(fh.fileno(), source.data_start + begin, self._fd, end - begin)

    def close(self) -> None:
        """Check every tensor was written, start the writeback, close."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        if self._next != len(self.specs):
            os.close(fd)
            raise CheckpointError(f"incomplete: {len(self.specs) - self._next} tensors not written, next {self.specs[self._next].name!r}", self.path)
        if self.background is None:
            _release(fd)
        else:
            self.released = self.background.submit(_release, fd)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        elif self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _release(fd: int) -> None:
    """Start a written file's writeback (Linux: so that the final fsync is short) and close it."""
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def save_file(path: str | Path, tensors: dict[str, np.ndarray | tuple[str, np.ndarray]], metadata: dict[str, str] | None = None) -> None:
    """Write numpy arrays to one safetensors file, in the given order. A value may be
    (dtype, array) to name the dtype, e.g. ("BF16", uint16 bit patterns)."""
    pairs = {k: v if isinstance(v, tuple) else (st_dtype(v), v) for k, v in tensors.items()}
    specs = [TensorSpec(k, dt, tuple(arr.shape)) for k, (dt, arr) in pairs.items()]
    with SafetensorsWriter(path, specs, metadata) as writer:
        for name, (_, arr) in pairs.items():
            writer.write(name, arr)
