"""`polytool merge`: several sources -> one LoRA or one dense model, without loading a model (torch-free).

`merge(options)` opens and validates the sources (sources.py) and the recipe (recipe.py), writes the output
(write.py) and returns what was written as a JSON-ready dict (keys: docs/merge.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..collapse.dense import DenseOptions
from ..core.units import parse_size
from ..errors import PolytoolError
from ..formats.base import resolve_base_dir
from ..formats.safetensors import OUTPUT_DTYPES
from .recipe import check_hashes, open_merge
from .recipe_file import read_recipe, recipe_yaml
from .write import write_dense_merge, write_lora_merge


@dataclass(frozen=True)
class MergeOptions:
    """Everything `polytool merge` takes (the CLI's options, one field each)."""

    sources: tuple[str, ...]
    out: Path
    kind: str = "lora"  # lora or dense
    weights: list[float] | None = None
    method: str = "linear"
    density: float | None = None
    majority_sign: str | None = None
    ties_variant: str | None = None
    seed: int | None = None
    rank: int | None = None
    energy: float | None = None
    base_dir: Path | None = None
    dtype: str = "auto"  # a key of OUTPUT_DTYPES
    max_shard_size: str | None = None
    untie: bool = False
    force: bool = False
    sha256: tuple[str | None, ...] | None = None  # per source, from a recipe file: checked when given


def with_recipe(o: MergeOptions, path: str | Path, given: set[str]) -> MergeOptions:
    """`o` with a recipe file's sources and options, except those in `given` (set on the command line: they win)."""
    from dataclasses import replace

    return replace(o, **{k: v for k, v in read_recipe(path).items() if k not in given})


def merge(o: MergeOptions, warn: Callable[[str], None] = lambda _: None, progress=None) -> dict:
    """Write the merge `o` asks for; returns the result shown by the CLI."""
    plan = open_merge(o.sources, o.weights, o.method, o.density, o.majority_sign, o.seed, o.ties_variant)
    check_hashes(plan, o.sha256)
    if o.kind not in ("lora", "dense") or o.dtype not in OUTPUT_DTYPES:  # a recipe file's to: or dtype:
        raise PolytoolError(f"to {o.kind!r}, dtype {o.dtype!r}: expected to lora or dense, dtype one of "
                            f"{', '.join(OUTPUT_DTYPES)}")
    if o.kind == "lora":
        if o.max_shard_size or o.untie:
            raise PolytoolError("--max-shard-size and --untie apply to --to dense only")
        data = write_lora_merge(plan, o.out, o.rank, o.energy, OUTPUT_DTYPES[o.dtype] or "F32", o.force,
                                recipe_yaml(plan, o, None))
        data.update(dtype=o.dtype if o.dtype != "auto" else "float32")
    else:
        if o.rank is not None or o.energy is not None:
            raise PolytoolError("--rank and --energy apply to a LoRA output: a dense merge adds the exact delta")
        size = None if o.max_shard_size is None else parse_size(o.max_shard_size)
        first = plan.sources[0].config
        base = resolve_base_dir(o.base_dir, first.get("base_model_name_or_path"), first.get("revision"))
        dense = DenseOptions(OUTPUT_DTYPES[o.dtype], o.untie, size, o.force)
        data = write_dense_merge(plan, base, o.out, dense, progress, recipe_yaml(plan, o, base))
    for message in plan.warnings:
        warn(message)
    return {"out": str(o.out), "kind": o.kind, "method": o.method, "sources": [s.record() for s in plan.sources],
            "weights": plan.weights, "modules": len(plan.modules), **data}
