"""`polytool inspect`: what an adapter learned (no torch; no matplotlib unless --plot or --report)."""
from __future__ import annotations

from pathlib import Path

import click

from .options import force_option, json_option, revision_option
from .render import handle_errors, result


@click.command(short_help="Show what an adapter learned: routing, skills, task similarity.")
@click.argument("adapter_dir", type=click.Path(path_type=Path))
@revision_option
@json_option
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Also write a figure of the routing, .png or .svg (needs polytool[plot]).")
@click.option("--report", "report_file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.html",
              help="Also write a self-contained HTML page to browse the adapter (needs polytool[plot]).")
@click.option("--base", "base_dir", type=click.Path(path_type=Path),
              help="Base model directory or hub id, to compare saved embeddings and name Conv1D layers "
                   "(default: the adapter's base_model_name_or_path when local or cached; never downloaded).")
@click.option("--task", help="Also show the mixing weights of this task spec per module: an id, uniform, mean, "
                             "or a mix such as 1:0.7,3:0.3 (JSON key task_weights).")
@force_option
@handle_errors
def inspect(adapter_dir: Path, revision: str | None, as_json: bool, plot_file: Path | None, report_file: Path | None,
            base_dir: Path | None, task: str | None, force: bool) -> None:
    """Show a Poly/MHR adapter: configuration, modules, parameters, routing (no torch needed).

    ADAPTER_DIR holds adapter_config.json and adapter_model.safetensors (or one subfolder that
    does), or is a Hugging Face hub id (org/name), read from the cache or downloaded. The JSON schema and the
    figures are documented in docs/inspect.md.
    """
    from ..core.taskspec import parse_task_spec
    from ..formats.adapter import load_adapter
    from ..inspect.report import build_report, render_report, spec_report

    adapter = load_adapter(adapter_dir, revision=revision)
    _check_outputs(adapter, plot_file, report_file, force)
    report = build_report(adapter, base_dir)
    if task is not None:
        report["task_weights"] = spec_report(adapter, parse_task_spec(task, adapter.n_tasks))
        render_report = _with_task_weights(render_report)
    _write_outputs(report, plot_file, report_file, force)
    result(report, as_json, render_report)


def _check_outputs(adapter, plot_file: Path | None, report_file: Path | None, force: bool) -> None:
    """Before any work: the file names, never into the adapter (its files may be links into a cache: those
    are protected too), an existing file only with --force."""
    from ..formats.atomic import check_output
    from ..inspect.html import report_format
    from ..inspect.plot import plot_format

    inputs = [adapter.directory, adapter.weights_file, adapter.directory / "adapter_config.json"]
    if plot_file is not None:
        plot_format(plot_file)
        check_output(plot_file, force, inputs=inputs)
    if report_file is not None:
        report_format(report_file)
        check_output(report_file, force, inputs=inputs)


def _write_outputs(report: dict, plot_file: Path | None, report_file: Path | None, force: bool) -> None:
    from .render import info

    if plot_file is not None:
        from ..inspect.plot import write_figure

        info(f"wrote {write_figure(report, plot_file, force=force)}")
    if report_file is not None:
        from ..inspect.html import write_page

        info(f"wrote {write_page(report, report_file, force=force)}")


def _with_task_weights(render):
    def both(report: dict) -> str:
        tw = report["task_weights"]
        skills = " ".join(f"{w:.3f}" for w in tw["skill_weights"])
        return (f"{render(report)}\n\ntask {tw['task']}: skill weights (mean over modules and splits) {skills}; "
                f"effective skills {tw['effective_skills']:.2f}; per module: --json")
    return both
