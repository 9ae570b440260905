"""The `polytool` command line: each command parses options, calls the library, renders.

Nothing heavy is imported at module level: `polytool --help` and `polytool inspect` must not pay
for torch or transformers. Commands that need them import the library lazily in their body.
"""
from __future__ import annotations

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


# --- inspect ---


@main.command()
@click.argument("adapter_dir", type=click.Path(path_type=Path))
@json_option
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.png",
              help="Also write a tasks x skills heatmap PNG (needs polytool[plot]).")
@force_option
@handle_errors
def inspect(adapter_dir: Path, as_json: bool, plot_file: Path | None, force: bool) -> None:
    """Show a Poly/MHR adapter: configuration, modules, parameters, routing (no torch needed).

    ADAPTER_DIR holds adapter_config.json and adapter_model.safetensors (or one subfolder that
    does). The JSON schema is documented in docs/inspect.md.
    """
    from .adapter import load_adapter
    from .inspect import build_report, render_report
    from .output import info

    report = build_report(load_adapter(adapter_dir))
    if plot_file is not None:
        from .plot import write_heatmap

        info(f"wrote {write_heatmap(report, plot_file, force=force)}")
    result(report, as_json, render_report)


# --- collapse ---

# --- verify ---
