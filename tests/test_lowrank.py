"""lowrank.py: the rank-k truncations against a dense SVD computed here (the Eckart-Young optimum),
the reported error and energy, and the rank `--energy` picks."""
from __future__ import annotations

import numpy as np
import pytest

from polytool.errors import PolytoolError
from polytool.core.lowrank import check_rank_options, truncate_dense, truncate_factored


def optimum(D: np.ndarray, k: int) -> tuple[np.ndarray, float, float]:
    """The best rank-k approximation by a dense SVD, its relative Frobenius error and retained energy."""
    U, s, Vh = np.linalg.svd(D, full_matrices=False)
    best = (U[:, :k] * s[:k]) @ Vh[:k]  # (out, k) @ (k, in)
    return best, np.linalg.norm(D - best) / np.linalg.norm(D), (s[:k] ** 2).sum() / (s ** 2).sum()


def lowrank_pair(rng, out: int, inp: int, R: int, decay: float = 0.7):
    """B (out, R), A (R, in) with decaying singular values, so every truncation has a clear optimum."""
    B = rng.standard_normal((out, R)) * decay ** np.arange(R)
    return B, rng.standard_normal((R, inp))


@pytest.mark.parametrize("out, inp, R", [(40, 24, 7), (24, 40, 7), (12, 30, 20), (30, 12, 20)])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_factored_is_the_optimum(out, inp, R, k):
    rng = np.random.default_rng(out * 100 + inp + R)
    B, A = lowrank_pair(rng, out, inp, R)
    D = B @ A  # (out, in): formed here only to check
    best, err, energy = optimum(D, k)
    Bk, Ak, info = truncate_factored(B, A, rank=k)
    assert Bk.shape == (out, k) and Ak.shape == (k, inp) and info.rank == k
    np.testing.assert_allclose(Bk @ Ak, best, atol=1e-12 * np.abs(D).max())
    assert info.error == pytest.approx(err, rel=1e-9) and info.energy == pytest.approx(energy, rel=1e-12)
    assert info.error == pytest.approx(np.linalg.norm(D - Bk @ Ak) / np.linalg.norm(D), rel=1e-9)
    # negative control: a rank-(k+1) result is closer, so the check above could fail
    assert np.linalg.norm(D - (lambda b, a, _: b @ a)(*truncate_factored(B, A, rank=k + 1))) < err * np.linalg.norm(D)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_dense_is_the_optimum(shape):
    rng = np.random.default_rng(7)
    D = rng.standard_normal(shape) @ np.diag(0.8 ** np.arange(shape[1])) if shape[0] > shape[1] else \
        np.diag(0.8 ** np.arange(shape[0])) @ rng.standard_normal(shape)
    for k in (1, 5, 12):
        best, err, energy = optimum(D, k)
        Bk, Ak, info = truncate_dense(D, rank=k)
        assert Bk.shape == (shape[0], k) and Ak.shape == (k, shape[1])
        np.testing.assert_allclose(Bk @ Ak, best, atol=1e-10 * np.abs(D).max())
        assert info.error == pytest.approx(err, rel=1e-7) and info.energy == pytest.approx(energy, rel=1e-12)


def test_rank_above_what_there_is_keeps_everything_exactly():
    rng = np.random.default_rng(3)
    B, A = lowrank_pair(rng, 20, 16, 4)
    Bk, Ak, info = truncate_factored(B, A, rank=50)
    assert info.rank == 4 and info.energy == pytest.approx(1.0) and info.error < 1e-12
    np.testing.assert_allclose(Bk @ Ak, B @ A, atol=1e-12)
    _, _, dense = truncate_dense(B @ A, rank=50)
    assert dense.rank == 16 and dense.error < 1e-7  # the dense path sees min(out, in) values, 12 of them ~0


@pytest.mark.parametrize("share", [0.5, 0.9, 0.99, 0.999, 1.0])
def test_energy_picks_the_smallest_rank_that_keeps_the_share(share):
    rng = np.random.default_rng(11)
    B, A = lowrank_pair(rng, 30, 26, 12)
    s = np.linalg.svd(B @ A, compute_uv=False)
    kept = np.cumsum(s ** 2) / (s ** 2).sum()
    want = int(np.argmax(kept >= share - 1e-12)) + 1  # the smallest k with kept[k-1] >= share
    for truncate, args in ((truncate_factored, (B, A)), (truncate_dense, (B @ A,))):
        *_, info = truncate(*args, energy=share)
        assert info.rank == min(want, 12), truncate.__name__
        assert info.energy >= share - 1e-9
        if info.rank > 1:
            assert kept[info.rank - 2] < share  # one fewer would not keep it


def test_zero_delta():
    B, A = np.zeros((8, 3)), np.ones((3, 5))
    Bk, Ak, info = truncate_factored(B, A, energy=0.9)
    assert (info.rank, info.energy, info.error) == (1, 1.0, 0.0) and not (Bk @ Ak).any()
    Bk, Ak, info = truncate_dense(np.zeros((8, 5)), rank=3)
    assert (info.rank, info.error) == (1, 0.0) and not (Bk @ Ak).any()


@pytest.mark.parametrize("rank, energy, message", [
    (2, 0.9, "--rank and --energy are alternatives: give one of them"),
    (0, None, "--rank 0: expected an integer >= 1"),
    (None, 0.0, "--energy 0.0: expected a share in (0, 1], e.g. 0.99"),
    (None, 1.5, "--energy 1.5: expected a share in (0, 1], e.g. 0.99"),
])
def test_option_errors(rank, energy, message):
    with pytest.raises(PolytoolError) as err:
        check_rank_options(rank, energy)
    assert str(err.value) == message
