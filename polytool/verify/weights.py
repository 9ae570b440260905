"""A dense artifact checked in weight space, exactly, tensor by tensor (streamed: one tensor at a time).

    merged tensor     == base weight + the reference's float64 update, rounded once to the stored dtype,
                         within one unit in the last place (ulp) of that dtype, plus the rounding of the
                         writer's arithmetic bounded by the operands: COMPUTE_EPS[dtype] * (|W0| + |U|),
                         |U| = |B|.T @ |A|.T / r (where the sum cancels, that bound is larger than its ulp)
    trained head      == the adapter's modules_to_save copy (or resized embeddings), rounded once (within one ulp)
    any other tensor  == the base's, byte for byte (or, where the artifact was written in another dtype,
                         the base's value rounded once)

The update comes from polytool/verify/reference.py, not from the code that wrote the artifact, so a wrong
formula there shows up here even where rounding would hide it in the forward (one weight two ulps off).
Tensors are compared CHUNK elements at a time, and each file's mapped pages are dropped once a tensor is
done, so memory holds one update and a few chunks, not a model. `not_ideal` counts the elements that
differ from torch's rounding of the exact value: where it is 0 the artifact's forward is the ideal
rounding's, and verify need not run that one again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..formats.adapter import PolyAdapter
from ..formats.base import match_targets, open_base
from ..formats.safetensors import SafetensorsFile
from ..collapse.fit import resized_embeddings, saved_module_keys
from .names import checkpoint_name

# stored dtype -> (explicit mantissa bits, smallest normal exponent)
FLOAT_BITS = {"F64": (52, -1022), "F32": (23, -126), "BF16": (7, -126), "F16": (10, -14)}
CHUNK = 1 << 18  # elements compared at once (2 MB in float64: the passes over a chunk stay in cache)
# The precision a writer may compute a merged weight in before its one rounding to the stored dtype: float32
# for half-precision outputs (float64 for wider ones), times a margin for the r products and the add.
# docs/ci.md: near-cancelling sums (base -2.46e-4, update +2.46e-4) exceed one ulp of their tiny result.
COMPUTE_EPS = {"BF16": 64 * 2.0 ** -24, "F16": 64 * 2.0 ** -24, "F32": 64 * 2.0 ** -53, "F64": 64 * 2.0 ** -53}


def ulps(got: np.ndarray, want: np.ndarray, dtype: str) -> float:
    """max |got - want| in units of the last place of `dtype` at `want`'s magnitude (float64 inputs)."""
    import torch

    return _ulps(torch.as_tensor(np.asarray(got, np.float64)), torch.as_tensor(np.asarray(want, np.float64)), dtype)


def _ulps(got, want, dtype: str, allow=None) -> float:
    """ulps() on float64 torch tensors of one shape; with `allow` (an absolute error per element, e.g.
    COMPUTE_EPS[dtype] * (|W0| + |U|)), in units of the allowed error: one ulp plus `allow`."""
    import torch

    if got.numel() == 0:
        return 0.0
    bits, emin = FLOAT_BITS[dtype]
    _, exponent = torch.frexp(want)  # want = m 2^e, 0.5 <= |m| < 1: floor(log2 |want|) = e - 1
    exponent = torch.where(want == 0, emin, exponent - 1).clamp_(min=emin) - bits
    unit = torch.ldexp(torch.ones_like(want), exponent)
    if allow is not None:
        unit = unit.add_(allow)
    err = (got - want).abs_().div_(unit)
    worst = err.max()
    return float(worst) if bool(torch.isfinite(err).all()) else float("inf")


def _rows(st: SafetensorsFile, key: str):
    """A non-empty floating tensor as a (rows, rest) read-only view of the mapped file, in its stored dtype."""
    return st.tensor(key).reshape(st.shape(key)[0] if st.shape(key) else 1, -1)


def _same_bits(a, b) -> bool:
    """Two flat CPU tensors of one dtype hold the same bits (compared by numpy as 64-bit words where the length
    allows: several times faster than torch.equal, which is itself faster on words than on half-precision
    values)."""
    import torch

    if a.numel() * a.element_size() % 8 == 0:
        return bool(np.array_equal(a.view(torch.int64).numpy(), b.view(torch.int64).numpy()))
    return torch.equal(a, b)


