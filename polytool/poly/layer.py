"""Poly layers: a base linear map plus routed low-rank skills, x -> base(x) + x @ A_mix @ B_mix / r.

A_mix, B_mix come from `collapse.collapse_factors` (the one collapse formula): per batch row from
stochastic weights in training, per task once from the eval weights at eval (cached until a
parameter changes), then gathered by task id. Parameters live in ParameterDict / ModuleDict keyed by
adapter name, as in PEFT (`poly_lora_A.default`, `poly_router.default.module_logits`).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..collapse import collapse_factors
from ..errors import PolytoolError
from .config import PolyConfig, PolyValueError
from .router import PolyRouter, TaskIds, task_id_tensor


class UnsupportedTargetError(PolytoolError, ValueError, TypeError):
    """A target module Poly cannot wrap (PEFT raises TypeError, its docs say ValueError: this is both)."""


def linear_features(base: nn.Module, name: str = "") -> tuple[int, int]:
    """(in, out) of an nn.Linear or a transformers Conv1D (weight (in, out)); UnsupportedTargetError otherwise."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    from transformers.pytorch_utils import Conv1D

    if isinstance(base, Conv1D):
        d_in, d_out = base.weight.shape  # Conv1D: y = x @ W + b, W (in, out)
        return d_in, d_out
    raise UnsupportedTargetError(
        f"target module {name!r} has type {type(base).__module__}.{type(base).__name__}: Poly supports only "
        "torch.nn.Linear and transformers' Conv1D"
    )


def _kaiming_stack(n_splits: int, n_skills: int, fan_in: int, rows: int) -> torch.Tensor:
    """(q, s, fan_in, rows): per (split, skill) an nn.Linear-style init of a (rows, fan_in) tensor, transposed."""
    out = torch.empty(n_splits, n_skills, fan_in, rows)
    for skill in range(n_skills):  # PEFT's loop order, so seeded inits match
        for split in range(n_splits):
            block = torch.empty(rows, fan_in)
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
            out[split, skill] = block.T
    return out


class PolyLayer(nn.Module):
    """The adapters of one wrapped layer: skills, routers, the active adapter and the eval cache."""

    def __init__(self, base_layer: nn.Module, name: str = ""):
        super().__init__()
        self.in_features, self.out_features = linear_features(base_layer, name)
        self.base_layer = base_layer
        self.name = name
        self.r: dict[str, int] = {}
        self.poly_lora_A = nn.ParameterDict()
        self.poly_lora_B = nn.ParameterDict()
        self.poly_router = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self._cache: dict[str, tuple[tuple, torch.Tensor, torch.Tensor]] = {}

    def update_layer(self, adapter_name: str, config: PolyConfig) -> None:
        """Add adapter `adapter_name`, initialised as PEFT does, in float32 on the base layer's device."""
        q, s, r = config.n_splits, config.n_skills, config.r
        for what, size in (("in", self.in_features), ("out", self.out_features)):
            if size % q:
                raise PolyValueError(
                    f"module {self.name!r}: {what}_features {size} is not divisible by n_splits {q}"
                )
        A = _kaiming_stack(q, s, self.in_features // q, r)  # (q, s, in/q, r)
        if config.init_weights:
            B = torch.zeros(q, s, r, self.out_features // q)  # (q, s, r, out/q)
        else:
            B = _kaiming_stack(q, s, r, self.out_features // q)
        device = self.base_layer.weight.device
        self.r[adapter_name] = r
        self.poly_lora_A[adapter_name] = nn.Parameter(A.to(device))
        self.poly_lora_B[adapter_name] = nn.Parameter(B.to(device))
        self.poly_router[adapter_name] = PolyRouter(config).to(device)
        self.poly_router[adapter_name].train(self.training)
        if self.active_adapter is None:
            self.active_adapter = adapter_name

    def adapter_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """The adapter's tensors by saved-key suffix (poly_lora_A, poly_lora_B, poly_router.module_logits)."""
        return {
            "poly_lora_A": self.poly_lora_A[adapter_name],
            "poly_lora_B": self.poly_lora_B[adapter_name],
            "poly_router.module_logits": self.poly_router[adapter_name].module_logits,
        }

    def train(self, mode: bool = True):
        self._cache.clear()
        return super().train(mode)

    def _task_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval factors of every task, A (t, in, r) and B (t, r, out), recomputed when a parameter changed."""
        params = self.adapter_parameters(adapter_name).values()
        key = tuple((p._version, p.data_ptr(), p.device, p.dtype) for p in params)
        cached = self._cache.get(adapter_name)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        with torch.no_grad():
            weights = self.poly_router[adapter_name].task_weights()  # (t, q, s)
            A, B = collapse_factors(self.poly_lora_A[adapter_name], self.poly_lora_B[adapter_name], weights)
        self._cache[adapter_name] = (key, A, B)
        return A, B

    def _row_factors(self, adapter_name: str, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row factors A (b, in, r), B (b, r, out) for (b,) task ids."""
        router = self.poly_router[adapter_name]
        poly_A, poly_B = self.poly_lora_A[adapter_name], self.poly_lora_B[adapter_name]
        if self.training:
            return collapse_factors(poly_A, poly_B, router(task_ids))  # stochastic (b, q, s) weights
        router.check(task_ids)
        rows = task_ids.to(poly_A.device)
        if torch.is_grad_enabled() and any(p.requires_grad for p in (poly_A, poly_B, router.module_logits)):
            self._cache.pop(adapter_name, None)  # a step may follow, and fused optimizers keep _version
            A, B = collapse_factors(poly_A, poly_B, router.task_weights())  # (t, in, r), (t, r, out), with grad
        else:
            A, B = self._task_factors(adapter_name)
        return A[rows], B[rows]


def expand_task_ids(task_ids: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Task ids for `batch` rows: repeated k times each when batch = k * len(task_ids) (generate's expansion)."""
    n = task_ids.numel()
    if batch == n:
        return task_ids
    if batch % n:
        raise PolyValueError(
            f"module {name!r}: input batch size {batch} is not a multiple of the {n} task_ids given"
        )
    return task_ids.repeat_interleave(batch // n)


class Linear(PolyLayer):
    """Poly/MHR wrapper of an nn.Linear (or a transformers Conv1D); any input shape (..., in)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: PolyConfig, name: str = ""):
        super().__init__(base_layer, name)
        self.update_layer(adapter_name, config)
        self.train(base_layer.training)

    def forward(self, x: torch.Tensor, *args: Any, task_ids: TaskIds | None = None, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        adapter = self.active_adapter
        if self.disabled or adapter not in self.poly_lora_A:
            return result
        if task_ids is None:
            raise PolyValueError(f"module {self.name!r}: task_ids is missing: pass task_ids=... to forward or generate")
        rows = x.unsqueeze(0) if x.dim() == 1 else x  # (b, ..., in)
        task_ids = expand_task_ids(task_id_tensor(task_ids), rows.shape[0], self.name)
        A, B = self._row_factors(adapter, task_ids)
        flat = rows.reshape(rows.shape[0], -1, self.in_features).to(A.dtype)  # (b, L, in)
        update = flat.bmm(A).bmm(B) / self.r[adapter]  # (b, L, r) -> (b, L, out)
        update = update.reshape(x.shape[:-1] + (self.out_features,))  # (..., out)
        return result + update.to(result.dtype)

    def __repr__(self) -> str:
        return "poly." + super().__repr__()
