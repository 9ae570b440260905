"""The one collapse formula: routed skill inventory + mixing weights -> plain LoRA factors.

Everything that turns a Poly/MHR layer into a LoRA goes through `collapse_factors`: LoRA export,
the dense merge, verify, and the Poly layer's own forward (per task at eval, per sample in
training). It is written against the operations numpy and torch share (einsum with `...`,
reshape), so it serves files (numpy, float64) and the model (torch, with autograd) alike.

Per split q, with weights w[q, s]:  A_q = sum_s w[q,s] A[q,s],  B_q = sum_s w[q,s] B[q,s].
The A_q stack along the input rows, the B_q along the output columns; the update is
x @ A @ B / r. Mixing A and B separately is the model; sum_s w A_s B_s would be another one.
"""
from __future__ import annotations

import sys
from typing import Any, Iterator


def _einsum(x: Any):
    if type(x).__module__.startswith("torch"):
        import torch

        return torch.einsum
    import numpy as np

    return np.einsum


def collapse_factors(poly_A: Any, poly_B: Any, weights: Any) -> tuple[Any, Any]:
    """Mix one layer's skills.

    poly_A:  (n_splits, n_skills, in // n_splits, r)
    poly_B:  (n_splits, n_skills, r, out // n_splits)
    weights: (..., n_splits, n_skills)   any leading dims (tasks, batch rows, or none)
    returns  A (..., in, r) and B (..., r, out), so that the update is x @ A @ B / r.
    """
    einsum = _einsum(poly_A)
    n_splits, _, d_in, r = poly_A.shape
    d_out = poly_B.shape[-1]
    lead = tuple(weights.shape[:-2])
    A = einsum("...qs,qsdr->...qdr", weights, poly_A)  # (..., q, in/q, r)
    B = einsum("...qs,qsrd->...rqd", weights, poly_B)  # (..., r, q, out/q)
    return A.reshape(lead + (n_splits * d_in, r)), B.reshape(lead + (r, n_splits * d_out))


# PEFT's LoRA scales by lora_alpha / r; alpha 1 gives exactly the Poly update's 1/r, applied in
# the same order (x @ A @ B, then / r), so the exported factors are the collapsed ones unchanged.
LORA_ALPHA = 1


def lora_weights(A: Any, B: Any) -> tuple[Any, Any]:
    """Collapsed factors -> PEFT LoRA tensors (used with lora_alpha = LORA_ALPHA).

    A (in, r), B (r, out) -> lora_A.weight (r, in), lora_B.weight (out, r).
    """
    return A.T, B.T


def _namespace(x: Any) -> Any:
    """numpy or torch, whichever `x` belongs to."""
    return sys.modules[type(x).__module__.split(".")[0]]


def update_scale(r: int) -> Any:
    """What the update x @ A @ B is divided by: r. The one place every writer of dense weights takes it from
    (`dense_delta`, `add_stored_delta`)."""
    return r


def dense_delta(A: Any, B: Any, r: int, out: Any = None) -> Any:
    """Collapsed factors -> the (out, in) update to add to a Linear's weight: (A @ B / r).T. `out`: an array of
    the result's shape and dtype to compute in (a block buffer reused by the dense merge), or None."""
    D = _namespace(A).matmul(B.T, A.T, out=out)  # (out, r) @ (r, in)
    D /= update_scale(r)
    return D


def stored_delta(A: Any, B: Any, r: int, transposed: bool, lo: int = 0, hi: int | None = None, out: Any = None) -> Any:
    """Rows lo:hi of the update in the layout the weight is stored in: (out, in) for a Linear, (in, out)
    for GPT-2's Conv1D (`transposed`). Every writer of dense weights goes through here. `out`: a (rows, in)
    array a Linear's rows are computed in (a Conv1D's are a new array)."""
    if transposed:
        return dense_delta(A[lo:hi], B, r).T  # (out, rows).T -> (rows, out)
    return dense_delta(A, B[:, lo:hi], r, out)  # (rows, in)


def add_stored_delta(A: Any, B: Any, r: int, lo: int, hi: int, into: Any, out: Any = None) -> Any:
    """`into` += rows lo:hi of a Linear's update (`stored_delta`, not transposed), in place; returns `into`. Where
    the factors and `into` are float32 numpy arrays and 1/r is exact (r a power of two), one BLAS pass
    (core/blas.sgemm_add) whose every element is the one `into += stored_delta(...)` gives; else that, with `out`
    the buffer the delta's rows are computed in."""
    import numpy as np

    from .blas import sgemm_add

    a, b, scale = B[:, lo:hi].T, A.T, update_scale(r)  # (rows, r), (r, in)
    exact = scale > 0 and float(scale).is_integer() and int(scale) & (int(scale) - 1) == 0
    if not (exact and isinstance(into, np.ndarray) and min(into.shape) > 1 and sgemm_add(a, b, 1.0 / scale, into)):
        into += stored_delta(A, B, r, False, lo, hi, out)
    return into


def collapse_module(adapter: Any, module: str, spec: Any, dtype: Any = None) -> tuple[Any, Any]:
    """One module of `collapse_adapter`: A (in, r), B (r, out) of task spec `spec`, float64 by default."""
    import numpy as np

    dtype = np.float64 if dtype is None else dtype
    weights = adapter.spec_weights(module, spec).astype(dtype)  # (q, s)
    return collapse_factors(adapter.poly_A(module, dtype), adapter.poly_B(module, dtype), weights)


def collapse_adapter(adapter: Any, spec: Any, dtype: Any = None) -> Iterator[tuple[Any, Any, Any]]:
    """(PolyAdapter, task spec) -> (module, A (in, r), B (r, out)) per adapted module, in file order.

    Computed in float64 unless `dtype` says otherwise; callers round once to their output dtype.
    """
    for module in adapter.modules:
        yield (module, *collapse_module(adapter, module.name, spec, dtype))