def compare(st: SafetensorsFile, key: str, want: Callable[[int, int], Any],
            scale: Callable[[int, int], Any] | None = None) -> tuple[float, int]:
    """(max ulps among the elements that are not the ideal rounding, how many those are) of tensor `key`
    against `want(lo, hi)`: the exact float64 values of its rows [lo, hi), flattened (a tensor the caller may
    reuse for the next rows: it is read before the next call); with `scale(lo, hi)` (the absolute error allowed
    beside one ulp, flattened) in units of the allowed error instead (see _ulps). An element equal to the ideal
    rounding (torch's of the exact value) is within half a unit by construction and is not measured."""
    import torch

    if int(np.prod(st.shape(key))) == 0:
        return 0.0, 0
    rows = _rows(st, key)
    step = max(1, CHUNK // rows.shape[1])
    worst, not_ideal = 0.0, 0
    rounded = torch.empty(step * rows.shape[1], dtype=rows.dtype)  # one buffer for every chunk's ideal rounding
    for lo in range(0, rows.shape[0], step):
        got, exact = rows[lo:lo + step].reshape(-1), want(lo, lo + step)
        ideal = rounded[:got.numel()].copy_(exact)  # the same rounding as exact.to(got.dtype)
        if _same_bits(got, ideal):
            continue
        off = got != ideal
        if bool(off.any()):
            not_ideal += int(off.sum())
            bound = None if scale is None else scale(lo, lo + step)[off]
            worst = max(worst, _ulps(got[off].double(), exact[off], st.dtype(key), bound))
    return worst, not_ideal


def same_bytes(a: SafetensorsFile, b: SafetensorsFile, key: str, key_b: str) -> bool:
    """Tensor `key` of `a` and `key_b` of `b` hold the same bytes (compared a chunk at a time)."""
    ra, rb = a.raw(key), b.raw(key_b)
    if len(ra) != len(rb):
        return False
    step = 8 * CHUNK

    def words(view):  # eight bytes a compare where the length allows (20x faster than bytewise)
        return np.frombuffer(view, np.uint64 if len(view) % 8 == 0 else np.uint8)

    return all(np.array_equal(words(ra[i:i + step]), words(rb[i:i + step])) for i in range(0, len(ra), step))


def _check_merged(st: SafetensorsFile, key: str, base_rows: Callable, update: Any, transposed: bool,
                  extra: Any = None) -> tuple:
    """compare() of a merged weight: the exact value is the base's rows (float64, exactly) plus the update's, the
    allowance bounded by the operands |W0| + |U| (|U| = |B|.T @ |A|.T / r for a low-rank update), plus `extra`
    (out, in), the absolute error the update's own definition allows per entry (a pruned merge's float32
    arithmetic and ambiguous selections: reference_merge.py), where given. `base_rows(lo, hi)`: the base's rows
    [lo, hi) in its stored dtype, (rows, rest)."""
    import torch

    update = update.T if transposed else update  # (out, in) -> the stored layout
    extra = None if extra is None else (extra.T if transposed else extra)
    size = abs(update)
    eps = COMPUTE_EPS[st.dtype(key)]
    shape = st.shape(key)
    step = max(1, CHUNK // max(1, int(np.prod(shape[1:]))))
    buffer = torch.empty((min(step, shape[0]), *shape[1:]), dtype=torch.float64)  # reused: no new pages per chunk

    def exact(lo, hi):  # the base's rows (exactly, in float64) plus the update's, in place
        rows = buffer[:min(hi, shape[0]) - lo].copy_(base_rows(lo, hi))
        if hasattr(update, "add_rows_to"):  # a low-rank update: its product added in the same pass
            return update.add_rows_to(lo, hi, rows.view(rows.shape[0], -1)).reshape(-1)
        return rows.add_(torch.as_tensor(update[lo:hi]).reshape(rows.shape)).reshape(-1)

    def allowed(lo, hi):  # COMPUTE_EPS (|W0| + |U|) of rows [lo, hi), plus the definition's own allowance
        bound = torch.add(size[lo:hi].reshape(-1).abs(), base_rows(lo, hi).reshape(-1).double().abs()).mul_(eps)
        return bound if extra is None else bound.add_(extra[lo:hi].reshape(-1))

    return compare(st, key, exact, allowed)


class Stacked:
    """The update of a key whose blocks of rows are several modules' weights (a fused projection that the family
    splits on load): parts [(lo, hi, the module's (rows, in) update)], zero elsewhere; rows of it as float64."""

    def __init__(self, shape: tuple[int, ...], parts: list):
        self.shape, self.parts = tuple(shape), parts

    def __getitem__(self, rows: slice):
        import torch

        lo, hi, _ = rows.indices(self.shape[0])
        out = torch.zeros((max(0, hi - lo), *self.shape[1:]), dtype=torch.float64)
        for first, last, update in self.parts:
            a, b = max(lo, first), min(hi, last)
            if a < b:
                out[a - lo:b - lo] = torch.as_tensor(update[a - first:b - first], dtype=torch.float64)
        return out

    def __abs__(self) -> "Stacked":
        return Stacked(self.shape, [(lo, hi, abs(u)) for lo, hi, u in self.parts])


def check_dense_weights(path: Path, base_dir: Path, adapter: PolyAdapter, delta: Any,
                        progress: Callable | None = None, allowance: Callable | None = None) -> dict:
    """{"merged", "replaced", "identical", "max_ulps", "not_ideal", "first_bad", "first_bad_ulps"} for the dense
    model at `path`; `delta(module)` is the reference's (out, in) float64 update of each adapted module (a tensor,
    or anything whose rows [lo:hi] are one, with a `.T`: reference.LowRankUpdate); `progress` as run_checks';
    `allowance(module)`: None, or the (out, in) absolute error the update's definition allows per entry."""
    import torch

    dense, base = open_base(path, checkpoint_name), open_base(base_dir, checkpoint_name)
    merged: dict[str, list] = {}
    for t in match_targets(base, adapter.modules, untie=True):
        merged.setdefault(t.key, []).append(t)
    replaced = {**saved_module_keys(adapter, base), **resized_embeddings(adapter, base)}  # written whole
    counts = {"merged": 0, "replaced": 0, "identical": 0}
    worst, not_ideal, first_bad, first_bad_ulps = 0.0, 0, None, None
    files: dict[Path, SafetensorsFile] = {}

    def opened(file: Path) -> SafetensorsFile:
        if file not in files:
            files[file] = SafetensorsFile(file)
        return files[file]

    def flat(st: SafetensorsFile, key: str):  # rows [lo, hi) of a tensor, exact, flattened
        return lambda lo, hi: _rows(st, key)[lo:hi].reshape(-1).double()

    def stored(st: SafetensorsFile, key: str):  # rows [lo, hi) of a tensor, in its stored dtype and shape
        return lambda lo, hi: st.tensor(key)[lo:hi]

    try:
        items = dense.tensors.items()
        for key, info in progress(items, len(items), f"weights of {path.name}") if progress else items:
            st = opened(path / info.shard)
            parts = merged.get(key)
            target = parts[0] if parts else None
            source = target.source if target else key
            base_st = opened(base_dir / base.tensors[source].shard)
            if target is None and key not in replaced:
                if info.dtype == base.tensors[key].dtype:
                    error = 0.0 if same_bytes(st, base_st, key, key) else np.inf
                else:  # converted: the base's value rounded once (counted in not_ideal where it is not that)
                    error, off = compare(st, key, flat(base_st, key))
                    not_ideal += off
                counts["identical"] += 1
            else:
                if target is not None:
                    extras = [None if allowance is None else allowance(t.module) for t in parts]
                    if target.rows is None:
                        update, extra = delta(target.module), extras[0]
                    else:  # modules in blocks of the key's rows (a fused projection split on load)
                        rows = [(*t.rows, delta(t.module)) for t in parts]
                        update = Stacked(info.shape, rows)
                        extra = None if all(e is None for e in extras) else \
                            Stacked(info.shape, [(*t.rows, e) for t, e in zip(parts, extras) if e is not None])[:]
                    error, off = _check_merged(st, key, stored(base_st, source), update, target.transposed, extra)
                    counts["merged"] += len(parts)
                else:
                    head = torch.from_numpy(adapter.tensor(replaced[key], np.float64))
                    error, off = compare(st, key, lambda lo, hi: head[lo:hi].reshape(-1))
                    counts["replaced"] += 1
                worst, not_ideal = max(worst, error), not_ideal + off
            st.release(key)
            base_st.release(source)
            if not error <= 1.0 and first_bad is None:
                first_bad, first_bad_ulps = key, error
    finally:
        for st in files.values():
            st.close()
    return {**counts, "max_ulps": worst, "not_ideal": not_ideal, "first_bad": first_bad,
            "first_bad_ulps": None if first_bad_ulps is None or not np.isfinite(first_bad_ulps) else first_bad_ulps}

