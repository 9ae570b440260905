"""core/clustering.py: average linkage against the plain definition (test_inspect_views.py) on random
distances, and the small cases: one task, two tasks, ties, a known merge sequence."""
from __future__ import annotations

import numpy as np
import pytest

from polytool.core.clustering import average_linkage, leaf_order

from test_inspect_views import plain_average_linkage


@pytest.mark.parametrize("n", [2, 3, 7, 30])
def test_equals_the_plain_definition(n):
    x = np.random.default_rng(n).random((n, 5))
    d = np.abs(x[:, None] - x[None]).sum(-1)  # (n, n) symmetric, 0 on the diagonal
    rows, order = plain_average_linkage(d.tolist())
    got = average_linkage(d)
    np.testing.assert_array_equal(got[:, [0, 1, 3]], np.asarray(rows)[:, [0, 1, 3]])
    np.testing.assert_allclose(got[:, 2], np.asarray(rows)[:, 2], rtol=0, atol=1e-12)
    assert leaf_order(got, n) == order
    assert np.all(np.diff(got[:, 2]) >= -1e-12)  # average linkage is monotone


def test_a_known_sequence():
    # tasks 0, 1 close; 2, 3 close; the two pairs far apart: merge (0, 1), then (2, 3), then both
    d = np.array([[0, 1, 9, 9], [1, 0, 9, 9], [9, 9, 0, 2], [9, 9, 2, 0]], dtype=float)
    np.testing.assert_array_equal(average_linkage(d), [[0, 1, 1, 2], [2, 3, 2, 2], [4, 5, 9, 4]])
    assert leaf_order(average_linkage(d), 4) == [0, 1, 2, 3]
    d[0, 2] = d[2, 0] = 3  # the pair distance is the mean over members: (3 + 9 + 9 + 9) / 4
    assert average_linkage(d)[2, 2] == pytest.approx(7.5)


def test_small_and_tied():
    assert average_linkage(np.zeros((1, 1))).shape == (0, 4) and leaf_order(np.zeros((0, 4)), 1) == [0]
    tied = average_linkage(np.ones((3, 3)) - np.eye(3))  # every pair at 1: the lowest ids merge first
    np.testing.assert_array_equal(tied, [[0, 1, 1, 2], [2, 3, 1, 3]])
    with pytest.raises(ValueError, match="square"):
        average_linkage(np.zeros((2, 3)))
