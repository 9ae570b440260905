"""verify's own recomputation of a `polytool merge` recipe: every method, written plainly from its definition.

The recipe (an artifact's `polytool.recipe` metadata) is untrusted: each source it names is re-read and its
weights file hashed against the recorded sha256 (a missing or changed source is an input error naming it).
Per module, source i gives factors B_i (out, r) and A_i (r, in) with its scale folded in, read here (Poly:
reference.py's own routing and mixing; LoRA: safetensors and the config's alpha / r, rsLoRA and patterns).

    linear           D = sum_i w_i B_i A_i                          (float64, exact)
    magnitude_prune  D = sum_i w_i P_i,   P_i = D_i with all but its int(density * numel) largest |entries| zeroed
    dare_linear      D = sum_i w_i P_i,   P_i = D_i * m_i / density, m_i = uniform32 < density   (the generator below)
    ties, dare_ties  P_i as above; per entry the elected sign e = sign(sum_i v_i) ("total") or sign(sum_i
                     sign v_i) ("frequency"), + where >= 0, v_i = P_i (peft) or w_i P_i (mergekit);
                     D = sum_{i: sign v_i = e} w_i P_i / (#agreeing (peft) | sum of agreeing w_i (mergekit); 0 -> 1)

The pruned methods are defined on the sources' float32 deltas D_i = fl32(B_i) @ fl32(A_i), as PEFT's
get_delta_weight computes them (the product does the same): the selection (which entries survive the trim,
which sign wins) is made on those values here too, and everything after it is float64. Where float rounding
could change a selection (an entry within rounding of the trim threshold, a vote within rounding of zero, a
voter within rounding of zero) the entry is *ambiguous*: the definition allows either choice, so the weight
check allows either value there (`allowance`), and the report counts such entries. Everywhere else the
artifact must equal this recomputation up to the float32 arithmetic of the definition (`allowance` again).

DARE's masks are drawn bit for bit as `polytool merge` documents them (docs/merge.md): numpy's default_rng
(PCG64) seeded with [seed, source index, the first 8 bytes of sha256(module name) read little-endian], one
float32 uniform per entry in row-major (out, in) order, kept where it is < density. Written here from that
description, not imported: a product that draws other masks (another seed, another order) fails.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import PolytoolError
from .reference import PREFIX, ReferenceAdapter, _check_layer, _device, _layer, routing_spec

U32 = 2.0 ** -24  # float32's unit roundoff
METHODS = ("linear", "magnitude_prune", "dare_linear", "ties", "dare_ties")


def dare_keep(shape: tuple[int, int], density: float, seed: int, source: int, module: str) -> np.ndarray:
    """DARE's mask (out, in) of source `source` in `module`: True where the entry is kept."""
    if density >= 1:
        return np.ones(shape, dtype=bool)
    word = int.from_bytes(hashlib.sha256(module.encode("utf-8")).digest()[:8], "little")
    uniforms = np.random.default_rng([seed, source, word]).random(shape, dtype=np.float32)  # (out, in)
    return uniforms < np.float32(density)


def top_k(D: np.ndarray, noise: np.ndarray, density: float) -> tuple[np.ndarray, np.ndarray]:
    """(keep, ambiguous), both (out, in): the int(density * numel) largest |D| (ties broken by position), and
    the entries whose membership rounding could change: |D| within noise of the k-th largest magnitude."""
    if density >= 1:
        return np.ones(D.shape, dtype=bool), np.zeros(D.shape, dtype=bool)
    k = int(density * D.size)
    keep = np.zeros(D.size, dtype=bool)
    if k == 0:
        return keep.reshape(D.shape), keep.reshape(D.shape)
    mag = np.abs(D).ravel()  # (numel,)
    order = np.argsort(-mag, kind="stable")  # largest first
    keep[order[:k]] = True
    threshold = mag[order[k - 1]]
    # the k-th largest of values each known to within its noise moves by at most the largest noise among the
    # entries that could reach it (|mag - threshold| <= own noise + max noise): any other entry stays on its side
    noise = noise.ravel()
    near = np.abs(mag - threshold) <= noise + noise.max()
    ambiguous = np.abs(mag - threshold) <= noise + noise[near].max()
    if ambiguous.sum() <= 1 and (mag == threshold).sum() == 1:
        ambiguous[:] = False  # only the threshold entry itself: nothing it could swap with
    return keep.reshape(D.shape), ambiguous.reshape(D.shape)


