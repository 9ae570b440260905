"""The `polytool` command line: each command parses options, calls the library, renders.

Nothing heavy is imported at module level: `polytool --help` and `polytool inspect` must not pay
for torch or transformers. Commands that need them import the library lazily in their body.
"""
from __future__ import annotations

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

# --- collapse ---

# --- verify ---
