"""Poly layers: a base linear map plus routed low-rank skills, x -> base(x) + x @ A_mix @ B_mix / r.

A_mix, B_mix come from `collapse.collapse_factors` (the one collapse formula). Training: per batch
row from stochastic weights, with PEFT's math (the 1/r applied to B). Eval: per task from the eval weights,
cached until a parameter changes; each row's factors (a broadcast view when all rows share a task,
else a gathered copy) go into two batched matmuls, and the update is added in place when autograd
records nothing; where the base is a plain nn.Linear nothing hooks, the update is computed first and the
base's product added into it by its own GEMM (`Linear._fused_eval`; docs/performance.md has the
measurements). Parameters live in ParameterDict / ModuleDict keyed by adapter name, as in PEFT
(`poly_lora_A.default`, `poly_router.default.module_logits`).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from ..core.collapse import collapse_factors
from ..errors import PolytoolError
from .config import PolyConfig, PolyValueError
from .router import PolyRouter, TaskIds, TaskRoute


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

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight: model code reads it (T5's feed-forward checks `self.wo.weight.dtype`)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def __getattr__(self, name: str) -> Any:
        """Attributes model code reads on the layer it wrapped fall through to the base layer, as in PEFT."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self._modules.get("base_layer")
            if base is None:  # not initialised yet: no recursion
                raise
            return getattr(base, name)

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
        """Eval factors of every task, A.T (t, r, in) and B / r (t, r, out): the update is x @ A @ (B / r).

        A comes transposed: x @ A runs about 2x faster on CPU (r 8) when A is r-major in memory.
        Computed afresh, with grad, when grad is needed (grad mode on and an adapter tensor trainable);
        otherwise cached until a parameter changes: in place (its version counter moves), replaced (its storage
        moves), or moved to another device or dtype. Checking that costs nothing per forward. A write through
        `.data` moves no version counter: call `invalidate_cache()` (or PolyModel's) after one. The cache is
        built outside inference mode, so it serves every mode.
        """
        poly_A, poly_B = self.poly_lora_A[adapter_name], self.poly_lora_B[adapter_name]
        router, r = self.poly_router[adapter_name], self.r[adapter_name]
        params = (poly_A, poly_B, router.module_logits)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            self._cache.pop(adapter_name, None)  # a step may follow, and fused optimizers keep _version
            A, B = collapse_factors(poly_A, poly_B, router.task_weights())  # (t, in, r), (t, r, out)
            return A.mT, B / r
        key = tuple((p._version, p.data_ptr(), p.device, p.dtype) for p in params)
        cached = self._cache.get(adapter_name)
        if cached is None or cached[0] != key:  # in the parameters' dtype whatever autocast is on: kept for every call
            with torch.inference_mode(False), torch.no_grad(), torch.autocast(poly_A.device.type, enabled=False):
                A, B = collapse_factors(poly_A, poly_B, router.task_weights())  # (t, in, r), (t, r, out)
                cached = self._cache[adapter_name] = (key, A.mT.contiguous(), B / r)
        return cached[1], cached[2]

    def invalidate_cache(self) -> None:
        """Forget the eval factors: needed only after writing an adapter tensor through `.data`."""
        self._cache.clear()

    def _train_update(self, adapter_name: str, out: torch.Tensor, x: torch.Tensor, route: TaskRoute) -> torch.Tensor:
        """out (b, L, out) + x (b, L, in) @ A @ B / r with stochastic per-row factors: PEFT's math."""
        poly_A, poly_B = self.poly_lora_A[adapter_name], self.poly_lora_B[adapter_name]
        rows = route.rows(x.shape[0], poly_A.device, self.name)  # (b,)
        A, B = collapse_factors(poly_A, poly_B, self.poly_router[adapter_name](rows))  # (b, in, r), (b, r, out)
        xa = x.to(A.dtype).bmm(A)  # (b, L, in) @ (b, in, r) -> (b, L, r)
        # 1/r on the (b, r, out) factor, not on the (b, L, out) update; added in the same call (baddbmm)
        return _add_product(out, xa, B / self.r[adapter_name])  # (b, L, r) @ (b, r, out)

    def _row_factors(self, adapter_name: str, route: TaskRoute, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A.T (b, r, in) and B / r (b, r, out) of each row's task: broadcast views when all rows share a
        task, else a gathered copy. A route that keeps factors (generate) keeps them for its later steps,
        unless they carry grad or a copy would outgrow the per-task cache (b > n_tasks)."""
        kept, key = route.factors, (id(self), adapter_name, batch)
        if kept is not None and key in kept:
            return kept[key]
        At, B = self._task_factors(adapter_name)  # (t, r, in), (t, r, out)
        n_tasks = At.shape[0]
        route.check(n_tasks)
        rows = route.rows(batch, At.device, self.name)  # (b,)
        if route.task is None:
            At, B = At.index_select(0, rows), B.index_select(0, rows)  # (b, r, in), (b, r, out)
        else:
            At, B = At[route.task].expand(batch, -1, -1), B[route.task].expand(batch, -1, -1)
        if kept is not None and not B.requires_grad and (route.task is not None or batch <= n_tasks):
            kept[key] = At, B
        return At, B

    def _eval_update(self, adapter_name: str, out: torch.Tensor, x: torch.Tensor, route: TaskRoute) -> torch.Tensor:
        """out (b, L, out) + x (b, L, in) @ A @ (B / r) with each row's task factors."""
        At, B = self._row_factors(adapter_name, route, x.shape[0])  # (b, r, in), (b, r, out)
        # batched matmuls per row, not one 2-D matmul over all tokens: MKL runs these thin ones faster
        x = x if x.dtype == At.dtype else x.to(At.dtype)
        xa = At.bmm(x.mT).mT  # (b, r, in) @ (b, in, L) -> (b, r, L) -> (b, L, r)
        return _add_product(out, xa, B)  # (b, L, r) @ (b, r, out)


def _add_product(out: torch.Tensor, xa: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """out + xa @ B for (b, L, out), (b, L, r), (b, r, out): in place unless autograd records the call or autocast
    runs it (its products come out in half precision beside the float32 factor; an in-place call takes none)."""
    if out.dtype != xa.dtype:  # a half-precision base with the float32 adapter: add in float32, round once
        return (out + xa.bmm(B)).to(out.dtype)
    if torch.is_grad_enabled() or torch.is_autocast_enabled(out.device.type):  # autocast: baddbmm's own dtypes
        return torch.baddbmm(out, xa, B)
    return out.baddbmm_(xa, B)


class Linear(PolyLayer):
    """Poly/MHR wrapper of an nn.Linear (or a transformers Conv1D); any input shape (..., in)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: PolyConfig, name: str = ""):
        super().__init__(base_layer, name)
        self.update_layer(adapter_name, config)
        self.train(base_layer.training)

    def forward(self, x: torch.Tensor, *args: Any, task_ids: TaskIds | TaskRoute | None = None,
                **kwargs: Any) -> torch.Tensor:
        adapter = self.active_adapter
        if self.disabled or adapter not in self.poly_lora_A:
            return self.base_layer(x, *args, **kwargs)
        if task_ids is None:
            raise PolyValueError(f"module {self.name!r}: task_ids is missing: pass task_ids=... to forward or generate")
        route = task_ids if isinstance(task_ids, TaskRoute) else TaskRoute(task_ids)
        fused = None if self.training or args or kwargs else self._fusable(x, adapter)
        if fused:
            return self._fused_eval(adapter, x, route, *fused)
        result = self.base_layer(x, *args, **kwargs)
        update = self._train_update if self.training else self._eval_update
        if x.dim() == 3:  # (b, L, in) already, result (b, L, out): no reshape calls (a decode step's overhead)
            return update(adapter, result, x, route)
        batch = x.shape[0] if x.dim() > 1 else 1
        flat = x.reshape(batch, -1, self.in_features)  # (b, L, in)
        out = result.reshape(batch, -1, self.out_features)  # (b, L, out), a view of result
        return update(adapter, out, flat, route).reshape(result.shape)  # (..., out)

    def _fusable(self, x: torch.Tensor, adapter_name: str) -> tuple | None:
        """The base layer's (weight, bias) where the eval update can go into its own product (`_fused_eval`), else
        None: nothing records autograd and no autocast changes the dtypes of the products (the in-place add would
        meet a float32 weight with a half output), the base is a plain nn.Linear whose forward nothing wraps or
        hooks (accelerate's hooks replace the instance's `forward`; a quantized layer is a subclass), weight and
        bias are its plain parameters (a quantized weight is a tensor subclass; a bias set as a plain attribute
        is not in `_parameters`), and input, weight and adapter share a dtype. Read from the modules' own dicts:
        this runs on every call of every layer (a decode step's)."""
        base = self._modules["base_layer"]
        if (type(base) is not nn.Linear or torch.is_grad_enabled() or "forward" in base.__dict__
                or base._forward_hooks or base._forward_pre_hooks or _global_forward_hooks()):
            return None
        params = base._parameters
        weight, bias = params.get("weight"), params.get("bias")
        if (type(weight) is not nn.Parameter or "bias" not in params
                or (bias is not None and type(bias) is not nn.Parameter)
                or not x.dtype == weight.dtype == self.poly_lora_A[adapter_name].dtype
                or torch.is_autocast_enabled(x.device.type)):
            return None
        return weight, bias

    def _fused_eval(self, adapter_name: str, x: torch.Tensor, route: TaskRoute, weight: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
        """x @ W.T + b + x @ A @ (B / r) with each row's task factors, the update computed first and the base
        product added into it by the GEMM itself (addmm_, beta 1): the output is written by the update's
        product and read once inside the GEMM, where the unfused order reads and writes it once more after the
        base's GEMM (bench_forward: 0.5 to 1.3 points less overhead over the bare base, docs/performance.md). The
        same sums in another order: equal to the unfused forward to float32 rounding (tests/test_poly_layer.py)."""
        three = x.dim() == 3
        batch = x.shape[0] if three or x.dim() > 1 else 1
        flat = x if three else x.reshape(batch, -1, self.in_features)  # (b, L, in)
        At, B = self._row_factors(adapter_name, route, batch)  # (b, r, in), (b, r, out)
        xa = At.bmm(flat.mT).mT  # (b, L, r)
        out = torch.bmm(xa, B) if bias is None else torch.baddbmm(bias, xa, B)  # (b, L, out)
        out.view(-1, self.out_features).addmm_(flat.reshape(-1, self.in_features), weight.t())
        return out if three else out.reshape(x.shape[:-1] + (self.out_features,))

    def __repr__(self) -> str:
        return "poly." + super().__repr__()


def _global_forward_hooks() -> bool:
    """Whether any forward hook is registered for every module (torch.nn.modules.module's globals): the fused
    eval forward does not call the base layer, so it would skip them."""
    return bool(getattr(_torch_module, "_global_forward_hooks", None)
                or getattr(_torch_module, "_global_forward_pre_hooks", None))
