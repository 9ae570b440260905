"""The `polytool` command line: the group, and one module per command (inspect, collapse, merge, verify,
check, adapt), each of which parses its options, calls the library and renders (render.py: text or JSON, exit codes).

Nothing heavy is imported at module level: `polytool --help` and `polytool inspect` must not pay
for torch or transformers. Commands import the library lazily in their body.
"""
from __future__ import annotations

import json
import re
import sys

import click

from .. import DOCS_URL, __version__


class Group(click.Group):
    """The group: a usage error (a missing option, a bad choice) of a command given --json also prints the
    JSON error object on stdout, as every other error does (render.py). Run as a program, a command that
    imported torch ends without the interpreter's teardown (`_exit_now`)."""

    def main(self, args=None, *rest, **kwargs):
        if args is not None or not kwargs.get("standalone_mode", True):  # called in-process (CliRunner, a script)
            return super().main(args, *rest, **kwargs)
        from .. import extras

        extras.FREEZE = True  # the process is polytool's: what torch's import made may be frozen (collector_paused)
        try:
            return super().main(args, *rest, **kwargs)
        except SystemExit as exc:
            if "torch" in sys.modules and (exc.code is None or isinstance(exc.code, int)):
                _exit_now(exc.code or 0)
            raise

    def invoke(self, ctx: click.Context):
        args = [*getattr(ctx, "_protected_args", []), *ctx.args]
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            if "--json" not in args[: args.index("--") if "--" in args else None]:
                raise
            from .render import EXIT_INPUT

            exc.show()
            click.echo(json.dumps({"error": exc.format_message(), "exit_code": EXIT_INPUT, "kind": "input"}))
            raise click.exceptions.Exit(EXIT_INPUT) from None


def _exit_now(code: int) -> None:
    """Exit with `code` once the atexit handlers have run and the streams are flushed, skipping the teardown of
    every object and module: with torch and transformers imported it takes 0.6-1.0 s after the output is out
    (docs/performance.md). Not while another thread still runs that the interpreter would wait for (daemon
    threads, such as tqdm's monitor, it would not)."""
    import atexit
    import os
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: as the interpreter's own exit would, say nothing
            pass
    os._exit(code)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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


def _link_docs(command: click.Command) -> click.Command:
    """Help text cites the documentation by URL: an installed package has no docs/ folder."""
    link = lambda text: text and re.sub(r"\bdocs/([\w.-]+\.md)", DOCS_URL + r"\1", text)
    command.help = link(command.help)
    for param in command.params:
        if isinstance(param, click.Option):
            param.help = link(param.help)
    return command


for _command in (inspect, collapse, merge, verify, check, adapt):
    main.add_command(_link_docs(_command))
