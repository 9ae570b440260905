"""`polytool merge`: several sources -> one LoRA or one dense model, without loading a model (numpy only).

A source is a Poly/MHR adapter with a task spec, `DIR:TASK` (collapsed through the one collapse formula),
or a plain PEFT LoRA directory (lora.read_lora: rank_pattern, alpha_pattern and rslora resolved). Per
module, source i is a delta D_i = B_i @ A_i * scale_i (out, in). The methods combine deltas, never A and
B separately, with the definitions of PEFT's merge_utils (so the results equal add_weighted_adapter's
`*_svd` types before their SVD); w_i are the weights:

    linear           D = sum_i w_i D_i                    (a LoRA of rank sum r_i: the factors side by side)
    magnitude_prune  D = sum_i w_i P_i,   P_i = D_i with all but its int(density * numel) largest |entries| zeroed
    dare_linear      D = sum_i w_i P_i,   P_i = D_i * Bernoulli(density) / density   (seeded)
    ties             P_i magnitude-pruned; per entry the elected sign e = sign(sum_i P_i) ("total") or
                     sign(sum_i sign P_i) ("frequency"), + where >= 0; D = sum_i w_i P_i [sign P_i = e]
                     / max(1, #{i: sign P_i = e})
    dare_ties        the same with DARE's P_i

`ties_variant="mergekit"` elects the sign on the weighted w_i P_i and divides by the sum of the agreeing
weights instead of their count (mergekit's TIES with normalize: true). docs/merge.md has the math.
Memory: one module's deltas at a time.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from . import __version__
from .checkpoint import parse_json
from .errors import AdapterError, PolytoolError
from .lowrank import Truncation, check_rank_options, truncate_dense, truncate_factored

METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PRUNED = METHODS[1:]  # the methods that take a density
TIES = ("ties", "dare_ties")
DARE = ("dare_linear", "dare_ties")
RECIPE_KEY = "polytool.recipe"


@dataclass(frozen=True)
class Module:
    """One adapted module, as match_targets wants it."""

    name: str
    in_features: int
    out_features: int


@dataclass
class Source:
    """One source: per module, factors B (out, r) and A (r, in), float64, with D = B @ A (scale folded in)."""

    text: str  # as given
    kind: str  # "poly" or "lora"
    directory: Path
    sha256: str
    task: str | None  # a Poly source's task spec, canonical
    modules: dict[str, tuple[int, int]]  # name -> (in, out)
    config: dict
    factors: Callable[[str], tuple[np.ndarray, np.ndarray]] = field(repr=False)

    def record(self) -> dict:
        """The recipe's record of this source: `path` is absolute, so `from_recipe` finds it from anywhere."""
        return {"source": self.text, "kind": self.kind, "path": str(Path(self.directory).resolve()),
                "sha256": self.sha256, "task": self.task}


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _peft_type(directory: Path) -> str | None:
    try:
        config = parse_json((directory / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # the readers below say what is wrong
    return config.get("peft_type") if isinstance(config, dict) else None


def _open_poly(directory: Path, cache: dict) -> tuple:
    """(adapter, module -> (poly_A, poly_B)): one adapter read once however many of its tasks are sources,
    and the last module's skills kept, since sources are combined module by module."""
    from .adapter import load_adapter
    from .export import check_collapsible

    key = directory.resolve()
    if key not in cache:
        adapter = load_adapter(directory)
        check_collapsible(adapter)
        last: dict = {}

        def skills(name: str) -> tuple[np.ndarray, np.ndarray]:
            if name not in last:
                last.clear()
                last[name] = (adapter.poly_A(name), adapter.poly_B(name))  # (q, s, in/q, r), (q, s, r, out/q)
            return last[name]

        cache[key] = (adapter, skills)
    return cache[key]


def _poly_source(text: str, directory: Path, task: str, cache: dict) -> Source:
    from .collapse import collapse_factors
    from .routing import parse_task_spec, spec_label

    adapter, skills = _open_poly(directory, cache)
    spec = parse_task_spec(task, adapter.n_tasks)

    def factors(name: str) -> tuple[np.ndarray, np.ndarray]:
        A, B = collapse_factors(*skills(name), adapter.spec_weights(name, spec))  # (in, r), (r, out)
        return B.T / adapter.r, A.T  # (out, r), (r, in): the update x @ A @ B / r

    label = str(spec) if isinstance(spec, int) else spec_label(spec)
    return Source(text, "poly", adapter.directory, adapter.sha256, label,
                  {m.name: (m.in_features, m.out_features) for m in adapter.modules}, adapter.config, factors)


def _lora_source(text: str, directory: Path) -> Source:
    from .lora import WEIGHTS_NAME, read_lora

    if _peft_type(directory) == "POLY":
        raise AdapterError("is a Poly/MHR adapter: name a task, e.g. DIR:0 or DIR:1:0.7,3:0.3", directory)
    lora = read_lora(directory)
    if lora.biases or lora.saved:
        raise AdapterError("carries lora_bias or modules_to_save tensors: a merge combines the LoRA deltas only", directory)

    def factors(name: str) -> tuple[np.ndarray, np.ndarray]:
        A, B = lora.weights[name]  # (r, in), (out, r)
        return B.astype(np.float64) * lora.scalings[name], A.astype(np.float64)

    modules = {m: (A.shape[1], B.shape[0]) for m, (A, B) in lora.weights.items()}
    return Source(text, "lora", directory, _sha256(directory / WEIGHTS_NAME), None, modules, lora.config, factors)


def parse_source(text: str, cache: dict | None = None) -> Source:
    """'DIR' (a LoRA directory) or 'DIR:TASK' (a Poly/MHR adapter and a task spec) -> Source.
    DIR is the longest prefix before a ':' that is a directory, so paths may hold ':' too."""
    if Path(text).is_dir():
        return _lora_source(text, Path(text))
    cuts = [i for i, c in enumerate(text) if c == ":"]
    for cut in reversed(cuts):
        if Path(text[:cut]).is_dir():
            return _poly_source(text, Path(text[:cut]), text[cut + 1 :], {} if cache is None else cache)
    raise PolytoolError(f"source {text!r}: no such directory (a source is a LoRA directory, "
                        "or a Poly/MHR adapter directory and a task, ADAPTER_DIR:TASK)")


# ---- combining deltas ---------------------------------------------------------------------------


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


def _seed_for(seed: int, source: int, module: str) -> np.random.Generator:
    """DARE's generator for one (source, module): the same masks whatever the module order."""
    tag = int.from_bytes(hashlib.sha256(module.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([seed, source, tag])


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
        if self.method == "linear":
            B, A = self.linear_factors(module)
            return B @ A  # (out, R) @ (R, in)
        P, total = [], None
        for i, (w, s) in enumerate(zip(self.weights, self.sources)):
            b, a = s.factors(module)
            D = b.astype(np.float32) @ a.astype(np.float32)  # (out, r) @ (r, in), float32 as PEFT's get_delta_weight
            if self.method in DARE:
                D = dare_prune(D, self.density, _seed_for(self.seed, i, module))
            else:
                D = magnitude_prune(D, self.density)
            if self.method in TIES:
                P.append(D)  # the vote needs every source's pruned delta
            else:
                total = np.zeros(D.shape) if total is None else total  # (out, in), float64
                total += D * np.float32(w)
        if P:
            return ties_combine(P, self.weights, self.majority_sign, self.ties_variant).astype(np.float64)
        return total

    def recipe(self, **output) -> dict:
        return {"sources": [s.record() for s in self.sources], "weights": self.weights, "method": self.method,
                "density": self.density, "majority_sign": self.majority_sign if self.method in TIES else None,
                "seed": self.seed if self.method in DARE else None,
                "ties_variant": self.ties_variant if self.method in TIES else None, **output}


def default_weights(method: str, n: int) -> list[float]:
    """Equal weights that make the result an average: 1/n, or 1 for TIES (its disjoint mean already divides)."""
    return [1.0] * n if method in TIES else [1.0 / n] * n


def _check_options(method: str, n: int, weights: list[float] | None, density: float | None,
                   majority_sign: str | None, seed: int | None, ties_variant: str | None) -> None:
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
    for s, record in zip(merge.sources, r["sources"]):
        if s.sha256 != record["sha256"]:
            raise PolytoolError(f"source {s.text!r} changed since the merge (sha256 {s.sha256[:12]}, recorded "
                                f"{record['sha256'][:12]})")
    return merge


# ---- outputs ------------------------------------------------------------------------------------


def _lora_config(merge: Merge) -> dict:
    """adapter_config.json of the merged LoRA (r, lora_alpha, rank_pattern are set by write_factors)."""
    first = lambda key: next((s.config.get(key) for s in merge.sources if s.config.get(key) is not None), None)
    return {"peft_type": "LORA", "task_type": first("task_type"), "base_model_name_or_path": first("base_model_name_or_path"),
            "revision": first("revision"), "lora_dropout": 0.0, "use_rslora": False, "use_dora": False, "bias": "none",
            "fan_in_fan_out": any(bool(s.config.get("fan_in_fan_out")) for s in merge.sources if s.kind == "lora"),
            "target_modules": sorted(m.name for m in merge.modules), "exclude_modules": None, "modules_to_save": None,
            "inference_mode": True}


def _metadata(merge: Merge, **output) -> dict[str, str]:
    return {"format": "pt", "polytool.version": __version__,
            RECIPE_KEY: json.dumps(merge.recipe(**output), separators=(",", ":"))}


def _inputs(merge: Merge) -> list[Path]:
    return [s.directory for s in merge.sources]


def write_lora_merge(merge: Merge, out: Path, rank: int | None = None, energy: float | None = None,
                     dtype: str = "F32", force: bool = False) -> dict:
    """The merged delta as a LoRA at `out`: exact for linear without rank control (the factors side by side),
    else per module the best rank-`rank` (or `energy`) approximation, its error reported."""
    from .outdir import atomic_output_dir, check_output
    from .export import LORA_DTYPES, TRUNCATION_KEY, lora_pair, truncation_record, truncation_report, write_factors

    if dtype not in LORA_DTYPES:
        raise PolytoolError(f"LoRA dtype {dtype!r} is not allowed: {', '.join(LORA_DTYPES)}")
    check_rank_options(rank, energy)
    truncate = rank is not None or energy is not None
    if merge.method != "linear" and not truncate:
        raise PolytoolError(f"--method {merge.method} gives a full-rank delta: a LoRA output needs --rank K or "
                            "--energy E (or write --to dense)")
    check_output(out, force, inputs=_inputs(merge))
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    kept: dict[str, Truncation] = {}
    for m in merge.modules:  # one module's deltas at a time
        if merge.method == "linear" and not truncate:
            B, A = merge.linear_factors(m.name)  # (out, R), (R, in): exact
        elif merge.method == "linear":
            B, A, kept[m.name] = truncate_factored(*merge.linear_factors(m.name), rank, energy)  # D never formed
        else:
            B, A, kept[m.name] = truncate_dense(merge.delta(m.name), rank, energy)
        factors[m.name] = lora_pair(B, A, dtype)  # (k, in), (out, k), rounded once
    meta = _metadata(merge, to="lora", rank=rank, energy=energy)
    if truncate:
        meta[TRUNCATION_KEY] = truncation_record(rank, energy, kept)
    with atomic_output_dir(out, force) as tmp:
        config = write_factors(tmp, factors, dtype, meta, _lora_config(merge))
        (tmp / "README.md").write_text(_model_card(merge, config, truncate), encoding="utf-8", errors="backslashreplace")
        files = ["adapter_config.json", "adapter_model.safetensors", "README.md"]
        nbytes = sum((tmp / f).stat().st_size for f in files)
    data = {"files": files, "tensors": 2 * len(factors), "bytes": nbytes, "r": config["r"],
            "rank_pattern": config["rank_pattern"]}
    if truncate:
        data["truncation"] = truncation_report(kept)
    return data


def write_dense_merge(merge: Merge, base_dir: Path, out: Path, dtype: str | None = None, untie: bool = False,
                      max_shard_size: int | None = None, force: bool = False, progress=None) -> dict:
    """The merged delta added to the base's weights, streamed shard by shard (merge.py's streaming merge)."""
    from .basemodel import open_base
    from .outdir import check_output
    from .merge import dense_rows, factored_delta, plan_dense, write_planned

    base = open_base(base_dir)
    check_output(out, force, inputs=_inputs(merge) + [base.directory])
    plan = plan_dense(base, merge.modules, _metadata(merge, to="dense"), dtype, untie, max_shard_size)

    def deltas(module: str, wide: type):
        if merge.method == "linear":  # by blocks of rows from the factors: never formed whole
            B, A = merge.linear_factors(module)  # (out, R), (R, in)
            return factored_delta(A.T, B.T, 1.0, wide)  # x @ A.T @ B.T: (in, R), (R, out)
        return dense_rows(merge.delta(module), wide)  # (out, in), one module at a time

    return write_planned(plan, deltas, out, dtype, force, progress)


def _model_card(merge: Merge, config: dict, truncated: bool) -> str:
    base = config.get("base_model_name_or_path") or "BASE_MODEL"
    lines = [f"- `{s.text}` ({s.kind}, sha256 `{s.sha256}`), weight {w!r}" for s, w in zip(merge.sources, merge.weights)]
    how = ("Per module, the best low-rank approximation of the merged delta (truncated SVD); ranks and "
           "errors are in the safetensors metadata (`polytool.truncation`)." if truncated else
           "Exact: the sources' factors side by side, so this LoRA's delta is the weighted sum of theirs.")
    return f"""---
library_name: peft
base_model: {base}
tags: [lora, polytool, merge]
---
# LoRA merged by polytool {__version__}: {merge.method}

{how} The recipe (sources, weights, method, parameters) is in the safetensors metadata (`{RECIPE_KEY}`).

{chr(10).join(lines)}

```python
from peft import PeftModel
model = PeftModel.from_pretrained(base, "path/to/this/directory")  # base: {base}
```
"""
