"""Rank-reduced merges (`polytool merge --rank K` / `--energy E`): the artifact's error beside the optimum.

Per module, with D the exact merged delta recomputed by reference_merge.py (float64, (out, in)), s its
singular values (float64 SVD, verify's own) and D_art = B @ A * scaling the artifact's delta as PEFT loads it:

    error    = ||D_art - D||_F / ||D||_F
    optimum  = sqrt(sum_{i > k} s_i^2) / ||D||_F       Eckart-Young: no rank-k matrix is closer to D
    passes   where error <= optimum + slack,  slack = 4 sqrt(k) u(dtype) + 2 ||allowance||_F / ||D||_F

k is the artifact's rank for the module. The slack is float rounding only: the factors are stored in the
artifact's dtype (each rounded by u: the product of two rounded factors of a rank-k delta is within about
2 sqrt(k) u ||D|| of the exact one, doubled), and a pruned merge's own delta is defined in float32 (the
recomputation's per-entry allowance bounds how far the product's delta D' may be from D; the optimum for D'
and the distance to D each move by at most ||D' - D||). A rank that throws away more than the optimum, a
wrong singular subspace, or a truncation of another delta exceeds it. With --rank K the artifact's rank must
not exceed K; with --energy E its retained share of s^2 must reach E (within the slack).

The forward of a truncated merge is then compared with the best rank-k approximation of D (U_k S_k V_k.T,
`BestRank`), which a truncation that is optimal equals up to rounding: it proves the LoRA, as loaded, computes
the optimum. Where s_k and s_{k+1} coincide within the slack the best rank-k is not unique, and the module is
flagged `degenerate` (its forward may then differ from this choice of the optimum).
"""
from __future__ import annotations

import math
from typing import Any

import torch

UNIT = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


def check_truncation(lora: Any, recipe: Any, dtype: str) -> dict:
    """{"modules": [{module, rank, error, optimum, excess, energy, degenerate}], "slack_max", "first_bad",
    "worst_excess"} of a truncated merge LoRA (`lora`: the artifact read, its factors and scalings)."""
    u = UNIT.get(dtype, UNIT["float32"])
    asked_rank, asked_energy = recipe.recipe.get("rank"), recipe.recipe.get("energy")
    rows, first_bad, worst = [], None, -math.inf
    for name in recipe.modules:
        A, B = lora.weights[name]  # (k, in), (out, k)
        k = A.shape[0]
        got = (torch.from_numpy(B).double() @ torch.from_numpy(A).double()) * lora.scalings[name]  # (out, k) @ (k, in)
        D = recipe.delta(name)  # (out, in) float64
        s = torch.linalg.svdvals(D)  # descending
        norm = float(s.norm())
        allowance = recipe.allowance(name)
        slack = 4 * math.sqrt(k) * u + (0.0 if allowance is None or norm == 0 else 2 * float(allowance.norm()) / norm)
        error = float((got - D).norm()) / norm if norm > 0 else (0.0 if float(got.norm()) == 0 else math.inf)
        optimum = float(s[k:].norm()) / norm if norm > 0 else 0.0
        energy = float(s[:k].square().sum()) / norm ** 2 if norm > 0 else 1.0
        degenerate = k < len(s) and float(s[k - 1] - s[k]) <= slack * norm
        bad = not error <= optimum + slack  # NaN-proof
        if asked_rank is not None and k > asked_rank:
            bad = True
        if asked_energy is not None and not energy >= asked_energy - slack:
            bad = True
        if bad and first_bad is None:
            first_bad = name
        worst = max(worst, error - optimum)
        rows.append({"module": name, "rank": k, "error": error, "optimum": optimum, "excess": error - optimum,
                     "slack": slack, "energy": energy, "degenerate": degenerate, "passed": not bad})
    return {"modules": rows, "first_bad": first_bad, "worst_excess": worst if rows else 0.0,
            "asked": {"rank": asked_rank, "energy": asked_energy}}


class BestRank:
    """The best rank-k approximation of each module's exact delta (k per module: the artifact's ranks), as a
    recipe-like object (`modules`, `delta`) for the forward reference of a truncated merge."""

    def __init__(self, recipe: Any, ranks: dict[str, int]):
        self.recipe, self.ranks, self.modules = recipe, ranks, recipe.modules

    def delta(self, module: str) -> torch.Tensor:
        D = self.recipe.delta(module)  # (out, in) float64
        k = self.ranks[module]
        U, s, Vh = torch.linalg.svd(D, full_matrices=False)  # (out, p), (p,), (p, in)
        return (U[:, :k] * s[:k]) @ Vh[:k]  # (out, k) @ (k, in)
