"""`polytool merge`: several Poly tasks and LoRAs into one LoRA or dense model (no torch)."""
from __future__ import annotations

from pathlib import Path

import click

from .options import dense_options, dtype_option, out_option, rank_options, writes_output
from .render import progress, render_truncation, result, warn


def _floats(ctx, param, value: str | None) -> list[float] | None:
    try:
        return None if value is None else [float(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated numbers, e.g. 0.5,0.3,0.2") from None


@click.command(short_help="Combine Poly tasks and LoRAs into one LoRA or dense model.")
@click.argument("sources", nargs=-1, required=True)
@out_option
@click.option("--to", "kind", type=click.Choice(["lora", "dense"]), default="lora", show_default=True,
              help="A plain PEFT LoRA directory, or a merged dense model directory.")
@click.option("--weights", callback=_floats, help="One weight per source, e.g. 0.5,0.5 (default: equal, see docs/merge.md).")
@click.option("--method", type=click.Choice(["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]),
              default="linear", show_default=True, help="How the per-module deltas are combined (PEFT's definitions).")
@click.option("--density", type=float, help="ties, dare_*, magnitude_prune: the share of each delta's entries kept.")
@click.option("--majority-sign", type=click.Choice(["total", "frequency"]), help="ties, dare_ties: how the sign is elected (default total).")
@click.option("--ties-variant", type=click.Choice(["peft", "mergekit"]),
              help="ties, dare_ties: peft (default) divides by the agreeing count, mergekit by the agreeing weights.")
@click.option("--seed", type=int, help="dare_*: the random masks' seed (default 0; recorded).")
@rank_options
@click.option("--base", "base_dir", type=click.Path(path_type=Path),
              help="Dense: base model directory, or a hub id org/name[@REV] (default: the sources' base_model_name_or_path: "
                   "local, cached or downloaded).")
@dtype_option
@dense_options
@writes_output("polytool.merge.command:MergeOptions")
def merge(options, as_json: bool) -> None:
    """Merge SOURCES into one LoRA or one dense model, without loading a model.

    A SOURCE is ADAPTER_DIR:TASK (a Poly/MHR adapter and any task spec collapse takes) or a plain
    PEFT LoRA directory (or a hub id, org/name[@REV][:TASK]). One RECIPE.yml instead names the sources
    and options as YAML; every output carries the recipe.yml that re-runs it (options given here win).
    docs/merge.md has the methods, the math, the recipe keys and the JSON keys. No torch is imported.
    """
    import os

    # as collapse: one BLAS thread. The merge's QRs and small SVDs are too small to share, and on a busy
    # 2-core box helper threads made a rank-16 merge of 4 tasks 20x slower (2.3 s -> 53 s with 2 threads)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from ..merge.command import merge as run_merge, with_recipe
    from ..merge.recipe_file import is_recipe_file

    if is_recipe_file(options.sources):
        ctx = click.get_current_context()
        given = {p.name for p in ctx.command.params
                 if ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE} - {"sources"}
        options = with_recipe(options, options.sources[0], given)
    result(run_merge(options, warn, progress), as_json, _render_merge)


def _render_merge(data: dict) -> str:
    from ..core.units import human_size, plural

    what = {"lora": "LoRA", "dense": "dense model"}[data["kind"]]
    lines = [f"wrote {what} merging {len(data['sources'])} sources ({data['method']}) to {data['out']} "
             f"({plural(len(data['files']), 'file')}, {human_size(data['bytes'])})"]
    lines += [f"  {s['source']} x {w:g}" for s, w in zip(data["sources"], data["weights"])]
    if data["kind"] == "dense":
        lines.append(f"  {data['tensors_merged']} tensors merged, {data['tensors_copied']} copied byte for byte, "
                     f"{data['tensors_converted']} converted; {data['dtype']}; base {data['base']}")
    elif "truncation" not in data:
        lines.append(f"  exact: rank {data['r']} ({data['modules']} modules), {data['dtype']}")
    return "\n".join(lines + render_truncation(data.get("truncation")))


