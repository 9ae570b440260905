"""Generate docs/cli.md, the CLI reference, from polytool's Click commands.

    python docs/gen_cli.py            rewrite docs/cli.md
    python docs/gen_cli.py --check    exit 1 if docs/cli.md is out of date (tests/test_docs.py does this too)

Every command of `polytool.cli.main`: its usage line, its help text and a table of every option
(value, default, meaning), so the reference cannot drift from what `--help` says.
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path

import click

CLI_MD = Path(__file__).resolve().parent / "cli.md"
WIDTH = 100
INTRO = """# CLI reference

Generated from the Click commands by `python docs/gen_cli.py`; tests/test_docs.py fails when this
page is out of date. Every command prints data on stdout (`--json`: one JSON object) and messages
on stderr, and exits 0 when it succeeded, 1 when `verify` found a mismatch, 2 for a usage or input
error: one line naming the problem (docs/troubleshooting.md lists them all, with their fixes).
"""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _value(param: click.Parameter, ctx: click.Context) -> str:
    if isinstance(param, click.Option) and param.is_flag:
        return ""
    if isinstance(param.type, click.Choice):
        return ", ".join(f"`{c}`" for c in param.type.choices)
    return f"`{param.make_metavar(ctx)}`"


def _default(param: click.Option, ctx: click.Context) -> str:
    if param.required:
        return "required"
    if not param.show_default or param.is_flag:
        return ""
    return f"`{param.get_default(ctx)}`"


def _options(cmd: click.Command, ctx: click.Context) -> list[str]:
    rows = ["| option | value | default | meaning |", "| --- | --- | --- | --- |"]
    for param in cmd.get_params(ctx):
        if not isinstance(param, click.Option):
            continue
        names = ", ".join(f"`{name}`" for name in param.opts + param.secondary_opts)
        extra = " Repeatable." if param.multiple and "repeatable" not in (param.help or "") else ""
        rows.append(f"| {names} | {_value(param, ctx)} | {_default(param, ctx)} | {_cell(param.help or '')}{extra} |")
    return rows


def _section(cmd: click.Command, ctx: click.Context, title: str) -> list[str]:
    lines = [f"## `{title}`", "", "```", cmd.get_usage(ctx), "```", "", inspect.cleandoc(cmd.help or ""), ""]
    arguments = [p for p in cmd.get_params(ctx) if isinstance(p, click.Argument)]
    if arguments:
        shown = ", ".join(f"`{p.make_metavar(ctx)}`" + ("" if p.required else " (optional)") for p in arguments)
        lines += [f"Arguments: {shown}.", ""]
    return lines + _options(cmd, ctx) + [""]


def render() -> str:
    """docs/cli.md's content for the installed polytool."""
    from polytool.cli import main

    settings = {**main.context_settings, "max_content_width": WIDTH, "terminal_width": WIDTH}
    root = click.Context(main, info_name="polytool", **settings)
    lines = [INTRO] + _section(main, root, "polytool")
    for name, cmd in main.commands.items():  # in the order they are defined
        lines += _section(cmd, click.Context(cmd, info_name=name, parent=root), f"polytool {name}")
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        current = CLI_MD.read_text(encoding="utf-8") if CLI_MD.exists() else ""
        if current != text:
            print(f"{CLI_MD} is out of date: run python docs/gen_cli.py", file=sys.stderr)
            return 1
        return 0
    CLI_MD.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