class Pruned:
    """One module of a pruned merge: the merged delta (out, in) float64, and per entry the allowance, the
    absolute error the definition's float32 arithmetic and its ambiguous choices permit."""

    def __init__(self, deltas: list[np.ndarray], noise: list[np.ndarray], weights: list[float], recipe: dict,
                 module: str):
        method, density = recipe["method"], recipe.get("density") or 1.0
        dare = method.startswith("dare")
        pruned, loose, unsure = [], [], np.zeros(deltas[0].shape, dtype=bool)
        reach = sum(abs(w) * (np.abs(D) + e) for w, D, e in zip(weights, deltas, noise)) / density  # any choice's
        for i, (D, e) in enumerate(zip(deltas, noise)):
            if dare:
                keep = dare_keep(D.shape, density, int(recipe.get("seed") or 0), i, module)
                P, bound = np.where(keep, D / density, 0.0), e / density  # float64: D32 / density
            else:
                keep, ambiguous = top_k(D, e, density)
                P, bound = np.where(keep, D, 0.0), e
                unsure |= ambiguous
            pruned.append(P)
            # the noise of a kept entry, and of the product's float32 rescale; a dropped entry is exactly 0
            loose.append(np.where(P != 0, bound + np.abs(P) * U32, 0.0))
        divisor, mergekit = 1.0, recipe.get("ties_variant") == "mergekit"
        if method in ("ties", "dare_ties"):
            self.delta, unsure_vote, divisor = _ties(pruned, loose, weights, recipe)
            unsure |= unsure_vote
        else:
            self.delta = sum(w * P for w, P in zip(weights, pruned))  # (out, in) float64
        n, weight_sum = len(deltas), sum(abs(w) for w in weights)
        scale = sum(abs(w) * (np.abs(P) + b) for w, P, b in zip(weights, pruned, loose))  # sum_i |w_i| |P_i|
        # the numerator's float32 error over the divisor; mergekit's divisor (a float32 sum of weights) has its own
        self.allowance = 4 * (sum(abs(w) * b for w, b in zip(weights, loose)) + n * U32 * scale) / divisor
        if mergekit:
            self.allowance += 4 * n * U32 * weight_sum * np.abs(self.delta) / divisor
        self.ambiguous = int(unsure.sum())
        # either choice's value, kept or dropped (mergekit: over the smallest divisor a single weight can make)
        smallest = min([1.0] + [abs(w) for w in weights if w]) if mergekit else 1.0
        self.allowance[unsure] += 2 * reach[unsure] / smallest


def _ties(P: list[np.ndarray], loose: list[np.ndarray], weights: list[float], recipe: dict):
    """TIES' disjoint merge of the pruned deltas P_i (out, in): (merged delta, entries whose vote is ambiguous,
    the magnitude of each entry's divisor)."""
    mergekit = recipe.get("ties_variant") == "mergekit"
    total_vote = (recipe.get("majority_sign") or "total") == "total"
    voters = [w * p if mergekit else p for w, p in zip(weights, P)]
    voter_noise = [abs(w) * b if mergekit else b for w, b in zip(weights, loose)]
    unsure_voter = [np.abs(v) <= b for v, b in zip(voters, voter_noise)]  # its sign may differ in the product
    if total_vote:
        vote = sum(voters)  # (out, in): exact for a few float32 values in float64
        # the product sums in float32: within n u sum |v_i| of this, beside each voter's own noise
        bound = sum(voter_noise) + len(P) * U32 * sum(np.abs(v) for v in voters)
    else:
        vote = sum(np.sign(v) for v in voters)
        bound = 2 * sum((u & (v != 0)).astype(np.float64) for u, v in zip(unsure_voter, voters))  # each may flip
    unsure = (bound > 0) & (np.abs(vote) <= bound)  # where every voter is exactly 0 nothing can change
    sign = np.where(vote >= 0, 1.0, -1.0)  # the elected sign: + where the vote is >= 0
    total, divisor = np.zeros(vote.shape), np.zeros(vote.shape)
    for w, p, v, u in zip(weights, P, voters, unsure_voter):
        agree = v * sign > 0  # zeros never agree
        unsure |= u & (p != 0)  # a voter near zero: whether it agrees is rounding's choice
        total += np.where(agree, w * p, 0.0)
        divisor += np.where(agree, w if mergekit else 1.0, 0.0)
    divisor = np.where(divisor == 0, 1.0, divisor) if mergekit else np.maximum(divisor, 1.0)  # 0 -> 1
    return total / divisor, unsure, np.abs(divisor)


