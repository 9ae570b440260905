"""numpy's BLAS held to one thread around a loop of thin products (no new dependency: the OpenBLAS numpy
ships, through ctypes; elsewhere a no-op).

The dense merge multiplies (rows, r) by (r, in) with r ~ 8, 1500 times per GB: too little work per call for
threads to pay. OpenBLAS still splits each call over every core and spin-waits for the others; where those
cores are busy (a shared CI runner, a box running other jobs) each call waits for a descheduled thread: a
1.08 GB merge took 20 s of CPU instead of 2 (docs/performance.md). One thread also makes the output the same
on every machine: OpenBLAS's threaded sgemm differs from its one-thread kernel in the last float32 bit of ~5%
of such products, so a merge's bytes depended on the core count (on the 1.08 GB benchmark model the bfloat16
rounding hid every such bit: the output is byte for byte the one written before).

`sgemm_add` is the same library's sgemm with beta 1: C += alpha A @ B in one pass over C, where numpy would
write the product, scale it and add it (three passes; the dense merge's largest cost after the rounding).
"""
from __future__ import annotations

import ctypes
import functools
import importlib
from contextlib import contextmanager
from typing import Any, Callable, Iterator

# (setter, getter) pairs as numpy's OpenBLAS builds name them: scipy-openblas (numpy >= 2), plain OpenBLAS
NAMES = (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
         ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
         ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
         ("openblas_set_num_threads", "openblas_get_num_threads"))


# cblas_sgemm as numpy's OpenBLAS builds name it, and whether its integers are 64-bit (ILP64)
SGEMM_NAMES = (("scipy_cblas_sgemm64_", True), ("scipy_cblas_sgemm", False), ("cblas_sgemm64_", True),
               ("cblas_sgemm", False))
ROW_MAJOR, NO_TRANS = 101, 111  # CBLAS enums


def _libraries() -> list:
    """The OpenBLAS libraries this process loaded (numpy's), opened with ctypes."""
    importlib.import_module("numpy")  # loads its BLAS
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "openblas" in line and ".so" in line}
    except OSError:
        return []
    libs = []
    for path in sorted(paths):
        try:
            libs.append(ctypes.CDLL(path))
        except OSError:
            continue
    return libs


def _openblas() -> tuple | None:
    """(set, get) of the OpenBLAS this process loaded (numpy's), or None."""
    for lib in _libraries():
        for setter, getter in NAMES:
            if hasattr(lib, setter) and hasattr(lib, getter):
                return getattr(lib, setter), getattr(lib, getter)
    return None


@functools.cache
def _sgemm() -> Callable | None:
    """numpy's OpenBLAS cblas_sgemm with its argument types set, or None."""
    for lib in _libraries():
        for name, ilp64 in SGEMM_NAMES:
            if hasattr(lib, name):
                fn, n = getattr(lib, name), ctypes.c_int64 if ilp64 else ctypes.c_int
                fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, n, n, n, ctypes.c_float, ctypes.c_void_p, n,
                               ctypes.c_void_p, n, ctypes.c_float, ctypes.c_void_p, n]
                fn.restype = None
                return fn
    return None


def sgemm_add(a: Any, b: Any, alpha: float, c: Any) -> bool:
    """c += alpha * (a @ b) in place, float32, all three C-contiguous 2-D numpy arrays: (m, k), (k, n), (m, n);
    False (c untouched) where numpy's BLAS is not an OpenBLAS this can call. With alpha a power of two (exact)
    each element is the one numpy's `c += (a @ b) * alpha` rounds to, for m and n of 2 or more (numpy takes
    another kernel for a single row or column): the same products, summed by the same kernel, added once."""
    import numpy as np

    fn = _sgemm()
    (m, k), (k2, n) = a.shape, b.shape
    if fn is None or k != k2 or c.shape != (m, n) or not all(
            x.dtype == np.float32 and x.flags.c_contiguous for x in (a, b, c)) or not c.flags.writeable:
        return False
    fn(ROW_MAJOR, NO_TRANS, NO_TRANS, m, n, k, alpha, a.ctypes.data, max(k, 1), b.ctypes.data, max(n, 1), 1.0,
       c.ctypes.data, max(n, 1))
    return True


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Inside the block numpy's BLAS (OpenBLAS) runs on one thread; the count is restored after."""
    found = _openblas()
    if found is None:
        yield
        return
    set_threads, get_threads = found
    before = get_threads()
    set_threads(1)
    try:
        yield
    finally:
        set_threads(before)
