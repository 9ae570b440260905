"""The `polytool` command line: each command parses options, calls the library, renders.

Nothing heavy is imported at module level: `polytool --help` and `polytool inspect` must not pay
for torch or transformers. Commands that need them import the library lazily in their body.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .output import handle_errors, result  # noqa: F401  (used by the commands below)

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
force_option = click.option("--force", is_flag=True, help="Replace an existing output.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="polytool")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Inspect, collapse and verify Poly / MHR (multi-task routed LoRA) adapters."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    for stream in (sys.stdout, sys.stderr):  # a path that is not valid UTF-8 prints escaped, not as a crash
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


# --- inspect ---


@main.command(short_help="Show what an adapter learned: routing, skills, task similarity.")
@click.argument("adapter_dir", type=click.Path(path_type=Path))
@json_option
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.png",
              help="Also write a tasks x skills heatmap PNG (needs polytool[plot]).")
@click.option("--base", "base_dir", type=click.Path(path_type=Path),
              help="Base model directory, to compare saved embeddings and name Conv1D layers "
                   "(default: the adapter's base_model_name_or_path when found locally).")
@click.option("--task", help="Also show the mixing weights of this task spec per module: an id, uniform, mean, "
                             "or a mix such as 1:0.7,3:0.3 (JSON key task_weights).")
@force_option
@handle_errors
def inspect(adapter_dir: Path, as_json: bool, plot_file: Path | None, base_dir: Path | None, task: str | None,
            force: bool) -> None:
    """Show a Poly/MHR adapter: configuration, modules, parameters, routing (no torch needed).

    ADAPTER_DIR holds adapter_config.json and adapter_model.safetensors (or one subfolder that
    does). The JSON schema is documented in docs/inspect.md.
    """
    from .adapter import load_adapter
    from .inspect import build_report, render_report
    from .output import info
    from .routing import parse_task_spec, spec_report

    adapter = load_adapter(adapter_dir)
    report = build_report(adapter, base_dir)
    if task is not None:
        report["task_weights"] = spec_report(adapter, parse_task_spec(task, adapter.n_tasks))
        render_report = _with_task_weights(render_report)
    if plot_file is not None:
        from .outdir import check_output
        from .plot import write_heatmap

        # never into the adapter (its files may be links into a cache: those are protected too)
        check_output(plot_file, True, inputs=[adapter.directory, adapter.weights_file,
                                              adapter.directory / "adapter_config.json"])

        info(f"wrote {write_heatmap(report, plot_file, force=force)}")
    result(report, as_json, render_report)


def _with_task_weights(render):
    def both(report: dict) -> str:
        tw = report["task_weights"]
        skills = " ".join(f"{w:.3f}" for w in tw["skill_weights"])
        return (f"{render(report)}\n\ntask {tw['task']}: skill weights (mean over modules and splits) {skills}; "
                f"effective skills {tw['effective_skills']:.2f}; per module: --json")
    return both


# --- collapse ---
DTYPE_CHOICES = {"auto": None, "float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def rank_options(fn):
    """--rank / --energy, shared by collapse and merge (docs/merge.md)."""
    fn = click.option("--energy", type=float, help="LoRA: per module, the smallest rank keeping this share of the "
                      "squared singular values, e.g. 0.99 (ranks may differ: rank_pattern).")(fn)
    return click.option("--rank", type=int, help="LoRA: the best rank-K approximation per module (truncated SVD).")(fn)


@main.command(short_help="One task as a plain LoRA, a GGUF LoRA, or merged dense weights.")
@click.argument("adapter_dir", type=click.Path(path_type=Path))
@click.option("--task", "task", required=True,
              help="Task id, 'uniform' (MHR-mu), 'mean' (mean routing over tasks), a mix such as 1,3 or 1:0.7,3:0.3 "
                   "(routing weights mixed), or 'all' (one LoRA per task).")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Output directory (written atomically).")
@click.option("--to", "kind", type=click.Choice(["lora", "dense", "gguf"]), default="lora", show_default=True,
              help="A plain PEFT LoRA directory, a merged dense model directory, or a GGUF LoRA for llama.cpp "
                   "(OUT.gguf; with --task all a directory; needs polytool[gguf]).")
@click.option("--base", "base_dir", type=click.Path(path_type=Path),
              help="Base model directory (default: the adapter's base_model_name_or_path, local or cached).")
@click.option("--dtype", type=click.Choice(list(DTYPE_CHOICES)), default="auto", show_default=True,
              help="Output dtype (auto: float32 for a LoRA, the base's dtype for dense).")
@click.option("--max-shard-size", help="Dense: repack the shards to at most this size, e.g. 5GB (default: the base's layout).")
@click.option("--untie", is_flag=True, help="Dense: write a target tied to the embeddings (lm_head) as its own weight.")
@rank_options
@click.option("--for", "stack", type=click.Choice(["vllm", "tgi", "llama.cpp", "peft"]),
              help="Run `polytool check`'s rules for this serving stack first; refuse on a problem.")
@force_option
@json_option
@handle_errors
def collapse(adapter_dir: Path, task: str, out: Path, kind: str, base_dir: Path | None, dtype: str,
             max_shard_size: str | None, untie: bool, rank: int | None, energy: float | None, stack: str | None,
             force: bool, as_json: bool) -> None:
    """Collapse one task of a Poly/MHR adapter into a plain LoRA, or merge it into dense weights.

    The JSON keys are documented in docs/collapse.md. No torch is imported.
    """
    import os

    # Before numpy loads: the merge's (rows, r) @ (r, in) products are memory-bound, and BLAS helper
    # threads spinning against the kernel's writeback made a 2-core merge up to 8x slower; one is steady.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from .adapter import load_adapter
    from .basemodel import resolve_base_dir
    from .errors import PolytoolError
    from .outdir import check_output
    from .routing import parse_task_spec, spec_label

    adapter = load_adapter(adapter_dir)
    spec = parse_task_spec(task, adapter.n_tasks, allow_all=True)
    if stack is not None and (kind == "dense" or (kind == "gguf") != (stack == "llama.cpp")):
        raise PolytoolError(f"--for {stack} does not fit --to {kind}: llama.cpp takes --to gguf; vllm, tgi and peft "
                            "take --to lora")
    if kind == "gguf":
        from .gguf import export_gguf

        if max_shard_size or untie:
            raise PolytoolError("--max-shard-size and --untie apply to --to dense only")
        base = resolve_base_dir(base_dir, adapter.base_model_name_or_path, adapter.config.get("revision"))
        data = export_gguf(adapter, spec, base, out, DTYPE_CHOICES[dtype] or "F32", force)
        data.update(dtype=dtype if dtype != "auto" else "float32")
    elif kind == "lora":
        from .export import base_uses_conv1d, export_lora, lora_base

        if max_shard_size or untie:
            raise PolytoolError("--max-shard-size and --untie apply to --to dense only")
        base = lora_base(adapter, base_dir)  # read for its checks even without --base: never written
        check_output(out, force, inputs=[adapter.directory] + ([base] if base else []))
        if base is None:
            from .output import warn

            warn(f"no base at hand ({adapter.base_model_name_or_path or 'none recorded'} is not found locally): module "
                 "names and shapes, trained heads and saved embeddings were not checked against it, and the targets "
                 "are taken as Linear (fan_in_fan_out false; GPT-2's Conv1D needs it true): pass --base DIR to check")
        conv1d = base_uses_conv1d(adapter, base_dir)
        if stack is not None:
            from .basemodel import open_base
            from .check import collapse_facts, refuse_problems, report
            from .export import lora_config

            facts = collapse_facts(adapter, lora_config(adapter, conv1d), DTYPE_CHOICES[dtype] or "F32")
            refuse_problems(report(facts, stack, open_base(base) if base else None))
        data = export_lora(adapter, spec, out, DTYPE_CHOICES[dtype] or "F32", conv1d, force, rank, energy)
        data.update(dtype=dtype if dtype != "auto" else "float32", n_tasks=adapter.n_tasks)
    else:
        from .merge import check_dense_spec, merge_dense, parse_size
        from .output import progress

        check_dense_spec(spec)
        if rank is not None or energy is not None:
            raise PolytoolError("--rank and --energy apply to a LoRA output: a dense merge adds the exact delta")
        size = None if max_shard_size is None else parse_size(max_shard_size)
        base = resolve_base_dir(base_dir, adapter.base_model_name_or_path, adapter.config.get("revision"))
        data = merge_dense(adapter, spec, base, out, DTYPE_CHOICES[dtype], untie, size, force, progress)
    result({"out": str(out), "kind": kind, "task": spec if isinstance(spec, int) else spec_label(spec),
            "adapter": str(adapter.directory), **data}, as_json, _render_collapse)


def _render_collapse(data: dict) -> str:
    from .output import human_size

    what = {"lora": "LoRA", "dense": "dense model", "gguf": "GGUF LoRA"}[data["kind"]]
    size = f"({len(data['files'])} files, {human_size(data['bytes'])})"
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
    if data.get("manifest"):
        from .manifest import render_manifest

        lines += ["", "serving (also in serving.json and SERVING.md):", render_manifest(data["manifest"])]
    return "\n".join(lines + _render_truncation(data.get("truncation")))


def _render_truncation(kept: list[dict] | None) -> list[str]:
    if not kept:
        return []
    lo, hi, worst = min(t["rank"] for t in kept), max(t["rank"] for t in kept), max(kept, key=lambda t: t["error"])
    return [f"  rank {lo if lo == hi else f'{lo}-{hi}'} ({len(kept)} modules); retained energy >= {min(t['energy'] for t in kept):.6f}; relative error "
            f"max {worst['error']:.3e} ({worst['module']}), mean {sum(t['error'] for t in kept) / len(kept):.3e}"]


# --- merge ---


def _floats(ctx, param, value: str | None) -> list[float] | None:
    try:
        return None if value is None else [float(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated numbers, e.g. 0.5,0.3,0.2") from None


@main.command(short_help="Combine Poly tasks and LoRAs into one LoRA or dense model.")
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Output directory (written atomically).")
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
              help="Dense: base model directory (default: the sources' base_model_name_or_path, local or cached).")
@click.option("--dtype", type=click.Choice(list(DTYPE_CHOICES)), default="auto", show_default=True,
              help="Output dtype (auto: float32 for a LoRA, the base's dtype for dense).")
@click.option("--max-shard-size", help="Dense: repack the shards to at most this size, e.g. 5GB (default: the base's layout).")
@click.option("--untie", is_flag=True, help="Dense: write a target tied to the embeddings (lm_head) as its own weight.")
@force_option
@json_option
@handle_errors
def merge(sources: tuple[str, ...], out: Path, kind: str, weights: list[float] | None, method: str, density: float | None,
          majority_sign: str | None, ties_variant: str | None, seed: int | None, rank: int | None, energy: float | None,
          base_dir: Path | None, dtype: str, max_shard_size: str | None, untie: bool, force: bool, as_json: bool) -> None:
    """Merge SOURCES into one LoRA or one dense model, without loading a model.

    A SOURCE is ADAPTER_DIR:TASK (a Poly/MHR adapter and any task spec collapse takes) or a plain
    PEFT LoRA directory. docs/merge.md has the methods, the math and the JSON keys. No torch is imported.
    """
    import os

    # as collapse: one BLAS thread. The merge's QRs and small SVDs are too small to share, and on a busy
    # 2-core box helper threads made a rank-16 merge of 4 tasks 20x slower (2.3 s -> 53 s with 2 threads)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from .errors import PolytoolError
    from .lora_merge import open_merge, write_dense_merge, write_lora_merge
    from .output import progress, warn

    plan = open_merge(sources, weights, method, density, majority_sign, seed, ties_variant)
    if kind == "lora":
        if max_shard_size or untie:
            raise PolytoolError("--max-shard-size and --untie apply to --to dense only")
        data = write_lora_merge(plan, out, rank, energy, DTYPE_CHOICES[dtype] or "F32", force)
        data.update(dtype=dtype if dtype != "auto" else "float32")
    else:
        from .basemodel import resolve_base_dir
        from .merge import parse_size

        if rank is not None or energy is not None:
            raise PolytoolError("--rank and --energy apply to a LoRA output: a dense merge adds the exact delta")
        size = None if max_shard_size is None else parse_size(max_shard_size)
        first = plan.sources[0].config
        base = resolve_base_dir(base_dir, first.get("base_model_name_or_path"), first.get("revision"))
        data = write_dense_merge(plan, base, out, DTYPE_CHOICES[dtype], untie, size, force, progress)
    for message in plan.warnings:
        warn(message)
    result({"out": str(out), "kind": kind, "method": method, "sources": [s.record() for s in plan.sources],
            "weights": plan.weights, "modules": len(plan.modules), **data}, as_json, _render_merge)


def _render_merge(data: dict) -> str:
    from .output import human_size

    what = {"lora": "LoRA", "dense": "dense model"}[data["kind"]]
    lines = [f"wrote {what} merging {len(data['sources'])} sources ({data['method']}) to {data['out']} "
             f"({len(data['files'])} files, {human_size(data['bytes'])})"]
    lines += [f"  {s['source']} x {w:g}" for s, w in zip(data["sources"], data["weights"])]
    if data["kind"] == "dense":
        lines.append(f"  {data['tensors_merged']} tensors merged, {data['tensors_copied']} copied byte for byte, "
                     f"{data['tensors_converted']} converted; {data['dtype']}; base {data['base']}")
    elif "truncation" not in data:
        lines.append(f"  exact: rank {data['r']} ({data['modules']} modules), {data['dtype']}")
    return "\n".join(lines + _render_truncation(data.get("truncation")))


# --- verify ---


@main.command(short_help="Prove artifacts compute what the routed model computes (CI gate).")
@click.argument("adapter_dir", type=click.Path(path_type=Path))
@click.option("--base", "base_dir", type=click.Path(path_type=Path),
              help="Base model directory (default: the adapter's base_model_name_or_path, local or cached).")
@click.option("--against", "against", multiple=True, type=click.Path(path_type=Path),
              help="A collapsed artifact to check: LoRA dir, `collapse --task all` dir or dense model dir (repeatable). "
                   "Without it: a self-check of the in-memory collapse.")
@click.option("--task", help="Task id, uniform or mean: the only task to self-check, or the task of artifacts "
                             "without provenance (overrides the recorded one).")
@click.option("--atol", type=float, help="Absolute tolerance (default: by the dtype the artifact stores, docs/ci.md).")
@click.option("--rtol", type=float, help="Tolerance relative to each output's scale max|b| (default: by that dtype).")
@click.option("--inputs", "n_inputs", type=int, default=4, show_default=True, help="Number of random sequences.")
@click.option("--seq-len", type=int, help="Random sequence length (default 32); with --prompts, truncate to it.")
@click.option("--prompts", type=click.Path(path_type=Path), help="Text file, one prompt per line (base's tokenizer).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="auto: device_map='auto' through accelerate, for bases larger than one device.")
@click.option("--allow-noop", is_flag=True, help="Accept tasks where the adapter does not change the base's output.")
@click.option("--max-kl", type=float, help="Also fail when the KL divergence of an artifact's next-token distribution "
                                           "from the routed one exceeds this at any position (language models).")
@click.option("--reference", type=click.Choice(["polytool", "peft"]), default="polytool", show_default=True,
              help="The routed model trusted: polytool's independent reference, or PEFT's own Poly model (and "
                   "PEFT's loader for LoRA artifacts; needs PEFT).")
@click.option("--max-memory", metavar="SIZE", help="Run in about SIZE (e.g. 1GB) of memory: accelerate keeps what "
                                                 "the process does not already hold of it for the model and offloads "
                                                 "the rest to --offload-dir (needs polytool[auto]).")
@click.option("--offload-dir", type=click.Path(path_type=Path), help="With --max-memory: where the offloaded "
                                                                     "weights go (default: a temporary directory).")
@click.option("--gguf-base", type=click.Path(path_type=Path), metavar="BASE.gguf",
              help="With --against X.gguf: the base as GGUF; both run in llama.cpp (needs llama-cpp-python).")
@json_option
@handle_errors
def verify(adapter_dir: Path, base_dir: Path | None, against: tuple[Path, ...], task: str | None, atol: float | None,
           rtol: float | None, n_inputs: int, seq_len: int | None, prompts: Path | None, device: str,
           allow_noop: bool, max_kl: float | None, reference: str, max_memory: str | None, offload_dir: Path | None,
           gguf_base: Path | None, as_json: bool) -> None:
    """Prove collapsed artifacts compute what the live routed Poly model computes.

    Exit 0 when every check passes, 1 when any output differs beyond tolerance (or a task is a
    no-op), 2 for bad input. The report goes to stdout; docs/ci.md documents it.
    """
    from .errors import VerificationError

    if gguf_base is not None or any(str(p).endswith(".gguf") for p in against):  # llama.cpp runs the artifacts
        from .errors import PolytoolError
        from .gguf_verify import gguf_report, render_gguf_report

        if atol is not None or rtol is not None or prompts is not None or device != "cpu":
            raise PolytoolError("--atol, --rtol, --prompts and --device do not apply to a GGUF check (llama.cpp on "
                                "the CPU, judged against its own floor: docs/serving.md)")

        report = gguf_report(adapter_dir, base_dir, against, gguf_base, task, n_inputs, seq_len, allow_noop)
        result(report, as_json, render_gguf_report)
        if not report["passed"]:
            first = next(c for c in report["checks"] if not c["passed"])
            raise VerificationError(f"{report['summary']['failed']} of {report['summary']['checks']} checks failed "
                                    f"(first: task {first['task']}, gguf {first['artifact']})")
        return
    from .output import progress
    from .verify import render_report, verify as run_verify

    report = run_verify(adapter_dir, base_dir, against, task, atol, rtol, n_inputs, seq_len, prompts, device,
                        allow_noop, max_kl, reference, progress=None if as_json else progress, max_memory=max_memory,
                        offload_dir=offload_dir)
    result(report, as_json, render_report)
    if not report["passed"]:
        failed = [c for c in report["checks"] if not c["passed"]]
        first = failed[0]
        raise VerificationError(f"{len(failed)} of {len(report['checks'])} checks failed "
                                f"(first: task {first['task']}, {first['kind']} {first['artifact']})")


# --- check ---


@main.command(short_help="Preflight a LoRA for vLLM, TGI, llama.cpp or PEFT.")
@click.argument("lora_dir", type=click.Path(path_type=Path))
@click.option("--for", "stack", required=True, type=click.Choice(["vllm", "tgi", "llama.cpp", "peft"]),
              help="The serving stack whose rules apply (docs/serving.md cites the versions they were read from).")
@click.option("--base", "base_dir", type=click.Path(path_type=Path),
              help="Base model directory: match the adapter's module paths against its weights.")
@json_option
@handle_errors
def check(lora_dir: Path, stack: str, base_dir: Path | None, as_json: bool) -> None:
    """Preflight a PEFT LoRA directory for a serving stack: what it would refuse or silently ignore.

    Exit 0 when ready, 1 when a problem was found, 2 for bad input. No torch is imported.
    """
    from .check import check as run_check, render
    from .errors import VerificationError

    data = run_check(lora_dir, stack, base_dir)
    result(data, as_json, render)
    if not data["ready"]:
        first = next(x for x in data["findings"] if x["status"] == "problem")
        raise VerificationError(f"{data['summary']['problem']} problems for {stack} (first: {first['rule']})")
