"""safetensors files without torch: header validation, zero-copy reads, bfloat16 in numpy, and the
rounding to a stored dtype once, and shard index files; safetensors_writer.py writes the format.

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
from typing import Iterable

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


def bf16_to_f32(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact); written into `out` (float32, bits' shape) where given."""
    if out is None:
        return (bits.astype(np.uint32) << 16).view(np.float32)
    np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)
    return out


def f32_to_bf16(x: np.ndarray, scratch: np.ndarray | None = None, finite: bool = False,
                out: np.ndarray | None = None) -> np.ndarray:
    """float32 -> uint16 bfloat16 bit patterns, rounded to nearest even (as torch rounds). `scratch`: a uint32
    array of x's shape to compute in, reused by a caller that converts block after block (else one is made);
    `finite`: the caller has checked that x holds no NaN (whose bits the formula would not keep NaN); `out`: a
    uint16 array of x's shape for the result (a reused one has its pages already: cheaper than a new one)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    t = np.right_shift(u, 16, out=scratch)  # (u + ((u >> 16) & 1) + 0x7FFF) >> 16, in uint32, in place
    t &= 1
    t += 0x7FFF
    t += u
    out = np.empty(t.shape, np.uint16) if out is None else out
    rounded = np.right_shift(t, 16, out=out, casting="unsafe")  # the high half: < 2^16
    if not finite:
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


# ---- rounding to a stored dtype ------------------------------------------------------------------


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


def cast_float(x: np.ndarray, dtype: str, scratch: np.ndarray | None = None, finite: bool = False,
               out: np.ndarray | None = None) -> np.ndarray:
    """Round a float32/float64 array once to the float safetensors `dtype` (BF16 as uint16 bits; `scratch`,
    `finite` and `out` as f32_to_bf16's, `out` for BF16 only)."""
    if dtype == "BF16":
        return f32_to_bf16(_f64_to_f32_odd(x) if x.dtype == np.float64 else x, scratch, finite, out)
    if dtype not in ("F64", "F32", "F16"):
        raise PolytoolError(f"cannot round to {dtype}: allowed F64, F32, F16, BF16")
    return x.astype(DTYPES[dtype][0], copy=False)


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
