"""`polytool inspect --report FILE.html`: one self-contained page to browse an adapter without Python.

The page holds the configuration, parameter counts, the `--plot` figure (an inline PNG), heatmaps drawn
by a small inline script that shows each cell's value under the pointer, and per-module tables. It
loads nothing: no network, no external script, style sheet or font. Every number comes from the
report dict (the `--json` output), rounded to 6 decimals in the page's embedded data.
"""
from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PolytoolError
from .. import __version__
from ..formats.atomic import atomic_output_file
from .page_assets import CSS, JS

DECIMALS = 6  # the embedded numbers, rounded


def _rows(pairs: list[tuple[str, Any]]) -> str:
    return "\n".join(f"<tr><th scope=\"row\">{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in pairs)


def _config(rep: dict[str, Any]) -> str:
    targets = rep["target_modules"]
    pairs = [("adapter", rep["adapter_dir"]), ("weights file", rep["weights_file"]), ("poly_type", rep["poly_type"]),
             ("r", rep["r"]), ("n_tasks", rep["n_tasks"]), ("n_skills", rep["n_skills"]),
             ("n_splits", rep["n_splits"]),
             ("target_modules", ", ".join(targets) if isinstance(targets, list) else targets),
             ("base model", rep["base_model_name_or_path"] or "(not recorded)"), ("task_type", rep["task_type"]),
             ("adapted modules", f"{len(rep['modules'])} in {len(rep['routing']['layers']['names'])} layers")]
    params = rep["parameters"]
    counts = [("Poly adapter (skills and routers)", f"{params['poly']:,}"),
              ("one task collapsed into a LoRA", f"{params['lora_per_task']:,}")]
    counts += [(f"{m['module']} (modules_to_save)", f"{sum(t['parameters'] for t in m['tensors']):,}")
               for m in rep["saved_modules"]]
    counts += [(f"{e['module']} (embedding saved whole)", f"{e['parameters']:,}") for e in rep["saved_embeddings"]]
    o = rep["routing"]["statistics"]["overall"]
    stats = [("discreteness", f"{o['discreteness']:.3f}"), ("sparsity", f"{o['sparsity']:.3f}"),
             ("skill usage", f"{o['skill_usage']:.3f}"),
             ("unused (module, split, skill) slots", f"{o['unused_skill_slots']} of {o['skill_slots']}")]
    return (f"<h2 id=\"config\">Configuration</h2><table>{_rows(pairs)}</table>"
            f"<h2 id=\"parameters\">Parameters</h2><table>{_rows(counts)}</table>"
            f"<h2 id=\"statistics\">Routing statistics (all modules)</h2><table>{_rows(stats)}</table>")


def _module_table(rep: dict[str, Any]) -> str:
    grid = rep["routing"]["layers"]
    where = {m: (grid["labels"][r], grid["module_types"][c]) for r, row in enumerate(grid["modules"])
             for c, m in enumerate(row) if m is not None}
    stats, ent = rep["routing"]["statistics"]["modules"], rep["routing"]["entropy"]["modules"]
    head = ("<tr><th>module</th><th>layer</th><th>type</th><th class=\"num\">in</th><th class=\"num\">out</th>"
            "<th class=\"num\">discreteness</th><th class=\"num\">sparsity</th><th class=\"num\">skill usage</th>"
            "<th class=\"num\">entropy</th><th>unused skills</th></tr>")
    rows = []
    for i, (m, st) in enumerate(zip(rep["modules"], stats)):
        unused = " ".join((f"q{q}:" if rep["n_splits"] > 1 else "") + ",".join(f"s{s}" for s in sp["unused_skills"])
                          for q, sp in enumerate(st["splits"]) if sp["unused_skills"]) or "-"
        layer, kind = where[i]
        rows.append(f"<tr><td>{escape(m['name'])}</td><td>{escape(layer)}</td><td>{escape(kind)}</td>"
                    f"<td class=\"num\">{m['in_features']}</td><td class=\"num\">{m['out_features']}</td>"
                    f"<td class=\"num\">{st['discreteness']:.3f}</td><td class=\"num\">{st['sparsity']:.3f}</td>"
                    f"<td class=\"num\">{st['skill_usage']:.3f}</td><td class=\"num\">{ent[i]:.3f}</td>"
                    f"<td>{escape(unused)}</td></tr>")
    return f"<h2 id=\"modules\">Modules</h2><table>{head}{''.join(rows)}</table>"


def _data(rep: dict[str, Any]) -> str:
    """What the script draws, as JSON safe inside <script>: every '<' written as \\u003c (only strings hold one)."""
    ro = rep["routing"]

    def short(values: list) -> list:  # 6 decimals: the page shows 4, and full floats triple its size
        return np.round(np.asarray(values, dtype=np.float64), DECIMALS).tolist()

    data = {"n_skills": rep["n_skills"], "n_splits": rep["n_splits"], "order": ro["clustering"]["order"],
            "similarity": short(ro["similarity"]), "usage": short(ro["usage"]["active"]),
            "weights": short(ro["weights"]),
            "layer_labels": ro["layers"]["labels"], "layer_modules": ro["layers"]["modules"],
            "module_types": ro["layers"]["module_types"]}
    return json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def _browse() -> str:
    return ("<h2 id=\"browse\">Browse the routing</h2><p class=\"note\">Hover over a cell for its value. Tasks are "
            "in clustering order (average linkage on 1 - cosine similarity).</p>"
            "<div class=\"heats\"><div id=\"similarity\"></div><div id=\"usage\"></div></div>"
            "<h3>Routing per layer: eval mixing weights</h3><p><label>layer <select id=\"layer\"></select></label> "
            "<span class=\"note\">one colour scale for every layer</span></p><div class=\"heats\" "
            "id=\"layer-heatmaps\"></div>")


def build_page(rep: dict[str, Any], figure_png: bytes) -> str:
    """The HTML page for a report and its figure (PNG bytes)."""
    name = escape(Path(rep["adapter_dir"]).name)
    image = base64.b64encode(figure_png).decode("ascii")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<meta name=\"generator\" content=\"polytool.version {escape(__version__)}\">"
            f"<title>polytool inspect: {name}</title><style>{CSS}</style></head><body>"
            f"<h1>Poly adapter {name}</h1><pre id=\"errors\"></pre>{_config(rep)}"
            f"<h2 id=\"figures\">Figures</h2><div class=\"figure\"><img alt=\"routing figures of {name}\" "
            f"src=\"data:image/png;base64,{image}\"></div>{_browse()}{_module_table(rep)}"
            f"<div id=\"tip\" hidden></div>"
            f"<script type=\"application/json\" id=\"inspect-data\">{_data(rep)}</script>"
            f"<script>{JS}</script></body></html>\n")


def report_format(path: Path) -> None:
    """Refuse a --report file name that does not end in .html (or .htm)."""
    if path.suffix.lower() not in (".html", ".htm"):
        raise PolytoolError(f"--report writes an HTML page: the file name must end in .html, not {path.suffix!r}",
                            path)


def write_page(rep: dict[str, Any], path: str | Path, force: bool = False) -> Path:
    """Write the report page to `path` atomically; an existing file only with `force`."""
    from .plot import figure_bytes

    path = Path(path)
    report_format(path)
    page = build_page(rep, figure_bytes(rep, "png", fast=True))
    with atomic_output_file(path, force) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