class ReferenceRecipe:
    """The exact update of a merge recipe, per module (out, in) float64, from the sources it names (their
    sha256 checked); for the pruned methods also the allowance per entry and the ambiguous count."""

    def __init__(self, recipe: dict):
        method = recipe.get("method")
        if method not in METHODS:
            raise PolytoolError(f"the merge recipe's method {method!r} is not one verify recomputes "
                                f"({', '.join(METHODS)})")
        _check_fields(recipe)
        self.recipe, self.method = recipe, method
        self.weights = [float(w) for w in recipe["weights"]]
        self.sources = [self._open(s) for s in recipe["sources"]]
        self.modules = list(dict.fromkeys(m for kind, src, _ in self.sources for m in
                                          (src.modules if kind == "poly" else src)))
        self._pruned: dict[str, Pruned] = {}

    @staticmethod
    def _open(source: dict):
        path = Path(source["path"])
        weights = path / "adapter_model.safetensors"
        digest = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None
        if digest != source.get("sha256"):
            raise PolytoolError(f"the merge recipe's source {source.get('source')!r} is not at {path} as it was "
                                "(missing, or its weights file changed since the merge)")
        if source.get("kind") == "poly":
            adapter = ReferenceAdapter(path)
            return "poly", adapter, routing_spec(source["task"], adapter.n_tasks)
        return "lora", _read_lora_factors(path), None

    def factors(self, module: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per source, B (out, r) and A (r, in) float64 with its scale folded in: its delta is B @ A."""
        pairs = []
        for kind, src, task in self.sources:
            if kind == "poly":
                A, B = src.factors(module, task)  # (in, r), (r, out)
                pairs.append((B.T / src.r, A.T))  # the update x @ A @ B / r
            else:
                pairs.append(src[module])
        return pairs

    def pruned(self, module: str) -> Pruned:
        if module not in self._pruned:
            self._pruned.clear()  # one module at a time: the weight check and the forward go module by module
            deltas, noise = [], []
            for B, A in self.factors(module):
                b, a = B.numpy().astype(np.float32), A.numpy().astype(np.float32)
                deltas.append((b @ a).astype(np.float64))  # (out, r) @ (r, in) in float32, as get_delta_weight
                # how far another float32 evaluation may be: the factors' rounding and the r-term sum
                noise.append((a.shape[0] + 2) * U32 * (np.abs(B.numpy()) @ np.abs(A.numpy())))
            self._pruned[module] = Pruned(deltas, noise, self.weights, self.recipe, module)
        return self._pruned[module]

    def delta(self, module: str) -> torch.Tensor:
        """(out, in) float64: the merged update of this module."""
        if self.method == "linear":
            return sum(w * (B @ A) for w, (B, A) in zip(self.weights, self.factors(module)))  # (out, r) @ (r, in)
        return torch.from_numpy(self.pruned(module).delta)

    def allowance(self, module: str) -> torch.Tensor | None:
        """(out, in) float64 absolute error the definition allows per entry (None: exact, linear)."""
        return None if self.method == "linear" else torch.from_numpy(self.pruned(module).allowance)

    def ambiguous(self, module: str) -> int:
        return 0 if self.method == "linear" else self.pruned(module).ambiguous


def _check_fields(recipe: dict) -> None:
    """The method's fields as `polytool merge` records them: the recipe is untrusted input."""
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    rules = {"density": (lambda x: recipe["method"] == "linear" and x is None or number(x) and 0 < x <= 1,
                         "a share in (0, 1]"),
             "seed": (lambda x: x is None or isinstance(x, int) and not isinstance(x, bool) and x >= 0,
                      "an integer >= 0"),
             "majority_sign": (lambda x: x in (None, "total", "frequency"), "total or frequency"),
             "ties_variant": (lambda x: x in (None, "peft", "mergekit"), "peft or mergekit"),
             "rank": (lambda x: x is None or isinstance(x, int) and not isinstance(x, bool) and x >= 1,
                      "an integer >= 1"),
             "energy": (lambda x: x is None or number(x) and 0 < x <= 1, "a share in (0, 1]")}
    for key, (ok, expected) in rules.items():
        if not ok(recipe.get(key)):
            raise PolytoolError(f"the merge recipe's {key} {recipe.get(key)!r} is not {expected}")


def _read_lora_factors(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A plain PEFT LoRA read on its own: {module: (B * scale (out, r), A (r, in))} in float64."""
    from safetensors.torch import load_file

    config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    tensors = load_file(str(path / "adapter_model.safetensors"))
    factors = {}
    for key, A in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(PREFIX):-len(".lora_A.weight")]
        B = tensors[key.replace(".lora_A.weight", ".lora_B.weight")]

        def pattern(table: dict, default):
            return next((v for k, v in (table or {}).items() if re.match(rf"(.*\.)?({k})$", module)), default)

        r = pattern(config.get("rank_pattern"), config.get("r", 8))
        alpha = pattern(config.get("alpha_pattern"), config["lora_alpha"])
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        factors[module] = (B.double() * scale, A.double())  # (out, r), (r, in)
    return factors


@contextmanager
def merged(model: torch.nn.Module, recipe) -> Iterator[torch.nn.Module]:
    """Inside the block `model` computes the base plus `recipe.delta(module)` for each of `recipe.modules`."""
    handles = []
    try:
        for module in recipe.modules:
            layer = _layer(model, module, "the merge")
            D = recipe.delta(module)  # (out, in)
            _check_layer(module, layer, D.shape[1], D.shape[0])
            D = D.to(_device(layer))

            def hook(_layer, args, out, D=D):
                x = args[0].to(D.device).double()  # (..., in)
                return (out.double() + (x @ D.T).to(out.device)).to(out.dtype)  # (..., in) @ (in, out)

            handles.append(layer.register_forward_hook(hook))
        yield model
    finally:
        for handle in handles:
            handle.remove()
