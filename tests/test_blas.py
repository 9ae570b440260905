"""core/blas.py: numpy's BLAS held to one thread inside the block and given back its count after."""
from __future__ import annotations

import numpy as np
import pytest

from polytool.core.blas import _openblas, one_blas_thread, sgemm_add


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


def test_sgemm_add_is_numpy_product_scaled_and_added_bit_for_bit():
    """c += alpha a @ b in one BLAS pass: every element the one numpy's product, times a power-of-two alpha, added
    gives (the dense merge relies on it: its output bytes do not change); a wrong alpha or a left-out add does not
    (the controls); operands it cannot take leave c untouched and say so."""
    rng = np.random.default_rng(1)
    if _openblas() is None:  # numpy on another BLAS: nothing to call, c untouched (the merge keeps numpy's passes)
        c = np.zeros((2, 2), np.float32)
        assert not sgemm_add(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32), 1.0, c) and not c.any()
        return
    with one_blas_thread():
        for m, k, n, alpha in ((2, 8, 2, 1.0), (37, 8, 300, 0.125), (128, 16, 2048, 0.0625), (5, 1, 9, 0.5),
                               (300, 64, 7, 2.0 ** -6)):
            a = rng.standard_normal((m, k)).astype(np.float32)
            b = (rng.standard_normal((k, n)) * 1e-3).astype(np.float32)
            c = (rng.standard_normal((m, n)) * 0.02).astype(np.float32)
            want = c.copy()
            product = np.matmul(a, b)
            product *= np.float32(alpha)
            want += product
            got = c.copy()
            assert sgemm_add(a, b, alpha, got)
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (m, k, n)
            wrong = c.copy()
            assert sgemm_add(a, b, alpha * 3, wrong)
            assert not np.array_equal(wrong, want) and not np.array_equal(c, want)
        c = np.zeros((4, 6), np.float32)
        for a, b, cc in ((np.ones((4, 3), np.float64), np.ones((3, 6), np.float32), c),  # not float32
                         (np.ones((3, 4), np.float32).T, np.ones((3, 6), np.float32), c),  # not C-contiguous
                         (np.ones((4, 2), np.float32), np.ones((3, 6), np.float32), c)):  # shapes do not chain
            assert not sgemm_add(a, b, 1.0, cc)
        assert not c.any()


def test_add_stored_delta_matches_the_delta_added():
    """The merge's one-pass add (r a power of two) against `into += stored_delta(...)`: the same bits, blocks of
    one row (numpy's other kernel: the fallback) included; r 3 (1/r inexact) takes the fallback, the same bits."""
    from polytool.core.collapse import add_stored_delta, stored_delta

    rng = np.random.default_rng(2)
    with one_blas_thread():
        for r in (8, 4, 3):
            A = np.asfortranarray(rng.standard_normal((512, r)).astype(np.float32))
            B = np.asfortranarray((rng.standard_normal((r, 96)) * 0.01).astype(np.float32))
            x = (rng.standard_normal((96, 512)) * 0.02).astype(np.float32)
            for lo, hi in ((0, 96), (10, 11), (40, 77)):
                want = x[lo:hi] + stored_delta(A, B, r, False, lo, hi)
                got = add_stored_delta(A, B, r, lo, hi, x[lo:hi].copy())
                assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (r, lo, hi)
                assert not np.array_equal(got, x[lo:hi])


def test_the_one_pass_add_takes_its_divisor_from_update_scale(monkeypatch):
    """A wrong divisor in core.collapse.update_scale reaches the one-pass add as it reaches dense_delta (the
    mutants of the 1/r reach every dense writer): with r * r, both give the delta half its right size (r 2),
    the same bits; and differ from the right one."""
    from polytool.core import collapse

    rng = np.random.default_rng(3)
    A = np.asfortranarray(rng.standard_normal((256, 2)).astype(np.float32))
    B = np.asfortranarray((rng.standard_normal((2, 64)) * 0.01).astype(np.float32))
    x = (rng.standard_normal((64, 256)) * 0.02).astype(np.float32)
    with one_blas_thread():
        right = collapse.add_stored_delta(A, B, 2, 0, 64, x.copy())
        monkeypatch.setattr(collapse, "update_scale", lambda r: r * r)
        wrong = collapse.add_stored_delta(A, B, 2, 0, 64, x.copy())
        want = x + collapse.stored_delta(A, B, 2, False, 0, 64)
    assert np.array_equal(wrong.view(np.uint32), want.view(np.uint32)) and not np.array_equal(wrong, right)
