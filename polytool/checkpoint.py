"""safetensors files without torch: header validation, zero-copy reads, bfloat16 in numpy.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the data
buffer; offsets are relative to the buffer. `SafetensorsFile` checks every claim the header makes
against the file before anything is read, so a truncated or lying file is an error, not a crash.
"""
from __future__ import annotations

import json
import mmap
import struct
from math import prod
from pathlib import Path

import numpy as np

from .errors import CheckpointError

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
            header = json.loads(raw.decode("utf-8"))
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
            if dtype not in DTYPES:
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
