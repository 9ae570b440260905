"""The numbers behind `inspect`'s figures (numpy only): modules laid out as layer x module type, tasks
ordered by hierarchical clustering, each task's use of each skill, and routing entropy per layer.

Every panel of `--plot` and `--report` draws these values from the report dict, so the pictures and
`--json` never disagree. Definitions: docs/inspect.md ("Figures").
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..core import routing
from ..core.clustering import average_linkage, leaf_order


def short_names(names: list[str]) -> dict[str, str]:
    """Each module path -> its shortest trailing name that still tells apart modules of different roles
    (BERT: `attention.output.dense` vs `output.dense`); layer indices do not count."""
    roles = {n: [c for c in n.split(".") if not c.isdigit()] for n in names}
    for k in range(1, max((len(r) for r in roles.values()), default=1) + 1):
        short = {n: ".".join(r[-k:]) for n, r in roles.items()}
        owners: dict[str, set] = {}
        for n, r in roles.items():
            owners.setdefault(short[n], set()).add(tuple(r))
        if all(len(o) == 1 for o in owners.values()):
            return short
    return {n: n for n in names}


def _layer_of(name: str) -> str:
    """The module path up to its first numeric component (`model.layers.3`), or '' when it has none."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ""


def _labels(layers: list[str]) -> list[str]:
    """Layer names without their common leading components (`model.layers.3` -> `3`); '-' for none."""
    split = [layer.split(".") for layer in layers if layer]
    common = 0
    while split and all(len(p) > common + 1 and p[common] == split[0][common] for p in split):
        common += 1
    return [".".join(layer.split(".")[common:]) if layer else "-" for layer in layers]


def _natural(name: str) -> list:
    """A sort key that puts layer 2 before layer 10."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def layer_grid(names: list[str]) -> dict[str, Any]:
    """Modules as a table: one row per layer (in numeric order: files list layer 10 before layer 2), one
    column per module type (the shortest trailing name of the path after the layer that tells types apart:
    T5's encoder and decoder `SelfAttention.q` share a column, `EncDecAttention.q` has its own), each cell
    the module's index in `names` or None."""
    layers = sorted(dict.fromkeys(_layer_of(n) for n in names), key=_natural)
    rest = {n: n[len(_layer_of(n)):].lstrip(".") or n for n in names}
    kinds = short_names(list(rest.values()))
    kinds = {n: kinds[rest[n]] for n in names}
    if len({(_layer_of(n), kinds[n]) for n in names}) < len(names):  # one role twice in a layer
        kinds = rest
    types = list(dict.fromkeys(kinds.values()))
    where = {(_layer_of(n), kinds[n]): i for i, n in enumerate(names)}
    return {"names": layers, "labels": _labels(layers), "module_types": types,
            "modules": [[where.get((layer, kind)) for kind in types] for layer in layers]}


def clustering(similarity: np.ndarray) -> dict[str, Any]:
    """Average linkage on 1 - cosine similarity: the linkage rows and the tasks' dendrogram order."""
    distance = np.clip(1.0 - (similarity + similarity.T) / 2, 0.0, None)  # (t, t)
    np.fill_diagonal(distance, 0.0)
    linkage = average_linkage(distance)
    return {"method": "average", "distance": "1 - cosine similarity",
            "order": leaf_order(linkage, similarity.shape[0]),
            "linkage": [[int(a), int(b), float(d), int(n)] for a, b, d, n in linkage]}


def usage(alloc: np.ndarray) -> dict[str, Any]:
    """(t, m, q, s) allocation -> how often each task switches each skill on (rounded allocation 1, over
    modules and splits) and in how many (module, split) routers no task uses each skill."""
    on = routing.rounded(alloc)  # (t, m, q, s) in {0, 1}
    unused = (on.max(axis=0) == 0).sum(axis=(0, 1))  # (s,): routers where every task has it off
    return {"active": on.mean(axis=(1, 2)).tolist(), "unused_routers": unused.astype(int).tolist(),
            "routers": int(alloc.shape[1] * alloc.shape[2])}


def entropy(weights: np.ndarray, grid: dict[str, Any]) -> dict[str, Any]:
    """(t, m, q, s) eval mixing weights -> normalised entropy per module (mean over tasks and splits)
    and per layer (mean over the layer's modules)."""
    per_module = routing.normalized_entropy(weights).mean(axis=(0, 2))  # (t, m, q) -> (m,)
    per_layer = [float(np.mean([per_module[i] for i in row if i is not None])) for row in grid["modules"]]
    return {"modules": per_module.tolist(), "layers": per_layer}


def routing_views(names: list[str], weights: np.ndarray, alloc: np.ndarray, similarity: np.ndarray) -> dict[str, Any]:
    """The report's `routing.layers`, `clustering`, `usage` and `entropy` entries."""
    grid = layer_grid(names)
    return {"layers": grid, "clustering": clustering(similarity), "usage": usage(alloc),
            "entropy": entropy(weights, grid)}
