"""PolyRouter: per-task skill logits -> per-split mixing weights (PEFT's router, same numbers).

module_logits (n_tasks, n_splits * n_skills), split-major. Eval: sigmoid; training:
RelaxedBernoulli(temperature 1).rsample(); then `routing.normalize_per_split` (no softmax).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from ..routing import normalize_per_split
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
        low, high = int(task_ids.min()), int(task_ids.max())
        if low < 0 or high >= self.n_tasks:
            bad = low if low < 0 else high
            raise PolyValueError(f"task id {bad} is out of range: this adapter has tasks 0..{self.n_tasks - 1}")

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        """(b,) task ids -> (b, n_splits, n_skills) weights; stochastic in training mode."""
        self.check(task_ids)
        logits = self.module_logits[task_ids.to(self.module_logits.device)]  # (b, q*s)
        logits = logits.view(-1, self.n_splits, self.n_skills)  # (b, q, s)
        if self.training:
            scores = RelaxedBernoulli(temperature=1.0, logits=logits).rsample()
        else:
            scores = torch.sigmoid(logits)
        return normalize_per_split(scores)

    def task_weights(self) -> torch.Tensor:
        """Eval weights of every task: (n_tasks, n_splits, n_skills)."""
        scores = torch.sigmoid(self.module_logits).view(self.n_tasks, self.n_splits, self.n_skills)  # (t, q, s)
        return normalize_per_split(scores)
