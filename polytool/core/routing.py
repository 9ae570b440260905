"""Eval-time mixing weights and routing statistics (numpy only, no torch import).

PEFT's router, at eval time, for one layer with `module_logits` of shape
(n_tasks, n_splits * n_skills), split-major (column q * n_skills + s):

    w = sigmoid(logits[task]).reshape(n_splits, n_skills)
    w = w / (w.sum(-1, keepdims=True) + 1e-12)          # per split; no softmax anywhere

`normalize_per_split` is written against the array API shared by numpy and torch, so polytool's
router (torch) and everything that reads files (numpy) use the same line.
"""
from __future__ import annotations

import numpy as np

from .taskspec import TaskMix, TaskSpec

EPS = 1e-12


def normalize_per_split(w):
    """(..., n_splits, n_skills) non-negative scores -> mixing weights summing to 1 per split."""
    return w / (w.sum(axis=-1, keepdims=True) + EPS)


def sigmoid(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    pos = x >= 0  # two branches: exp never overflows
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def eval_weights(logits: np.ndarray, n_splits: int, n_skills: int) -> np.ndarray:
    """(n_tasks, n_splits * n_skills) logits -> (n_tasks, n_splits, n_skills) eval mixing weights (float64)."""
    n_tasks = logits.shape[0]
    probs = sigmoid(np.asarray(logits, dtype=np.float64))
    return normalize_per_split(probs.reshape(n_tasks, n_splits, n_skills))  # (t, q, s)


def spec_weights(logits: np.ndarray, n_splits: int, n_skills: int, spec: TaskSpec) -> np.ndarray:
    """The (n_splits, n_skills) mixing weights one task spec gives for one layer (float64).

    int: that task's eval weights; "uniform": 1 / n_skills everywhere (MHR-mu);
    "mean": per split, the average over tasks of the eval weights; TaskMix: sum_i c_i w_{task_i}.
    """
    if spec == "uniform":
        return np.full((n_splits, n_skills), 1.0 / n_skills)
    weights = eval_weights(logits, n_splits, n_skills)  # (t, q, s)
    if spec == "mean":
        return weights.mean(axis=0)
    if isinstance(spec, TaskMix):
        return np.tensordot(np.asarray(spec.coefficients), weights[list(spec.tasks)], axes=1)  # (m,) . (m, q, s) -> (q, s)
    return weights[int(spec)]


# ---- routing statistics ---------------------------------------------------------------------
# Ponti et al. 2022 ("Combining Modular Skills in Multitask Learning", arXiv 2202.13914) describe
# a layer's learned routing by its task-skill allocation Z = sigmoid(logits), one (n_tasks,
# n_skills) matrix per layer and, for MHR, per split. docs/inspect.md states each definition.


def allocation(logits: np.ndarray, n_splits: int, n_skills: int) -> np.ndarray:
    """(n_tasks, n_splits * n_skills) logits -> (n_tasks, n_splits, n_skills) allocation sigmoid(logits)."""
    n_tasks = logits.shape[0]
    return sigmoid(np.asarray(logits, dtype=np.float64)).reshape(n_tasks, n_splits, n_skills)  # (t, q, s)


def _xlogx(p: np.ndarray) -> np.ndarray:
    """p * log(p), with 0 * log(0) = 0."""
    safe = np.where(p > 0, p, 1.0)
    return np.where(p > 0, p * np.log(safe), 0.0)


def rounded(alloc: np.ndarray) -> np.ndarray:
    """The allocation rounded to 0/1 (an entry >= 0.5 counts as 1)."""
    return np.floor(alloc + 0.5)


def discreteness(alloc: np.ndarray) -> np.ndarray:
    """(t, q, s) allocation -> (q,): mean Bernoulli entropy of the entries / log 2.

    0 when every entry is 0 or 1 (fully discrete), 1 when every entry is 1/2.
    """
    bits = -(_xlogx(alloc) + _xlogx(1.0 - alloc)) / np.log(2.0)  # (t, q, s)
    return bits.mean(axis=(0, 2))


def sparsity(alloc: np.ndarray) -> np.ndarray:
    """(t, q, s) allocation -> (q,): fraction of zero entries in the rounded allocation."""
    return 1.0 - rounded(alloc).mean(axis=(0, 2))


def skill_usage(alloc: np.ndarray) -> np.ndarray:
    """(t, q, s) allocation -> (q,): entropy of the normalised column sums / log n_skills.

    1 when every skill receives the same total allocation over tasks; 0 when one skill takes all
    (or nothing is allocated). With a single skill it is 1 by definition.
    """
    n_skills = alloc.shape[-1]
    cols = alloc.sum(axis=0)  # (q, s): each skill's total over tasks
    total = cols.sum(axis=-1, keepdims=True)  # (q, 1)
    share = np.divide(cols, total, out=np.zeros_like(cols), where=total > 0)
    if n_skills == 1:
        return np.ones(alloc.shape[1])
    return -_xlogx(share).sum(axis=-1) / np.log(n_skills)


def unused_skills(alloc: np.ndarray) -> list[list[int]]:
    """(t, q, s) allocation -> per split, the skills whose rounded allocation is 0 for every task."""
    used = rounded(alloc).max(axis=0)  # (q, s)
    return [np.flatnonzero(row == 0).tolist() for row in used]


def effective_skills(dist: np.ndarray) -> np.ndarray:
    """(..., n_skills) distributions -> (...,): exp of their entropy (1 = one skill, n = uniform)."""
    return np.exp(-_xlogx(dist).sum(axis=-1))


def cosine_similarity(x: np.ndarray) -> np.ndarray:
    """(n, d) rows -> (n, n) cosine similarities (a zero row is 0 against everything)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (n, 1)
    unit = np.divide(x, norms, out=np.zeros_like(x, dtype=np.float64), where=norms > 0)
    return unit @ unit.T


def normalized_entropy(dist: np.ndarray) -> np.ndarray:
    """(..., n_skills) distributions -> (...,): entropy / log n_skills (1 = uniform, 0 = one skill).

    With a single skill it is 1 by definition (as `skill_usage`)."""
    n_skills = dist.shape[-1]
    if n_skills == 1:
        return np.ones(dist.shape[:-1])
    return -_xlogx(dist).sum(axis=-1) / np.log(n_skills)
