"""`polytool inspect --plot FILE`: a figure of what the router learned (PNG or SVG, by extension).

Four panels, each from the report dict (panels.py): routing per layer (layer x module type small
multiples, one colour scale), the task-similarity matrix in clustering order with its dendrogram, skill
usage per task, and routing entropy per layer. matplotlib is optional (`pip install 'polytool[plot]'`)
and imported only here, on use; the figure is drawn on the Agg canvas (no pyplot, no global state).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ..errors import PolytoolError
from .. import __version__
from ..formats.atomic import atomic_output_file
from . import panels

INSTALL_HINT = "pip install 'polytool[plot]'"
FORMATS = {".png": "png", ".svg": "svg"}
WIDTH_IN, BOTTOM_IN, DPI = 15.0, 4.4, 90


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PolytoolError(f"--plot and --report need matplotlib, which is not installed: {INSTALL_HINT}") from None
    return Figure, FigureCanvasAgg


def _title(rep: dict[str, Any]) -> str:
    mhr = f", {rep['n_splits']} splits (MHR)" if rep["n_splits"] > 1 else ""
    return (f"{Path(rep['adapter_dir']).name}: {rep['n_tasks']} tasks, {rep['n_skills']} skills{mhr}, "
            f"{len(rep['modules'])} modules in {len(rep['routing']['layers']['names'])} layers, r={rep['r']}")


def figure(rep: dict[str, Any]):
    """The four-panel Figure for a report. Axes are placed in inches (a fixed layout: a layout engine
    would draw the figure twice, and inspect --report must stay fast)."""
    Figure, FigureCanvasAgg = _matplotlib()
    mosaic_rows, mosaic_cols = panels.layer_mosaic(rep)["image"].shape
    left = max(0.7, 0.4 + 0.06 * max(len(label) for label in rep["routing"]["layers"]["labels"]))  # layer names
    wide = min(13.9 - left, max(4.0, 0.3 * mosaic_cols))  # narrow grids stay narrow
    top = min(9.0, max(2.8, 1.6 + 0.06 * mosaic_rows))
    height = top + BOTTOM_IN
    fig = Figure(figsize=(WIDTH_IN, height))
    FigureCanvasAgg(fig)

    def axes(x: float, y: float, w: float, h: float):  # inches, y measured from the top edge
        return fig.add_axes((x / WIDTH_IN, 1 - (y + h) / height, w / WIDTH_IN, h / height))

    image = panels.draw_layers(axes(left, 1.25, wide, top - 1.6), rep)
    fig.colorbar(image, cax=axes(left + wide + 0.15, 1.25, 0.15, top - 1.6), label="mixing weight")
    y0, h = top + 0.75, BOTTOM_IN - 1.45  # the bottom row: titles above, tick labels below
    tree_ax, sim_ax = axes(0.7, y0, 3.6, 0.7), axes(0.7, y0 + 0.75, 3.6, h - 0.75)
    panels.draw_dendrogram(tree_ax, rep)
    fig.colorbar(panels.draw_similarity(sim_ax, rep), cax=axes(4.4, y0 + 0.75, 0.12, h - 0.75), label="cosine")
    use_ax, bar_ax = axes(5.7, y0, 3.6, h - 0.75), axes(5.7, y0 + h - 0.6, 3.6, 0.6)
    fig.colorbar(panels.draw_usage(use_ax, bar_ax, rep), cax=axes(9.4, y0, 0.12, h - 0.75), label="share")
    panels.draw_entropy(axes(10.7, y0, 4.1, h), rep)
    fig.suptitle(_title(rep), fontsize=11, y=1 - 0.12 / height, va="top")
    return fig


def figure_bytes(rep: dict[str, Any], fmt: str, fast: bool = False) -> bytes:
    """The figure as PNG or SVG bytes (no date stamped in, so the same report gives the same bytes).
    `fast`: the lightest PNG compression (about 10% larger, a tenth of a second less), for the page."""
    buf = io.BytesIO()
    # polytool's provenance key in the file's metadata: the mark that lets --force replace it (formats/atomic.py)
    mark = f"polytool.version {__version__}"
    extra = ({"metadata": {"Date": None, "Creator": mark}} if fmt == "svg" else
             {"metadata": {"Software": mark}, **({"pil_kwargs": {"compress_level": 1}} if fast else {})})
    figure(rep).savefig(buf, format=fmt, dpi=DPI, **extra)
    return buf.getvalue()


def plot_format(path: Path) -> str:
    """png or svg, from the file name's extension."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise PolytoolError(f"--plot writes .png or .svg, not {path.suffix or 'a file without extension'!r}", path)
    return fmt


def write_figure(rep: dict[str, Any], path: str | Path, force: bool = False) -> Path:
    """Write the figure to `path` (.png or .svg) atomically; an existing file only with `force`."""
    path = Path(path)
    data = figure_bytes(rep, plot_format(path))
    with atomic_output_file(path, force) as tmp:
        tmp.write_bytes(data)
    return path
