"""The panels of `inspect --plot`, each drawn on matplotlib axes from the report dict alone (the numbers
come from `--json`: routing.weights, layers, clustering, usage, entropy; docs/inspect.md).

Large adapters are capped where a panel would become unreadable, and the panel says so: the per-layer
grid shows at most MAX_LAYERS layers (evenly spaced) and MAX_GRID_TASKS tasks (the first in clustering
order); task and skill labels are thinned to at most MAX_TICKS.
"""
from __future__ import annotations

from typing import Any

import numpy as np

MAX_LAYERS = 16
MAX_GRID_TASKS = 24
MAX_TICKS = 40  # labels along the per-layer panel
MAX_SMALL_TICKS = 20  # labels along the small panels' axes
MAX_TYPE_LINES = 8  # entropy per module type drawn as lines up to this many types
CMAP = "viridis"


def shown_layers(n_layers: int) -> list[int]:
    """All layers, or MAX_LAYERS evenly spaced ones (first and last included)."""
    if n_layers <= MAX_LAYERS:
        return list(range(n_layers))
    return sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, MAX_LAYERS)})


def _ticks(ax, axis: str, labels: list[str], fontsize: float = 7) -> str:
    """Label every position, or every k-th when there are more than MAX_SMALL_TICKS; '' or a note."""
    step = max(1, -(-len(labels) // MAX_SMALL_TICKS))
    pos = list(range(0, len(labels), step))
    getattr(ax, f"set_{axis}ticks")(pos, [labels[p] for p in pos], fontsize=fontsize)
    return f"1 label in {step} shown" if step > 1 else ""


def layer_mosaic(rep: dict[str, Any]) -> dict[str, Any]:
    """The per-layer grid as one image: a block of (tasks x skills) eval weights per (layer, module type,
    split), NaN between blocks; with the positions of the labels and what was left out."""
    w = np.asarray(rep["routing"]["weights"])  # (t, m, q, s)
    n_tasks, _, n_splits, n_skills = w.shape
    grid = rep["routing"]["layers"]
    layers = shown_layers(len(grid["names"]))
    tasks = rep["routing"]["clustering"]["order"][:MAX_GRID_TASKS]
    n_types = len(grid["module_types"])
    split_w, type_w, row_h = n_skills + 1, n_splits * (n_skills + 1) + 1, len(tasks) + 1
    image = np.full((len(layers) * row_h - 1, n_types * type_w - 2), np.nan)
    for r, layer in enumerate(layers):
        for c, module in enumerate(grid["modules"][layer]):
            for q in range(n_splits if module is not None else 0):
                x0, y0 = c * type_w + q * split_w, r * row_h
                image[y0:y0 + len(tasks), x0:x0 + n_skills] = w[tasks, module, q, :]  # (t', s)
    notes = []
    if len(layers) < len(grid["names"]):
        notes.append(f"{len(layers)} of {len(grid['names'])} layers shown (evenly spaced)")
    if len(tasks) < n_tasks:
        notes.append(f"first {len(tasks)} of {n_tasks} tasks in clustering order")
    return {"image": image, "layers": layers, "tasks": tasks, "row_h": row_h, "type_w": type_w,
            "split_w": split_w, "notes": notes}


def draw_layers(ax, rep: dict[str, Any]):
    """Routing per layer: rows are layers, columns module types (and splits), each block tasks x skills."""
    mo = layer_mosaic(rep)
    grid = rep["routing"]["layers"]
    vmax = float(np.nanmax(mo["image"])) if np.isfinite(mo["image"]).any() else 1.0
    image = ax.imshow(np.ma.masked_invalid(mo["image"]), vmin=0.0, vmax=vmax, cmap=CMAP, aspect="auto",
                      interpolation="nearest")
    n_tasks = len(mo["tasks"])
    ax.set_yticks([r * mo["row_h"] + (n_tasks - 1) / 2 for r in range(len(mo["layers"]))],
                  [grid["labels"][i] for i in mo["layers"]], fontsize=7)
    ax.set_xticks([c * mo["type_w"] + (mo["type_w"] - 3) / 2 for c in range(len(grid["module_types"]))],
                  grid["module_types"], fontsize=7, rotation=30 if len(grid["module_types"]) > 6 else 0)
    ax.xaxis.tick_top()
    n_splits = rep["n_splits"]
    for q in range(n_splits if n_splits > 1 else 0):  # the splits, under the first module type only
        ax.text(q * mo["split_w"] + (rep["n_skills"] - 1) / 2, mo["image"].shape[0] - 0.5, f"q{q}", fontsize=6,
                ha="center", va="top")
    ax.set_ylabel("layer")
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    what = (f"each block: tasks (rows, clustering order) x skills; splits q0..q{n_splits - 1} left to right "
            "in each module type"
            if n_splits > 1 else "each block: tasks (rows, clustering order) x skills")
    ax.set_title("Routing per layer: eval mixing weights, one colour scale\n" + "; ".join([what] + mo["notes"]),
                 loc="left", fontsize=9)
    return image


def draw_dendrogram(ax, rep: dict[str, Any]) -> None:
    """The clustering's dendrogram above the ordered similarity matrix (leaf i at x = i)."""
    cl = rep["routing"]["clustering"]
    order = cl["order"]
    x = {task: float(i) for i, task in enumerate(order)}
    y = {task: 0.0 for task in order}
    n = len(order)
    for k, (a, b, dist, _) in enumerate(cl["linkage"]):
        ax.plot([x[a], x[a], x[b], x[b]], [y[a], dist, dist, y[b]], color="0.3", linewidth=0.7)
        x[n + k], y[n + k] = (x[a] + x[b]) / 2, dist
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_xticks([])
    ax.tick_params(labelsize=7)
    ax.set_ylabel("1 - cos", fontsize=7)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_title("Task similarity (cosine), average-linkage order", fontsize=9)


def draw_similarity(ax, rep: dict[str, Any]):
    order = rep["routing"]["clustering"]["order"]
    sim = np.asarray(rep["routing"]["similarity"])[np.ix_(order, order)]  # (t, t) reordered
    image = ax.imshow(sim, vmin=min(float(sim.min()), 0.999), vmax=1.0, cmap=CMAP, aspect="auto",
                      interpolation="nearest")
    labels = [str(t) for t in order]
    note = _ticks(ax, "x", labels)
    _ticks(ax, "y", labels)
    ax.tick_params(axis="x", rotation=90)
    ax.set_xlabel("task" + (f" ({note})" if note else ""), fontsize=8)
    return image


def draw_usage(ax_map, ax_bar, rep: dict[str, Any]):
    """Per task (clustering order) the share of routers that switch each skill on; below it, the share of
    routers in which no task uses the skill."""
    us = rep["routing"]["usage"]
    order = rep["routing"]["clustering"]["order"]
    active = np.asarray(us["active"])[order]  # (t, s)
    image = ax_map.imshow(active, vmin=0.0, vmax=1.0, cmap=CMAP, aspect="auto", interpolation="nearest")
    note = _ticks(ax_map, "y", [str(t) for t in order])
    ax_map.set_ylabel("task" + (f" ({note})" if note else ""), fontsize=8)
    ax_map.set_xticks([])
    ax_map.set_title("Skill usage per task: share of routers\nwith sigmoid(logit) >= 0.5", fontsize=9)
    unused = np.asarray(us["unused_routers"]) / max(us["routers"], 1)
    ax_bar.bar(range(len(unused)), unused, color="tab:red", width=0.8)
    ax_bar.set_xlim(-0.5, len(unused) - 0.5)
    ax_bar.set_ylim(0, max(1e-9, float(unused.max())) * 1.1 if unused.max() > 0 else 1.0)
    _ticks(ax_bar, "x", [f"s{s}" for s in range(len(unused))])
    ax_bar.tick_params(axis="y", labelsize=6)
    ax_bar.set_ylabel("unused", fontsize=7)
    ax_bar.set_xlabel(f"skill (red: share of the {us['routers']} routers where no task uses it)", fontsize=7)
    return image


def draw_entropy(ax, rep: dict[str, Any]) -> None:
    """Normalised routing entropy per layer (1 = uniform, 0 = one skill): the mean, and each module type."""
    grid, ent = rep["routing"]["layers"], rep["routing"]["entropy"]
    xs = np.arange(len(grid["names"]))
    marker = "o" if len(xs) <= 40 else None
    if len(grid["module_types"]) <= MAX_TYPE_LINES and len(grid["module_types"]) > 1:
        for c, kind in enumerate(grid["module_types"]):
            pts = [(i, ent["modules"][row[c]]) for i, row in enumerate(grid["modules"]) if row[c] is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], linewidth=0.8, marker=marker, markersize=2.5,
                    label=kind, alpha=0.8)
    ax.plot(xs, ent["layers"], color="black", linewidth=1.8, marker=marker, markersize=3.5, label="layer mean")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(-0.5, len(xs) - 0.5)
    _ticks(ax, "x", grid["labels"])
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("layer", fontsize=8)
    ax.set_ylabel("entropy / log n_skills", fontsize=8)
    ax.set_title("Routing entropy per layer\n(1 = near-uniform, 0 = sharp)", fontsize=9)
    ax.legend(fontsize=6, loc="lower left", ncol=2, frameon=False)
