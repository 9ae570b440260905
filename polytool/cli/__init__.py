"""The `polytool` command line: the group, and one module per command (inspect, collapse, merge, verify,
check, adapt), each of which parses its options, calls the library and renders (render.py: text or JSON, exit codes).

Nothing heavy is imported at module level: `polytool --help` and `polytool inspect` must not pay
for torch or transformers. Commands import the library lazily in their body.
"""
from __future__ import annotations

import sys

import click

from .. import __version__


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


from .adapt import adapt  # noqa: E402  (the commands register on the group defined above)
from .check import check  # noqa: E402
from .collapse import collapse  # noqa: E402
from .inspect import inspect  # noqa: E402
from .merge import merge  # noqa: E402
from .verify import verify  # noqa: E402

for _command in (inspect, collapse, merge, verify, check, adapt):
    main.add_command(_command)
