"""Merge methods: how the per-module deltas of several sources combine into one (numpy; no files, no models).

Each method is one function registered by name; `polytool merge` looks it up in METHODS, and a new method is
a new function and a `@register(...)` line (docs/architecture.md). A method gets every source's delta D_i
(out, in) of one module in float32, as PEFT's get_delta_weight computes it (its own copies: it may prune in
place), the weights w_i, the recipe's Options, and the module's name (DARE's seeded masks), and returns the
merged delta (out, in) in float64. The definitions are PEFT's merge_utils (docs/merge.md has the math):

    linear           D = sum_i w_i D_i            (merge/recipe.py keeps it factored: exact, rank sum r_i)
    magnitude_prune  D = sum_i w_i P_i,   P_i = D_i with all but its int(density * numel) largest |entries| zeroed
    dare_linear      D = sum_i w_i P_i,   P_i = D_i * Bernoulli(density) / density   (seeded)
    ties             P_i magnitude-pruned; per entry the elected sign e = sign(sum_i P_i) ("total") or
                     sign(sum_i sign P_i) ("frequency"), + where >= 0; D = sum_i w_i P_i [sign P_i = e]
                     / max(1, #{i: sign P_i = e})
    dare_ties        the same with DARE's P_i

`ties_variant="mergekit"` elects the sign on the weighted w_i P_i and divides by the sum of the agreeing
weights instead of their count (mergekit's TIES with normalize: true).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Options:
    """A recipe's parameters beside the weights."""

    density: float | None = None  # the share of each delta kept (pruning methods)
    majority_sign: str = "total"  # "total" or "frequency" (sign-electing methods)
    seed: int = 0  # DARE's masks
    ties_variant: str = "peft"  # "peft" or "mergekit" (sign-electing methods)


Combine = Callable[[list[np.ndarray], list[float], Options, str], np.ndarray]


@dataclass(frozen=True)
class Method:
    name: str
    combine: Combine
    density: bool = False  # takes --density
    sign: bool = False  # elects a sign: --majority-sign, --ties-variant; default weights 1 (a disjoint mean)
    seed: bool = False  # random: --seed


METHODS: dict[str, Method] = {}


def register(name: str, *, density: bool = False, sign: bool = False, seed: bool = False) -> Callable[[Combine], Combine]:
    """Register `combine` as merge method `name` (what it takes decides which options apply to it)."""
    def add(combine: Combine) -> Combine:
        METHODS[name] = Method(name, combine, density, sign, seed)
        return combine
    return add


def magnitude_prune(D: np.ndarray, density: float) -> np.ndarray:
    """Keep the int(density * numel) largest |entries| of D (torch.topk's choice up to exact ties), zero the rest."""
    if density >= 1:
        return D
    k = int(density * D.size)
    if k == 0:
        return np.zeros_like(D)
    mag = np.abs(D).ravel()  # (numel,)
    threshold = np.partition(mag, D.size - k)[D.size - k]
    keep = mag >= threshold
    if keep.sum() > k:  # exact ties at the threshold: take exactly k, as topk does
        keep[:] = False
        keep[np.argpartition(np.abs(D).ravel(), D.size - k)[D.size - k :]] = True
    D[~keep.reshape(D.shape)] = 0  # in place: D is this merge's own copy
    return D


def dare_prune(D: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """Keep each entry with probability `density` and rescale the kept ones by 1 / density (DARE)."""
    if density >= 1:
        return D
    keep = rng.random(D.shape, dtype=np.float32) < density  # (out, in), P(keep) = density
    D /= D.dtype.type(density)  # in place: D is this merge's own copy
    D[~keep] = 0
    return D


def ties_combine(P: list[np.ndarray], weights: list[float], majority_sign: str, variant: str) -> np.ndarray:
    """Elect a sign per entry and average the agreeing weighted entries (PEFT: by count; mergekit: by weight).
    P: the pruned float32 deltas (out, in); float32 throughout, as PEFT computes it."""
    elect = np.zeros(P[0].shape, dtype=np.float32)  # (out, in): the vote, summed over sources
    for w, p in zip(weights, P):
        voter = p if variant == "peft" else p * np.float32(w)  # mergekit votes with the weighted deltas
        elect += voter if majority_sign == "total" else np.sign(voter)
    sign = np.where(elect >= 0, np.float32(1), np.float32(-1))  # the elected sign: + where the vote is >= 0
    total = np.zeros_like(elect)
    divisor = np.zeros_like(elect)
    for w, p in zip(weights, P):
        voter = p if variant == "peft" else p * np.float32(w)
        agree = voter * sign > 0  # the voter's sign is the elected one; zeros never agree
        total += np.where(agree, p, np.float32(0)) * np.float32(w)
        divisor += agree if variant == "peft" else agree * np.float32(w)
    if variant == "peft":
        return total / np.maximum(divisor, np.float32(1))
    divisor[divisor == 0] = 1
    return total / divisor


def seed_for(seed: int, source: int, module: str) -> np.random.Generator:
    """DARE's generator for one (source, module): the same masks whatever the module order."""
    tag = int.from_bytes(hashlib.sha256(module.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([seed, source, tag])


def weighted_sum(P: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """sum_i w_i P_i in float64 (each product in float32, as PEFT computes it)."""
    total = np.zeros(P[0].shape)  # (out, in), float64
    for w, p in zip(weights, P):
        total += p * np.float32(w)
    return total


@register("linear")
def linear(deltas: list[np.ndarray], weights: list[float], options: Options, module: str) -> np.ndarray:
    return weighted_sum(deltas, weights)


@register("ties", density=True, sign=True)
def ties(deltas: list[np.ndarray], weights: list[float], options: Options, module: str) -> np.ndarray:
    P = [magnitude_prune(D, options.density) for D in deltas]
    return ties_combine(P, weights, options.majority_sign, options.ties_variant).astype(np.float64)


@register("dare_linear", density=True, seed=True)
def dare_linear(deltas: list[np.ndarray], weights: list[float], options: Options, module: str) -> np.ndarray:
    P = [dare_prune(D, options.density, seed_for(options.seed, i, module)) for i, D in enumerate(deltas)]
    return weighted_sum(P, weights)


@register("dare_ties", density=True, sign=True, seed=True)
def dare_ties(deltas: list[np.ndarray], weights: list[float], options: Options, module: str) -> np.ndarray:
    P = [dare_prune(D, options.density, seed_for(options.seed, i, module)) for i, D in enumerate(deltas)]
    return ties_combine(P, weights, options.majority_sign, options.ties_variant).astype(np.float64)


@register("magnitude_prune", density=True)
def magnitude_prune_merge(deltas: list[np.ndarray], weights: list[float], options: Options, module: str) -> np.ndarray:
    return weighted_sum([magnitude_prune(D, options.density) for D in deltas], weights)
