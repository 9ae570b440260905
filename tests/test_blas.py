"""core/blas.py: numpy's BLAS held to one thread inside the block and given back its count after."""
from __future__ import annotations

import numpy as np
import pytest

from polytool.core.blas import _openblas, one_blas_thread


def test_one_blas_thread_sets_and_restores_the_count():
    found = _openblas()
    if found is None:
        pytest.skip("numpy does not use OpenBLAS here: the helper is a no-op")
    set_threads, get_threads = found
    before = get_threads()
    set_threads(2)
    try:
        with one_blas_thread():
            assert get_threads() == 1
            a = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
            one = a @ a.T
        assert get_threads() == 2
        assert np.array_equal(one, a @ a.T)  # the r-long sums are not split among threads: the same bits
    finally:
        set_threads(before)


def test_one_blas_thread_restores_after_an_error():
    found = _openblas()
    before = found[1]() if found else None
    with pytest.raises(RuntimeError):
        with one_blas_thread():
            raise RuntimeError("inside")
    assert (found[1]() if found else None) == before
