"""`polytool collapse`: one task spec as a plain LoRA, a GGUF LoRA or merged dense weights (no torch)."""
from __future__ import annotations

from pathlib import Path

import click

from .options import dense_options, dtype_option, out_option, rank_options, revision_option, writes_output
from .render import progress, render_truncation, result, warn


@click.command(short_help="One task as a plain LoRA, a GGUF LoRA, or merged dense weights.")
@click.argument("adapter_dir", type=click.Path(path_type=Path))
@revision_option
@click.option("--task", "task", required=True,
              help="Task id, 'uniform' (MHR-mu), 'mean' (mean routing over tasks), a mix such as 1,3 or 1:0.7,3:0.3 "
                   "(routing weights mixed), or 'all' (one LoRA per task).")
@out_option
@click.option("--to", "kind", type=click.Choice(["lora", "dense", "gguf"]), default="lora", show_default=True,
              help="A plain PEFT LoRA directory, a merged dense model directory, or a GGUF LoRA for llama.cpp "
                   "(OUT.gguf; with --task all a directory; needs polytool[gguf]).")
@click.option("--base", "base_dir", type=click.Path(path_type=Path),
              help="Base model directory, or a hub id org/name[@REV] (default: the adapter's base_model_name_or_path at its "
                   "recorded revision: local, cached or downloaded).")
@dtype_option
@dense_options
@rank_options
@click.option("--for", "stack", type=click.Choice(["vllm", "tgi", "llama.cpp", "peft"]),
              help="Run `polytool check`'s rules for this serving stack first; refuse on a problem.")
@writes_output("polytool.collapse.command:CollapseOptions")
def collapse(options, as_json: bool) -> None:
    """Collapse one task of a Poly/MHR adapter into a plain LoRA, or merge it into dense weights.

    The JSON keys are documented in docs/collapse.md. No torch is imported.
    """
    import os

    # Before numpy loads: the merge's (rows, r) @ (r, in) products are memory-bound, and BLAS helper
    # threads spinning against the kernel's writeback made a 2-core merge up to 8x slower; one is steady.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from ..collapse.command import collapse as run_collapse

    result(run_collapse(options, warn, progress), as_json, _render_collapse)


def _render_collapse(data: dict) -> str:
    from ..core.units import human_size, plural

    what = {"lora": "LoRA", "dense": "dense model", "gguf": "GGUF LoRA"}[data["kind"]]
    size = f"({plural(len(data['files']), 'file')}, {human_size(data['bytes'])})"
    if data["kind"] == "lora" and data["task"] == "all":
        n = data["n_tasks"]
        lines = [f"wrote {n} LoRAs (task-0 .. task-{n - 1}) to {data['out']} {size}"]
    else:
        lines = [f"wrote {what} for task {data['task']} to {data['out']} {size}"]
    if data["kind"] == "dense":
        replaced = f", {data['tensors_replaced']} trained (modules_to_save) written" if data["tensors_replaced"] else ""
        lines.append(f"  {data['tensors_merged']} tensors merged, {data['tensors_copied']} copied byte for byte, "
                     f"{data['tensors_converted']} converted{replaced}; {data['dtype']}; base {data['base']}")
        if data["untied"]:
            lines.append(f"  untied: {', '.join(data['untied'])} (config.json tie_word_embeddings false)")
    elif data["kind"] == "gguf":
        where = f"{data['out']}/task-<id>.gguf" if data["task"] == "all" else data["out"]
        lines.append(f"  {data['tensors']} tensors, {data['dtype']}, llama.cpp architecture {data['arch']}; "
                     f"load with llama-cli -m BASE.gguf --lora {where}")
    else:
        where = f"{data['out']}/task-<id>" if data["task"] == "all" else data["out"]
        lines.append(f"  {data['tensors']} tensors, {data['dtype']}; load with PeftModel.from_pretrained(base, {where!r})")
        if data.get("embedding_rows"):
            lines.append(f"  carries the embeddings whole ({data['embedding_rows']} rows): resize the base first, "
                         f"base.resize_token_embeddings({data['embedding_rows']})")
    if data.get("manifest"):
        from ..formats.manifest import render_manifest

        lines += ["", "serving (also in serving.json and SERVING.md):", render_manifest(data["manifest"])]
    return "\n".join(lines + render_truncation(data.get("truncation")))
