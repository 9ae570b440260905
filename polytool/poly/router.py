"""PolyRouter: per-task skill logits -> per-split mixing weights (PEFT's router, same numbers).

module_logits (n_tasks, n_splits * n_skills), split-major. Eval: sigmoid; training:
RelaxedBernoulli(temperature 1).rsample(); then `routing.normalize_per_split` (no softmax).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from ..core.routing import normalize_per_split
from .config import PolyConfig, PolyValueError

TaskIds = Union[int, Sequence[int], torch.Tensor]


def task_id_tensor(task_ids: TaskIds | None) -> torch.Tensor:
    """An int, a list of ints or an integer tensor -> a 1-D int64 CPU tensor (range checks then need no device sync)."""
    if task_ids is None:
        raise PolyValueError("task_ids is missing: pass task_ids=... (an int, a list or a tensor of task ids)")
    ids = task_ids if isinstance(task_ids, torch.Tensor) else torch.as_tensor(task_ids)
    if ids.numel() == 0:
        raise PolyValueError("task_ids is empty: give one task id, or one per batch row")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise PolyValueError(f"task_ids must be integers, got dtype {ids.dtype}")
    return ids.reshape(-1).long().cpu()


def check_range(low: int, high: int, n_tasks: int) -> None:
    """ValueError unless task ids from `low` to `high` all lie in [0, n_tasks)."""
    if low < 0 or high >= n_tasks:
        bad = low if low < 0 else high
        raise PolyValueError(f"task id {bad} is out of range: this adapter has tasks 0..{n_tasks - 1}")


class TaskRoute:
    """The task ids of one call, converted and summarised once and then shared by every Poly layer.

    `task` is the one task id when all ids are equal (layers then broadcast its factors), else None.
    Row ids per (batch size, device) are memoised: a model call converts, checks and expands once.
    With `keep_factors` (generate: parameters stay fixed for the call) `factors` is where layers keep
    their per-row factors from step to step, so a decode step neither re-checks nor re-gathers them.
    """

    def __init__(self, task_ids: TaskIds | None, keep_factors: bool = False):
        self.ids = task_id_tensor(task_ids)  # (n,) int64, CPU
        low, high = torch.aminmax(self.ids)
        self.low, self.high = int(low), int(high)
        self.task = self.low if self.low == self.high else None
        self._rows: dict[tuple[int, torch.device], torch.Tensor] = {}
        self.factors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] | None = {} if keep_factors else None
        self.batches: set[int] = set()  # batch sizes the model (and its encoder) were called with

    def note_batch(self, inputs: object) -> None:
        """Record the batch size of a model call's input ids / embeddings (a tensor whose dim 0 is the batch)."""
        if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2:
            self.batches.add(inputs.shape[0])

    def check(self, n_tasks: int) -> None:
        check_range(self.low, self.high, n_tasks)

    def rows(self, batch: int, device: torch.device, name: str = "") -> torch.Tensor:
        """(batch,) task ids on `device`: each id repeated k times when batch = k * n (generate's expansion)."""
        rows = self._rows.get((batch, device))
        if rows is None:
            n = self.ids.numel()
            if self.task is None and self.batches and batch not in self.batches:
                raise PolyValueError(
                    f"module {name!r}: its input's first dimension is {batch}, but the model was called with batch "
                    f"{' or '.join(map(str, sorted(self.batches)))}: this layer sees sequence-first or flattened "
                    "tokens, so per-row task ids cannot be routed; give every row the same task id"
                )
            if batch % n:
                raise PolyValueError(
                    f"module {name!r}: input batch size {batch} is not a multiple of the {n} task_ids given"
                )
            rows = self._rows[batch, device] = self.ids.repeat_interleave(batch // n).to(device)
        return rows


def relaxed_bernoulli_sample(logits: torch.Tensor) -> torch.Tensor:
    """RelaxedBernoulli(temperature=1.0, logits=logits).rsample(), PEFT's training draw, without building the
    distribution objects (their argument checks cost more than the draw, at every layer and step): the same
    uniforms from torch's generator and torch's arithmetic step for step (tests/test_poly_train.py)."""
    eps = torch.finfo(logits.dtype).eps
    probs = torch.sigmoid(logits).clamp(min=eps, max=1 - eps)  # clamp_probs(logits_to_probs(logits))
    u = torch.rand(logits.shape, dtype=probs.dtype, device=probs.device).clamp(min=eps, max=1 - eps)
    noisy = u.log() - (-u).log1p() + probs.log() - (-probs).log1p()  # LogitRelaxedBernoulli; / temperature 1
    return torch.sigmoid(noisy).clamp(min=torch.finfo(noisy.dtype).tiny, max=1 - eps)  # SigmoidTransform


class PolyRouter(nn.Module):
    """Mixing weights of one adapted layer."""

    def __init__(self, config: PolyConfig):
        super().__init__()
        self.n_tasks, self.n_skills, self.n_splits = config.n_tasks, config.n_skills, config.n_splits
        self.module_logits = nn.Parameter(torch.empty(self.n_tasks, self.n_splits * self.n_skills))
        self.reset()

    def reset(self) -> None:
        nn.init.uniform_(self.module_logits, -1e-3, 1e-3)

    def check(self, task_ids: torch.Tensor | None) -> None:
        """ValueError unless every id is in [0, n_tasks)."""
        if task_ids is None:
            raise PolyValueError("task_ids is missing: pass task_ids=... (an int, a list or a tensor of task ids)")
        low, high = torch.aminmax(task_ids)
        check_range(int(low), int(high), self.n_tasks)

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        """(b,) task ids -> (b, n_splits, n_skills) weights; stochastic in training mode."""
        self.check(task_ids)
        table = self.module_logits  # read once: it may be computed (a parametrization, polytool adapt)
        logits = table[task_ids.to(table.device)]  # (b, q*s)
        logits = logits.view(-1, self.n_splits, self.n_skills)  # (b, q, s)
        if self.training:
            scores = relaxed_bernoulli_sample(logits)
        else:
            scores = torch.sigmoid(logits)
        return normalize_per_split(scores)

    def task_weights(self) -> torch.Tensor:
        """Eval weights of every task: (n_tasks, n_splits, n_skills)."""
        scores = torch.sigmoid(self.module_logits).view(self.n_tasks, self.n_splits, self.n_skills)  # (t, q, s)
        return normalize_per_split(scores)
