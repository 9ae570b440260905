"""One place that renders command results and maps errors to exit codes.

Data goes to stdout (human text, or one JSON object with --json); progress, warnings and errors go
to stderr. Exit codes: 0 ok, 1 a verification found a mismatch, 2 a usage or input error.
"""
from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable, Iterable, Iterator, TypeVar

import click

from .errors import PolytoolError, VerificationError

EXIT_OK, EXIT_MISMATCH, EXIT_INPUT = 0, 1, 2
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


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library exceptions into short messages and exit codes (tracebacks only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        debug = bool((ctx.find_root().obj or {}).get("debug"))
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except PolytoolError as exc:
            if debug:
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_INPUT)
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
            click.echo(f"error: {exc.strerror or exc}{where} (rerun with --debug for a traceback)", err=True)
            ctx.exit(EXIT_INPUT)

    return wrapper
