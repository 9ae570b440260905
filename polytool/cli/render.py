"""One place that renders command results and maps errors to exit codes.

Data goes to stdout (human text, or one JSON object with --json); progress, warnings and errors go
to stderr. Exit codes: 0 ok, 1 a verification found a mismatch, 2 a usage or input error, 3 an internal error
(a bug in polytool: never 1, which a CI job reads as "mismatch"). With --json, stdout carries one JSON
object even on an error: {"error": message, "exit_code": N, "kind": "input" | "internal"}.
"""
from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable, Iterable, Iterator, TypeVar

import click

from ..errors import PolytoolError, VerificationError

EXIT_OK, EXIT_MISMATCH, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
T = TypeVar("T")


def result(data: dict, as_json: bool, render: Callable[[dict], str]) -> None:
    """Print a command's result: `render(data)` for people, or `data` as JSON for machines."""
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=False, allow_nan=False))
    else:
        click.echo(render(data))


def warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def info(message: str) -> None:
    click.echo(message, err=True)


def progress(items: Iterable[T], total: int | None, label: str) -> Iterator[T]:
    """A progress bar on stderr when stderr is a terminal; otherwise the items unchanged."""
    if not sys.stderr.isatty():
        yield from items
        return
    with click.progressbar(items, length=total, label=label, file=sys.stderr) as bar:
        yield from bar


def _fail(ctx: click.Context, as_json: bool, prefix: str, message: str, code: int, kind: str) -> None:
    """One line on stderr; with --json also the error object on stdout; then exit `code`."""
    click.echo(f"{prefix}{message}", err=True)
    if as_json:
        click.echo(json.dumps({"error": message, "exit_code": code, "kind": kind}))
    ctx.exit(code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library exceptions into short messages and exit codes (tracebacks only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        debug = bool(kwargs.pop("debug", False)) or bool((ctx.find_root().obj or {}).get("debug"))
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except PolytoolError as exc:
            if debug:
                raise
            _fail(ctx, as_json, "error: ", str(exc), EXIT_INPUT, "input")
        except VerificationError as exc:
            if debug:
                raise
            click.echo(f"FAIL: {exc}", err=True)
            ctx.exit(EXIT_MISMATCH)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except OSError as exc:  # the system refused something polytool did not foresee: still one line
            if debug:
                raise
            where = f": {exc.filename}" if exc.filename else ""
            _fail(ctx, as_json, "error: ", f"{exc.strerror or exc}{where} (rerun with --debug for a traceback)",
                  EXIT_INPUT, "input")
        except Exception as exc:  # a bug: never exit 1, which means "mismatch"
            if debug:
                raise
            first = (str(exc).strip().splitlines() or [""])[0]
            _fail(ctx, as_json, "internal error: ", f"{type(exc).__name__}: {first} (rerun with --debug for the "
                  "traceback)", EXIT_INTERNAL, "internal")

    # --debug after the subcommand too (`polytool verify DIR --debug`), as well as before it
    return click.option("--debug", is_flag=True, help="Show tracebacks for errors.")(wrapper)


def render_truncation(kept: list[dict] | None) -> list[str]:
    if not kept:
        return []
    lo, hi, worst = min(t["rank"] for t in kept), max(t["rank"] for t in kept), max(kept, key=lambda t: t["error"])
    return [f"  rank {lo if lo == hi else f'{lo}-{hi}'} ({len(kept)} modules); retained energy >= {min(t['energy'] for t in kept):.6f}; relative error "
            f"max {worst['error']:.3e} ({worst['module']}), mean {sum(t['error'] for t in kept) / len(kept):.3e}"]
