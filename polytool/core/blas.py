"""numpy's BLAS held to one thread around a loop of thin products (no new dependency: the OpenBLAS numpy
ships, through ctypes; elsewhere a no-op).

The dense merge multiplies (rows, r) by (r, in) with r ~ 8, 1500 times per GB: too little work per call for
threads to pay. OpenBLAS still splits each call over every core and spin-waits for the others; where those
cores are busy (a shared CI runner, a box running other jobs) each call waits for a descheduled thread: a
1.08 GB merge took 20 s of CPU instead of 2 (docs/performance.md). One thread also makes the output the same
on every machine: OpenBLAS's threaded sgemm differs from its one-thread kernel in the last float32 bit of ~5%
of such products, so a merge's bytes depended on the core count (on the 1.08 GB benchmark model the bfloat16
rounding hid every such bit: the output is byte for byte the one written before).
"""
from __future__ import annotations

import ctypes
import importlib
from contextlib import contextmanager
from typing import Iterator

# (setter, getter) pairs as numpy's OpenBLAS builds name them: scipy-openblas (numpy >= 2), plain OpenBLAS
NAMES = (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
         ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
         ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
         ("openblas_set_num_threads", "openblas_get_num_threads"))


def _openblas() -> tuple | None:
    """(set, get) of the OpenBLAS this process loaded (numpy's), or None."""
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "openblas" in line and ".so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for setter, getter in NAMES:
            if hasattr(lib, setter) and hasattr(lib, getter):
                return getattr(lib, setter), getattr(lib, getter)
    return None


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Inside the block numpy's BLAS (OpenBLAS) runs on one thread; the count is restored after."""
    importlib.import_module("numpy")  # loads its BLAS

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
