"""`polytool inspect --plot`: a tasks x skills heatmap of the eval mixing weights (PNG).

matplotlib is optional (`pip install 'polytool[plot]'`) and imported only here, on use. The figure
is drawn with the Agg canvas directly (no pyplot, no global backend state) and written atomically.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import OutputExistsError, PolytoolError

INSTALL_HINT = "pip install 'polytool[plot]'"
MAX_ANNOTATED_CELLS = 144  # write the weight in each cell up to this many cells per panel


def _figure(weights: np.ndarray, title: str):
    """(t, q, s) weights -> a Figure with one tasks x skills panel per split."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PolytoolError(f"--plot needs matplotlib, which is not installed: {INSTALL_HINT}") from None
    n_tasks, n_splits, n_skills = weights.shape
    fig = Figure(figsize=(1.5 + n_splits * (0.9 + 0.45 * n_skills), 1.6 + 0.4 * n_tasks), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_splits, squeeze=False)[0]
    vmax = float(weights.max())
    for q, ax in enumerate(axes):
        image = ax.imshow(weights[:, q, :], vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_xticks(range(n_skills), [f"s{s}" for s in range(n_skills)], fontsize=8)
        ax.set_yticks(range(n_tasks), [str(t) for t in range(n_tasks)], fontsize=8)
        ax.set_xlabel("skill")
        ax.set_ylabel("task" if q == 0 else "")
        if n_splits > 1:
            ax.set_title(f"split {q}", fontsize=10)
        if n_tasks * n_skills <= MAX_ANNOTATED_CELLS:
            for t in range(n_tasks):
                for s in range(n_skills):
                    value = weights[t, q, s]
                    ax.text(s, t, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if value > 0.6 * vmax else "white")
    fig.colorbar(image, ax=list(axes), shrink=0.9, label="mixing weight")
    fig.suptitle(title, fontsize=10)
    return fig


def write_heatmap(report: dict, path: str | Path, force: bool = False) -> Path:
    """Write the report's tasks x skills mixing weights (mean over modules) to a PNG, atomically."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError("exists; use --force to replace it", path)
    if not path.parent.is_dir():
        raise PolytoolError("cannot write the plot: the directory does not exist", path.parent)
    weights = np.asarray(report["routing"]["task_split_skill_weights"])  # (t, q, s)
    title = (f"{Path(report['adapter_dir']).name}: eval mixing weights, "
             f"mean over {len(report['modules'])} modules")
    fig = _figure(weights, title)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=120)
        os.replace(tmp, path)
    except OSError as exc:
        raise PolytoolError(f"cannot write the plot: {exc.strerror or exc}", path) from None
    finally:
        if tmp is not None and Path(tmp).exists():
            Path(tmp).unlink()
    return path
