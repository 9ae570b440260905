"""Hierarchical clustering of tasks: average linkage (UPGMA) on a distance matrix, in numpy.

Used by `polytool inspect` to order the task-similarity matrix (distance = 1 - cosine similarity).
The linkage has scipy's layout: row k merges clusters `a` < `b` (ids < n are single tasks, n + k is
the cluster formed at row k) at `distance`, giving a cluster of `size` tasks.
"""
from __future__ import annotations

import numpy as np


def average_linkage(distance: np.ndarray) -> np.ndarray:
    """(n, n) symmetric distances -> (n - 1, 4) linkage rows [a, b, distance, size] (float64).

    At each step the two active clusters at the smallest distance merge (ties: the lowest (a, b) in
    id order); the new cluster's distance to each other cluster is the size-weighted mean of its two
    parts' distances, which is the mean over all pairs of members (average linkage)."""
    d = np.array(distance, dtype=np.float64)
    n = d.shape[0]
    if d.shape != (n, n):
        raise ValueError(f"a distance matrix must be square, got shape {d.shape}")
    dist = np.full((2 * n - 1, 2 * n - 1), np.inf)  # rows/cols: cluster ids
    dist[:n, :n] = d
    np.fill_diagonal(dist, np.inf)
    size = np.zeros(2 * n - 1)
    size[:n] = 1
    active = list(range(n))
    rows = []
    for k in range(n - 1):
        sub = dist[np.ix_(active, active)]  # (a, a), active ids ascending
        i, j = np.unravel_index(np.argmin(sub), sub.shape)  # first minimum: lowest ids on ties
        a, b = sorted((active[i], active[j]))
        new = n + k
        size[new] = size[a] + size[b]
        rows.append([a, b, dist[a, b], size[new]])
        for c in active:
            if c not in (a, b):
                dist[new, c] = dist[c, new] = (size[a] * dist[a, c] + size[b] * dist[b, c]) / size[new]
        active = [c for c in active if c not in (a, b)] + [new]
    return np.asarray(rows, dtype=np.float64).reshape(n - 1, 4)


def leaf_order(linkage: np.ndarray, n: int) -> list[int]:
    """The tasks left to right in the dendrogram: each merge lists cluster a's tasks, then b's."""
    if n == 0:
        return []
    children = {n + k: (int(a), int(b)) for k, (a, b, _, _) in enumerate(linkage)}
    order, stack = [], [n + len(linkage) - 1 if len(linkage) else 0]
    while stack:
        node = stack.pop()
        if node < n:
            order.append(node)
        else:
            a, b = children[node]
            stack += [b, a]  # a first
    return order
