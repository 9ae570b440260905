"""Merge recipes as YAML files: `polytool merge recipe.yml --out OUT` (as `mergekit-yaml`), and the recipe.yml
every merge output carries, which re-runs the merge that wrote it (sources by absolute path and sha256).

    sources:                        # DIR:TASK (a Poly/MHR task), DIR (a LoRA), a hub id; or mappings:
    - source: fixtures/mhr:1        #   source, and optionally weight and sha256 (checked when given)
      weight: 0.7
    - fixtures/mhr:3
    method: linear                  # and density, majority_sign, ties_variant, seed, as the options
    to: lora                        # or dense; then base, dtype, max_shard_size, untie; rank, energy for a LoRA

Relative paths are read from the current directory, as on the command line. Options given on the command
line win over the recipe's. Torch-free; PyYAML comes with huggingface_hub.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import PolytoolError

RECIPE_FILE = "recipe.yml"
# recipe key -> (MergeOptions field, the types it takes)
KEYS: dict[str, tuple[str, tuple[type, ...]]] = {
    "to": ("kind", (str,)), "base": ("base_dir", (str,)), "method": ("method", (str,)),
    "density": ("density", (int, float)), "majority_sign": ("majority_sign", (str,)),
    "ties_variant": ("ties_variant", (str,)), "seed": ("seed", (int,)), "rank": ("rank", (int,)),
    "energy": ("energy", (int, float)), "dtype": ("dtype", (str,)), "max_shard_size": ("max_shard_size", (str, int)),
    "untie": ("untie", (bool,)), "weights": ("weights", (list,)),
}
SOURCE_KEYS = {"source", "weight", "sha256", "kind"}
HEADER = ("# The `polytool merge` recipe that wrote this directory. Re-run it with:\n"
          "#   polytool merge recipe.yml --out OUT\n")


def is_recipe_file(sources: tuple[str, ...]) -> bool:
    return len(sources) == 1 and sources[0].endswith((".yml", ".yaml")) and Path(sources[0]).is_file()


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe file -> MergeOptions fields (sources, sha256, weights, method, ...); bad input raises naming it."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PolytoolError(f"cannot read the recipe ({exc.__class__.__name__}: {str(exc).splitlines()[0]})", path) from None
    if not isinstance(data, dict):
        raise PolytoolError("a recipe is a YAML mapping (sources:, method:, to:, ...)", path)
    unknown = sorted(map(str, set(data) - set(KEYS) - {"sources", "polytool_version"}))
    if unknown:
        raise PolytoolError(f"unknown recipe keys {', '.join(unknown)} (allowed: sources, {', '.join(KEYS)})", path)
    options: dict[str, Any] = {}
    for key, value in data.items():
        if key in KEYS and value is not None:
            field, types = KEYS[key]
            if isinstance(value, bool) != (bool in types) or not isinstance(value, types):
                raise PolytoolError(f"recipe key {key}: {value!r} is not a {' or '.join(t.__name__ for t in types)}", path)
            options[field] = Path(value) if field == "base_dir" else str(value) if key == "max_shard_size" else value
    options.update(_sources(data.get("sources"), "weights" in options, path))
    return options


def _sources(sources: Any, weights_given: bool, path: Path) -> dict[str, Any]:
    if not isinstance(sources, list) or not sources:
        raise PolytoolError("the recipe names no sources (sources: a list of DIR, DIR:TASK or mappings)", path)
    entries = [{"source": s} if isinstance(s, str) else s for s in sources]
    for s in entries:
        if not isinstance(s, dict) or not isinstance(s.get("source"), str) or set(s) - SOURCE_KEYS:
            raise PolytoolError(f"recipe source {s!r}: expected DIR, DIR:TASK or a mapping with source (and weight, "
                                "sha256)", path)
    weights = [s.get("weight") for s in entries]
    out: dict[str, Any] = {"sources": tuple(s["source"] for s in entries),
                           "sha256": tuple(s.get("sha256") for s in entries)}
    if any(w is not None for w in weights):
        if weights_given or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
            raise PolytoolError("give every recipe source a number as its weight, or none (or a weights: list)", path)
        out["weights"] = [float(w) for w in weights]
    return out


def recipe_yaml(merge: Any, options: Any, base: Path | None) -> str:
    """The recipe.yml of a merge output: what was run, re-runnable (absolute paths, sha256, every option)."""
    import yaml

    record = merge.recipe()
    sources = [{"source": s["path"] if s["task"] is None else f"{s['path']}:{s['task']}", "weight": w,
                "kind": s["kind"], "sha256": s["sha256"]} for s, w in zip(record["sources"], merge.weights)]
    data = {"polytool_version": __version__, "sources": sources,
            **{k: record[k] for k in ("method", "density", "majority_sign", "ties_variant", "seed")},
            "to": options.kind, "rank": options.rank, "energy": options.energy, "dtype": options.dtype,
            "base": None if base is None else str(Path(base).resolve()), "max_shard_size": options.max_shard_size,
            "untie": options.untie}
    return HEADER + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
