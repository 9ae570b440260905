"""`polytool merge`'s recipe: sources, weights, a method and its options, validated; the exact merged delta.

A source is a Poly/MHR adapter with a task spec, `DIR:TASK`, or a plain PEFT LoRA directory (sources.py).
Per module, source i is a delta D_i = B_i @ A_i * scale_i (out, in); the method (core/merge_methods.py)
combines the deltas, never A and B separately. `Merge.delta(module)` is the merged delta; `from_recipe`
rebuilds a Merge from what an artifact recorded (its sources re-read and checked by sha256).
Memory: one module's deltas at a time.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from ..core.merge_methods import METHODS, Options
from ..errors import PolytoolError
from .sources import Module, Source, parse_source


# ---- the recipe ---------------------------------------------------------------------------------


@dataclass
class Merge:
    """Validated sources and a recipe; `delta(module)` is the exact merged delta."""

    sources: list[Source]
    weights: list[float]
    method: str
    density: float | None
    majority_sign: str
    seed: int
    ties_variant: str
    modules: list[Module]
    warnings: list[str]

    def linear_factors(self, module: str) -> tuple[np.ndarray, np.ndarray]:
        """linear: D = B @ A with B (out, sum r_i) the weighted B_i side by side, A (sum r_i, in) the A_i stacked."""
        pairs = [s.factors(module) for s in self.sources]
        B = np.concatenate([w * b for w, (b, _) in zip(self.weights, pairs)], axis=1)  # (out, R)
        A = np.concatenate([a for _, a in pairs], axis=0)  # (R, in)
        return B, A

    def delta(self, module: str) -> np.ndarray:
        """The exact merged delta of `module`, (out, in) float64 (what verify should compare against)."""
        if self.method == "linear":  # kept factored: exact in float64
            B, A = self.linear_factors(module)
            return B @ A  # (out, R) @ (R, in)
        deltas = [b.astype(np.float32) @ a.astype(np.float32)  # (out, r) @ (r, in), float32 as PEFT's get_delta_weight
                  for b, a in (s.factors(module) for s in self.sources)]
        return METHODS[self.method].combine(deltas, self.weights, self.options, module)

    @property
    def options(self) -> Options:
        return Options(self.density, self.majority_sign, self.seed, self.ties_variant)

    def recipe(self, **output) -> dict:
        method = METHODS[self.method]
        return {"sources": [s.record() for s in self.sources], "weights": self.weights, "method": self.method,
                "density": self.density, "majority_sign": self.majority_sign if method.sign else None,
                "seed": self.seed if method.seed else None,
                "ties_variant": self.ties_variant if method.sign else None, **output}


def default_weights(method: str, n: int) -> list[float]:
    """Equal weights that make the result an average: 1/n, or 1 for TIES (its disjoint mean already divides)."""
    return [1.0] * n if METHODS[method].sign else [1.0 / n] * n


def _check_options(method: str, n: int, weights: list[float] | None, density: float | None,
                   majority_sign: str | None, seed: int | None, ties_variant: str | None) -> None:
    PRUNED = [m.name for m in METHODS.values() if m.density]
    TIES = [m.name for m in METHODS.values() if m.sign]
    DARE = [m.name for m in METHODS.values() if m.seed]
    if method not in METHODS:
        raise PolytoolError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if weights is not None and (len(weights) != n or not all(math.isfinite(w) for w in weights)):
        raise PolytoolError(f"--weights: expected {n} finite numbers (one per source), got {len(weights)}")
    if method in PRUNED and density is None:
        raise PolytoolError(f"--method {method} needs --density D, the share of each delta kept, in (0, 1]")
    if density is not None and (method not in PRUNED or not 0 < density <= 1):
        raise PolytoolError(f"--density {density}: expected a share in (0, 1], with --method {', '.join(PRUNED)}")
    if majority_sign is not None and (method not in TIES or majority_sign not in ("total", "frequency")):
        raise PolytoolError(f"--majority-sign {majority_sign}: expected total or frequency, with --method ties or dare_ties")
    if ties_variant is not None and (method not in TIES or ties_variant not in ("peft", "mergekit")):
        raise PolytoolError(f"--ties-variant {ties_variant}: expected peft or mergekit, with --method ties or dare_ties")
    if seed is not None and method not in DARE:
        raise PolytoolError("--seed applies to --method dare_linear and dare_ties only")


def _check_modules(sources: list[Source]) -> list[Module]:
    """All sources adapt the same modules with the same shapes: one base."""
    first = sources[0]
    for s in sources[1:]:
        only = sorted(set(first.modules) ^ set(s.modules))
        if only:
            where = first.text if only[0] in first.modules else s.text
            raise PolytoolError(f"sources {first.text!r} and {s.text!r} adapt different modules ({only[0]!r} only in "
                                f"{where!r}): the sources must adapt the same modules of one base")
        for m, shape in s.modules.items():
            if shape != first.modules[m]:
                raise PolytoolError(f"module {m!r}: (in, out) {list(first.modules[m])} in {first.text!r} but "
                                    f"{list(shape)} in {s.text!r}: the sources are for different base models")
    return [Module(m, i, o) for m, (i, o) in first.modules.items()]


def _base_warnings(sources: list[Source]) -> list[str]:
    names = {s.config.get("base_model_name_or_path") for s in sources} - {None}
    if len(names) > 1:
        return [f"the sources name different base models ({', '.join(sorted(names))}); their modules and shapes "
                "agree, so they are merged: make sure they were trained on one base"]
    return []


def open_merge(sources: Iterable[str], weights: list[float] | None = None, method: str = "linear",
               density: float | None = None, majority_sign: str | None = None, seed: int | None = None,
               ties_variant: str | None = None) -> Merge:
    """Parse and validate the sources and options of a merge (nothing is written, no delta computed)."""
    texts = list(sources)
    if not texts:
        raise PolytoolError("merge needs at least one SOURCE")
    _check_options(method, len(texts), weights, density, majority_sign, seed, ties_variant)
    cache: dict = {}
    parsed = [parse_source(t, cache) for t in texts]
    modules = _check_modules(parsed)
    fan = {bool(s.config.get("fan_in_fan_out")) for s in parsed if s.kind == "lora"}
    if len(fan) > 1:
        raise PolytoolError("the LoRA sources disagree on fan_in_fan_out: they are for different base models")
    return Merge(parsed, list(weights) if weights is not None else default_weights(method, len(texts)), method,
                 density, majority_sign or "total", 0 if seed is None else seed, ties_variant or "peft", modules,
                 _base_warnings(parsed))


def from_recipe(recipe: str | dict) -> Merge:
    """The Merge an artifact's `polytool.recipe` metadata describes, its sources re-opened and checked by sha256."""
    r = json.loads(recipe) if isinstance(recipe, str) else recipe
    texts = [s["path"] if s["task"] is None else f"{s['path']}:{s['task']}" for s in r["sources"]]
    merge = open_merge(texts, r["weights"], r["method"], r["density"], r["majority_sign"], r["seed"], r["ties_variant"])
    check_hashes(merge, [s["sha256"] for s in r["sources"]])
    return merge


def check_hashes(merge: Merge, recorded: Iterable[str | None] | None) -> None:
    """Each source's sha256 is the one recorded (a recipe's; None: not checked), else it changed since."""
    for s, sha in zip(merge.sources, recorded or ()):
        if sha is not None and s.sha256 != sha:
            raise PolytoolError(f"source {s.text!r} changed since the merge (sha256 {s.sha256[:12]}, recorded "
                                f"{sha[:12]})")


# ---- outputs ------------------------------------------------------------------------------------


