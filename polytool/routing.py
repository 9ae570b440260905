"""Eval-time mixing weights and task specs (numpy only, no torch import).

PEFT's router, at eval time, for one layer with `module_logits` of shape
(n_tasks, n_splits * n_skills), split-major (column q * n_skills + s):

    w = sigmoid(logits[task]).reshape(n_splits, n_skills)
    w = w / (w.sum(-1, keepdims=True) + 1e-12)          # per split; no softmax anywhere

`normalize_per_split` is written against the array API shared by numpy and torch, so polytool's
router (torch) and everything that reads files (numpy) use the same line.
"""
from __future__ import annotations

from typing import Union

import numpy as np

from .errors import PolytoolError

EPS = 1e-12

TaskSpec = Union[int, str]  # a task id, or "uniform" / "mean"
NAMED_SPECS = ("uniform", "mean")


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
    "mean": per split, the average over tasks of the eval weights.
    """
    if spec == "uniform":
        return np.full((n_splits, n_skills), 1.0 / n_skills)
    weights = eval_weights(logits, n_splits, n_skills)  # (t, q, s)
    if spec == "mean":
        return weights.mean(axis=0)
    return weights[int(spec)]


def parse_task_spec(text: str | int, n_tasks: int, allow_all: bool = False) -> TaskSpec:
    """Parse a --task value: an id in [0, n_tasks), "uniform", "mean" (and "all" if allowed)."""
    value = str(text).strip().lower()
    named = NAMED_SPECS + (("all",) if allow_all else ())
    if value in named:
        return value
    try:
        task = int(value)
    except ValueError:
        raise PolytoolError(
            f"invalid task {text!r}: expected an integer id in [0, {n_tasks})"
            f" or one of {', '.join(named)}"
        ) from None
    if not 0 <= task < n_tasks:
        raise PolytoolError(f"task {task} is out of range: this adapter has tasks 0..{n_tasks - 1}")
    return task


def spec_label(spec: TaskSpec) -> str:
    """Short stable name for a spec, used in file names and provenance: 'task-3', 'uniform', 'mean'."""
    return f"task-{spec}" if isinstance(spec, int) else str(spec)
