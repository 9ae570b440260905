"""Task specs: which routing a command collapses, as the user writes it on the command line.

    3            task 3's eval weights
    uniform      1 / n_skills everywhere (MHR-mu, for unseen tasks)
    mean         per split, the average over tasks of the eval weights
    1,3          a mix with equal coefficients;  1:0.7,3:0.3  coefficients normalised to sum to 1
    all          (collapse --to lora only) every task, one output each

`parse_task_spec` validates against the adapter's n_tasks; `spec_label` is the canonical form recorded in
provenance and used in file names. Torch-free; verify parses specs on its own (verify/reference.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

from ..errors import PolytoolError


@dataclass(frozen=True)
class TaskMix:
    """A mix of tasks in routing space: per module and split, w = sum_i c_i * w_{task_i}.

    Each w_task is per-split normalised and the c_i are positive and sum to 1, so w is too: it is
    the eval weights of a routed task (logits logit(w / 2) give it), and the collapse of a mix is an
    exact rank-r LoRA. `str()` is the canonical form recorded in provenance, e.g. "1:0.7,3:0.3".
    """

    tasks: tuple[int, ...]  # ascending, distinct
    coefficients: tuple[float, ...]  # > 0, summing to 1

    def __str__(self) -> str:
        return ",".join(f"{t}:{c!r}" for t, c in zip(self.tasks, self.coefficients))


TaskSpec = Union[int, str, TaskMix]  # a task id, "uniform" / "mean", or a mix of tasks


NAMED_SPECS = ("uniform", "mean")


def _task_id(text: str, n_tasks: int) -> int:
    task = int(text)
    if not 0 <= task < n_tasks:
        raise PolytoolError(f"task {task} is out of range: this adapter has tasks 0..{n_tasks - 1}")
    return task


def parse_task_mix(text: str, n_tasks: int) -> TaskSpec:
    """'1,3' (equal weights) or '1:0.7,3:0.3' (weights normalised to sum to 1) -> TaskMix (one task: its id)."""
    entries = [e.strip() for e in text.split(",")]
    pairs = [e.partition(":") for e in entries]
    weighted = {sep == ":" for _, sep, _ in pairs}
    try:
        if len(weighted) != 1:
            raise ValueError
        tasks = [_task_id(t, n_tasks) for t, _, _ in pairs]
        raw = [float(w) for _, _, w in pairs] if weighted == {True} else [1.0] * len(pairs)
    except ValueError:
        raise PolytoolError(f"invalid task mix {text!r}: expected TASK,TASK,... (equal weights) or "
                            "TASK:WEIGHT,TASK:WEIGHT,... e.g. 1:0.7,3:0.3") from None
    if not all(math.isfinite(w) and w > 0 for w in raw):
        raise PolytoolError(f"invalid task mix {text!r}: every weight must be a finite number > 0")
    if len(set(tasks)) != len(tasks):
        raise PolytoolError(f"invalid task mix {text!r}: a task appears twice")
    total = math.fsum(raw)
    order = sorted(range(len(tasks)), key=tasks.__getitem__)
    if len(tasks) == 1:
        return tasks[0]
    return TaskMix(tuple(tasks[i] for i in order), tuple(raw[i] / total for i in order))


def parse_task_spec(text: str | int, n_tasks: int, allow_all: bool = False) -> TaskSpec:
    """Parse a --task value: an id in [0, n_tasks), "uniform", "mean", a mix "1,3" / "1:0.7,3:0.3"
    (and "all" if allowed)."""
    value = str(text).strip().lower()
    named = NAMED_SPECS + (("all",) if allow_all else ())
    if value in named:
        return value
    if "," in value or ":" in value:
        return parse_task_mix(value, n_tasks)
    try:
        task = int(value)
    except ValueError:
        raise PolytoolError(
            f"invalid task {text!r}: expected an integer id in [0, {n_tasks}),"
            f" one of {', '.join(named)}, or a mix such as 1,3 or 1:0.7,3:0.3"
        ) from None
    return _task_id(str(task), n_tasks)


def spec_label(spec: TaskSpec) -> str:
    """Short stable name for a spec, used in file names and provenance: 'task-3', 'uniform', 'mean',
    '1:0.7,3:0.3' (a mix: its canonical form)."""
    return f"task-{spec}" if isinstance(spec, int) else str(spec)
