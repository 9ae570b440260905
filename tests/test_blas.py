"""core/blas.py: numpy's BLAS held to one thread inside the block and given back its count after."""
from __future__ import annotations

import numpy as np
import pytest

from polytool.core.blas import _openblas, one_blas_thread


def test_one_blas_thread_sets_and_restores_the_count():
    """Inside, one thread whatever the pool: the dense merge's thin products are the one-thread kernel's (the same
    bits on every machine); after, the count the process had."""
    from polytool.core.collapse import stored_delta

    found = _openblas()
    if found is None:
        pytest.skip("numpy does not use OpenBLAS here: the helper is a no-op")
    set_threads, get_threads = found
    rng = np.random.default_rng(0)
    A = np.asfortranarray(rng.standard_normal((2048, 8)).astype(np.float32))  # (in, r), as factored_delta holds
    B = np.asfortranarray(rng.standard_normal((8, 1024)).astype(np.float32))  # (r, out)
    before = get_threads()
    try:
        set_threads(1)
        single = stored_delta(A, B, 8, False, 0, 128)  # (128, in)
        set_threads(2)
        with one_blas_thread():
            assert get_threads() == 1
            inside = stored_delta(A, B, 8, False, 0, 128)
        assert get_threads() == 2
        assert np.array_equal(inside, single)
    finally:
        set_threads(before)


def test_one_blas_thread_restores_after_an_error():
    found = _openblas()
    before = found[1]() if found else None
    with pytest.raises(RuntimeError):
        with one_blas_thread():
            raise RuntimeError("inside")
    assert (found[1]() if found else None) == before
