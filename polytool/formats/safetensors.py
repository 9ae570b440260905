"""safetensors files without torch: header validation, zero-copy reads, bfloat16 in numpy, and the
writing side: a streaming writer and shard index files.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the data
buffer; offsets are relative to the buffer. `SafetensorsFile` checks every claim the header makes
against the file before anything is read, so a truncated or lying file is an error, not a crash.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Iterable, Union

import numpy as np

from ..errors import CheckpointError, PolytoolError
from .jsonfile import parse_json

MAX_HEADER = 100 * 1024 * 1024

# safetensors dtype -> (numpy storage dtype, item size). BF16 is stored as uint16 bit patterns.
DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F64": (np.dtype("<f8"), 8),
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
    "I64": (np.dtype("<i8"), 8),
    "I32": (np.dtype("<i4"), 4),
    "I16": (np.dtype("<i2"), 2),
    "I8": (np.dtype("i1"), 1),
    "U8": (np.dtype("u1"), 1),
    "U16": (np.dtype("<u2"), 2),
    "U32": (np.dtype("<u4"), 4),
    "U64": (np.dtype("<u8"), 8),
    "BOOL": (np.dtype("?"), 1),
    "F8_E4M3": (np.dtype("u1"), 1),
    "F8_E5M2": (np.dtype("u1"), 1),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# safetensors dtype -> torch / config.json name
def least_precise(names: Iterable[str]) -> str | None:
    """The least precise float dtype among safetensors dtype names (BF16, then F16, F32, F64), or None."""
    names = set(names)
    return next((d for d in reversed(FLOAT_DTYPES) if d in names), None)


TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 bit patterns, rounded to nearest even (as torch rounds)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


class SafetensorsFile:
    """A validated, memory-mapped safetensors file. Tensors are read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                size = self.path.stat().st_size
                if size < 8:
                    raise self._error(f"not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > min(MAX_HEADER, size - 8):
                    raise self._error(f"not a safetensors file or truncated: header length {n} exceeds the file size {size}")
                raw = fh.read(n)
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None
        except OSError as exc:
            raise CheckpointError(f"cannot read: {exc.strerror or exc}", self.path) from None
        try:
            header = parse_json(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._error(f"corrupt safetensors header ({exc.__class__.__name__}: {exc})") from None
        if not isinstance(header, dict):
            raise self._error("corrupt safetensors header: not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise self._error("corrupt safetensors header: __metadata__ must map strings to strings")
        self.metadata: dict[str, str] = meta
        self.data_start = 8 + n
        self.entries: dict[str, dict] = {}
        self._validate(header, size - self.data_start)

    def _error(self, message: str) -> CheckpointError:
        return CheckpointError(message, self.path)

    def _validate(self, header: dict, data_len: int) -> None:
        spans = []
        for name, entry in header.items():
            if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
                raise self._error(f"corrupt safetensors header: entry {name!r} lacks dtype/shape/data_offsets")
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not isinstance(dtype, str) or dtype not in DTYPES:
                raise self._error(f"tensor {name!r} has unknown dtype {dtype!r}")
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                raise self._error(f"tensor {name!r} has an invalid shape {shape!r}")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
                raise self._error(f"tensor {name!r} has invalid data_offsets {offsets!r}")
            begin, end = offsets
            if not 0 <= begin <= end <= data_len:
                raise self._error(
                    f"truncated or corrupt: tensor {name!r} claims bytes {begin}..{end} but the data section has {data_len}"
                )
            expected = prod(shape) * DTYPES[dtype][1]
            if end - begin != expected:
                raise self._error(
                    f"tensor {name!r}: {dtype} {shape} needs {expected} bytes but its offsets span {end - begin}"
                )
            spans.append((begin, end, name))
            self.entries[name] = {"dtype": dtype, "shape": tuple(shape), "offsets": (begin, end)}
        spans.sort()
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise self._error(f"corrupt safetensors header: tensors {n0!r} and {n1!r} overlap")
        end = max((e for _, e, _ in spans), default=0)
        if end != data_len:  # the safetensors library (and so PEFT and transformers) refuses such a file
            raise self._error(f"{data_len - end} bytes after the last tensor's data: not a valid safetensors file")
        # file order: by position in the data buffer
        self.entries = {name: self.entries[name] for _, _, name in spans}

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name]["shape"]

    def dtype(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def nbytes(self, name: str) -> int:
        begin, end = self.entries[name]["offsets"]
        return end - begin

    def raw(self, name: str) -> memoryview:
        """The tensor's bytes, zero-copy from the mapped file."""
        begin, end = self.entries[name]["offsets"]
        if self._mm is None:
            return memoryview(b"")
        return memoryview(self._mm)[self.data_start + begin : self.data_start + end]

    def array(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy array (zero-copy view; BF16 as uint16 bit patterns)."""
        entry = self.entries[name]
        storage, _ = DTYPES[entry["dtype"]]
        return np.frombuffer(self.raw(name), dtype=storage).reshape(entry["shape"])

    def float_array(self, name: str, dtype: np.dtype = np.float64) -> np.ndarray:
        """A floating tensor converted to `dtype` (a copy), with BF16 decoded."""
        kind = self.dtype(name)
        if kind not in FLOAT_DTYPES:
            raise self._error(f"tensor {name!r} has dtype {kind}, expected a floating dtype")
        arr = self.array(name)
        if kind == "BF16":
            arr = bf16_to_f32(arr)
        return arr.astype(dtype)

    def tensor(self, name: str):
        """The tensor as a read-only torch tensor in its stored dtype, zero-copy from the mapped file (it keeps
        the map alive): for copying into a model's weight (`weight.copy_(t)` converts without a temporary)."""
        import warnings

        import torch

        entry = self.entries[name]
        if entry["dtype"] not in TORCH_NAMES or self._mm is None or self.nbytes(name) == 0:
            return torch.from_numpy(self.float_array(name, np.float32))
        with warnings.catch_warnings():  # read-only buffer: nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self.raw(name), dtype=getattr(torch, TORCH_NAMES[entry["dtype"]]))
        return flat.reshape(entry["shape"])

    def release(self, name: str) -> None:
        """Drop the mapped pages of a tensor already read from this process's memory (they stay in the page
        cache): a file read tensor by tensor then holds one tensor's pages, not the whole file's."""
        begin, end = self.entries[name]["offsets"]
        if self._mm is None or end == begin or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = (self.data_start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        self._mm.madvise(mmap.MADV_DONTNEED, start, self.data_start + end - start)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a caller still holds a view; the map closes when it is dropped
                pass
            self._mm = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- writing ---------------------------------------------------------------------------------

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


def _f64_to_f32_odd(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounded to odd: a later round-to-nearest to fewer bits is then exact."""
    y = x.astype(np.float32)
    inexact = (y.astype(np.float64) != x) & np.isfinite(y)
    if inexact.any():
        bits = y.view(np.uint32)
        away = inexact & (np.abs(y.astype(np.float64)) > np.abs(x))
        bits[away] -= 1  # step back toward zero: within one sign, magnitude order is bit order
        bits[inexact] |= 1
    return y


def cast_float(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round a float32/float64 array once to the float safetensors `dtype` (BF16 as uint16 bits)."""
    if dtype == "BF16":
        return f32_to_bf16(_f64_to_f32_odd(x) if x.dtype == np.float64 else x)
    if dtype not in ("F64", "F32", "F16"):
        raise PolytoolError(f"cannot round to {dtype}: allowed F64, F32, F16, BF16")
    return x.astype(DTYPES[dtype][0], copy=False)


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
    """

    def __init__(self, path: str | Path, specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = list(specs)
        header = encode_header(self.specs, metadata)
        self._next = 0
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        _write_all(self._fd, memoryview(header))
        self.size = len(header) + sum(s.nbytes for s in self.specs)

    def _take(self, name: str) -> TensorSpec:
        if self._next >= len(self.specs) or self.specs[self._next].name != name:
            want = self.specs[self._next].name if self._next < len(self.specs) else "nothing (all written)"
            raise PolytoolError(f"writer for {self.path}: got tensor {name!r}, expected {want!r} next")
        self._next += 1
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
        if written != spec.nbytes:
            raise CheckpointError(f"tensor {name!r}: got {written} bytes, {spec.dtype} {list(spec.shape)} needs {spec.nbytes}", self.path)

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
        try:
            if self._next != len(self.specs):
                raise CheckpointError(f"incomplete: {len(self.specs) - self._next} tensors not written, next {self.specs[self._next].name!r}", self.path)
            if hasattr(os, "posix_fadvise"):  # Linux: starts writeback now, so the final fsync is short
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        elif self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def save_file(path: str | Path, tensors: dict[str, np.ndarray | tuple[str, np.ndarray]], metadata: dict[str, str] | None = None) -> None:
    """Write numpy arrays to one safetensors file, in the given order. A value may be
    (dtype, array) to name the dtype, e.g. ("BF16", uint16 bit patterns)."""
    pairs = {k: v if isinstance(v, tuple) else (st_dtype(v), v) for k, v in tensors.items()}
    specs = [TensorSpec(k, dt, tuple(arr.shape)) for k, (dt, arr) in pairs.items()]
    with SafetensorsWriter(path, specs, metadata) as writer:
        for name, (_, arr) in pairs.items():
            writer.write(name, arr)


# ---- shard index files ------------------------------------------------------------------------


def read_index(path: str | Path) -> tuple[dict, dict[str, str]]:
    """A shard index file -> (metadata, weight_map {tensor: shard file name})."""
    path = Path(path)
    try:
        index = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read the shard index ({exc.__class__.__name__}: {exc})", path) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError("not a shard index: no weight_map of tensor name -> file name", path)
    bad = sorted({v for v in weight_map.values() if Path(v).name != v})
    if bad:
        raise CheckpointError(f"weight_map names files outside the directory: {bad[0]!r}", path)
    metadata = index.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError("the index's metadata is not an object", path)
    return metadata, weight_map


# --dtype of the commands that write weights -> safetensors dtype (auto: the output kind's default)
OUTPUT_DTYPES = {"auto": None, "float32": "F32", "float16": "F16", "bfloat16": "BF16", "q8_0": "Q8_0"}  # q8_0: GGUF
