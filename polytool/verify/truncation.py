"""Rank-reduced merges (`polytool merge --rank K` / `--energy E`): the artifact's error beside the optimum.

Per module, with D the exact merged delta recomputed by reference_merge.py (float64, (out, in)), s its
singular values (float64 SVD, verify's own) and D_art = B @ A * scaling the artifact's delta as PEFT loads it:

    error    = ||D_art - D||_F / ||D||_F
    optimum  = sqrt(sum_{i > k} s_i^2) / ||D||_F       Eckart-Young: no rank-k matrix is closer to D
    passes   where error^2 <= (optimum + defined)^2 + rounding^2
             defined  = 2 ||allowance||_F / ||D||_F,  rounding = 2 u(dtype) (1 + sqrt(k))

k is the artifact's rank for the module. The slack is float rounding only. `defined`: a pruned merge's delta
is defined in float32, so the product's own delta D' may differ from D by the recomputation's per-entry
allowance; the optimum for D' and the distance to D each move by at most ||D' - D||. `rounding`: the
factors B (out, k), A (k, in) are stored rounded to the artifact's dtype (relative u each); with the best
factors one of them orthonormal, ||dB A|| + ||B dA|| <= u ||D|| (1 + sqrt(k)), and that first-order error lies
in the top-k singular subspaces, orthogonal to the residual D - D_k, so it adds in quadrature. A rank that throws away more than the optimum, a
wrong singular subspace, or a truncation of another delta exceeds it. With --rank K the artifact's rank must
not exceed K; with --energy E its retained share of s^2 must reach E (within the slack).

The forward of a truncated merge is then compared with the best rank-k approximation of D (U_k S_k V_k.T,
`BestRank`), which a truncation that is optimal equals up to rounding: it proves the LoRA, as loaded, computes
the optimum. Where s_k and s_{k+1} coincide within the slack the best rank-k is not unique: the module is
flagged `degenerate`, and its forward takes the artifact's own factors (whose error was just proven optimal);
so does a module with `ambiguous` entries (reference_merge.py), whose exact delta the definition leaves open.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import PolytoolError

UNIT = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


def check_truncation(lora: Any, recipe: Any, dtype: str) -> dict:
    """{"modules": [{module, rank, error, optimum, excess, energy, degenerate}], "slack_max", "first_bad",
    "worst_excess"} of a truncated merge LoRA (`lora`: the artifact read, its factors and scalings)."""
    u = UNIT.get(dtype, UNIT["float32"])
    asked_rank, asked_energy = recipe.recipe.get("rank"), recipe.recipe.get("energy")
    rows, first_bad, worst = [], None, -math.inf
    for name in recipe.modules:
        D = recipe.delta(name)  # (out, in) float64
        A, B = lora.weights.get(name, (None, None))  # (k, in), (out, k)
        if A is None or A.shape[1] != D.shape[1] or B.shape != (D.shape[0], A.shape[0]):
            raise PolytoolError(f"module {name!r} of the merge recipe: the LoRA's factors {_shapes(A, B)} do not make "
                                f"its (out, in) {list(D.shape)} delta", lora.directory)
        k = A.shape[0]
        got = (torch.from_numpy(B).double() @ torch.from_numpy(A).double()) * lora.scalings[name]  # (out, k) @ (k, in)
        s = torch.linalg.svdvals(D)  # descending
        norm = float(s.norm())
        allowance = recipe.allowance(name)
        # the definition's own slack (a pruned delta's float32 arithmetic and ambiguous entries), and the factors'
        # rounding to the stored dtype: first order orthogonal to the residual D - D_k, so it adds in quadrature
        defined = 0.0 if allowance is None or norm == 0 else 2 * float(allowance.norm()) / norm
        rounding = 2 * u * (1 + math.sqrt(k))
        error = float((got - D).norm()) / norm if norm > 0 else (0.0 if float(got.norm()) == 0 else math.inf)
        optimum = float(s[k:].norm()) / norm if norm > 0 else 0.0
        slack = math.sqrt((optimum + defined) ** 2 + rounding ** 2) - optimum + 1e-12
        energy = float(s[:k].square().sum()) / norm ** 2 if norm > 0 else 1.0
        degenerate = k < len(s) and float(s[k - 1] - s[k]) <= max(defined, 1e-9) * norm
        bad = not error <= optimum + slack  # NaN-proof
        if asked_rank is not None and k > asked_rank:
            bad = True
        if asked_energy is not None and not energy >= asked_energy - 2 * (defined + 1e-9):
            bad = True
        if bad and first_bad is None:
            first_bad = name
        worst = max(worst, error - optimum)
        rows.append({"module": name, "rank": k, "error": error, "optimum": optimum, "excess": error - optimum,
                     "slack": slack, "energy": energy, "degenerate": degenerate, "ambiguous": recipe.ambiguous(name),
                     "passed": not bad})
    return {"modules": rows, "first_bad": first_bad, "worst_excess": worst if rows else 0.0,
            "asked": {"rank": asked_rank, "energy": asked_energy}}


def _shapes(A: Any, B: Any) -> str:
    return "missing" if A is None else f"lora_A {list(A.shape)} / lora_B {list(B.shape)}"


class BestRank:
    """The best rank-k approximation of each module's exact delta (k per module: the artifact's ranks), as a
    recipe-like object (`modules`, `delta`) for the forward reference of a truncated merge."""

    def __init__(self, recipe: Any, ranks: dict[str, int], own: dict[str, tuple] | None = None):
        self.recipe, self.ranks, self.modules = recipe, ranks, recipe.modules
        self.own = own or {}  # degenerate modules: the artifact's own factors (their optimality proven above)

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """B (out, k), A (k, in) float64 with B @ A the best rank-k approximation; the singular values on the
        longer side's factor, the other orthonormal (the layout polytool writes, so that rounding both to a half
        dtype is the ideal rounding of that artifact)."""
        if module in self.own:
            return self.own[module]
        D = self.recipe.delta(module)  # (out, in) float64
        k = self.ranks[module]
        U, s, Vh = torch.linalg.svd(D, full_matrices=False)  # (out, p), (p,), (p, in)
        if D.shape[0] > D.shape[1]:
            return U[:, :k] * s[:k], Vh[:k]
        return U[:, :k], s[:k, None] * Vh[:k]

    def delta(self, module: str) -> torch.Tensor:
        B, A = self.factors(module)
        return B @ A  # (out, k) @ (k, in)


class Adopted:
    """A recipe whose delta, in the modules of `own`, is the artifact's own (out, in) delta: where the definition
    leaves entries open (ambiguous selections) and the weight-space check has bounded them, the forward compares
    the rest of the model with the reference and takes the artifact's choice there."""

    def __init__(self, recipe: Any, own: dict[str, torch.Tensor]):
        self.recipe, self.own, self.modules = recipe, own, recipe.modules

    def delta(self, module: str) -> torch.Tensor:
        return self.own[module] if module in self.own else self.recipe.delta(module)
