"""Options several commands share, each declared once; and the packing of a command's options into the one
dataclass its library function takes."""
from __future__ import annotations

import functools
import importlib
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
revision_option = click.option("--revision", help="When the adapter argument is a Hugging Face hub id (org/name): the "
                               "branch, tag or commit to read (also org/name@REVISION; default main).")
force_option = click.option("--force", is_flag=True, help="Replace an existing output.")
out_option = click.option("--out", "out", required=True, type=click.Path(path_type=Path),
                          help="Output directory (written atomically).")
# the --dtype names; formats.safetensors.OUTPUT_DTYPES maps them (imported on use: numpy stays out of --help)
DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16", "q8_0")
dtype_option = click.option("--dtype", type=click.Choice(list(DTYPE_NAMES)), default="auto", show_default=True,
                            help="Output dtype (auto: float32 for a LoRA, the base's dtype for dense; q8_0: GGUF only, "
                                 "as llama.cpp's converter writes it).")


def dense_options(fn: Callable) -> Callable:
    """--max-shard-size / --untie, shared by collapse and merge (dense outputs)."""
    fn = click.option("--untie", is_flag=True, help="Dense: write a target tied to the embeddings (lm_head) as its "
                      "own weight.")(fn)
    return click.option("--max-shard-size", help="Dense: repack the shards to at most this size, e.g. 5GB (default: "
                        "the base's layout).")(fn)


def rank_options(fn: Callable) -> Callable:
    """--rank / --energy, shared by collapse and merge (docs/merge.md)."""
    fn = click.option("--energy", type=float, help="LoRA: per module, the smallest rank keeping this share of the "
                      "squared singular values, e.g. 0.99 (ranks may differ: rank_pattern).")(fn)
    return click.option("--rank", type=int, help="LoRA: the best rank-K approximation per module (truncated SVD).")(fn)


def packed(where: str, needs: str | None = None) -> Callable:
    """The command receives its options as one instance of the dataclass at `where` ("module:Class", imported
    when the command runs, so `polytool --help` stays light), and the rest (`as_json`) as keywords. `needs`:
    the command needs the torch extra, checked (one line naming it) before that module is imported."""
    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            if needs is not None:
                from ..extras import require

                require(needs)
            module, _, name = where.partition(":")
            options_class = getattr(importlib.import_module(module), name)
            values = {f.name: kwargs.pop(f.name) for f in fields(options_class) if f.name in kwargs}
            return fn(options_class(**values), **kwargs)
        return wrapper
    return decorate


def writes_output(where: str) -> Callable:
    """The tail every command that writes an output shares: --force, --json, the one error handler, and its
    options packed into the dataclass at `where` (see packed)."""
    from .render import handle_errors

    def decorate(fn: Callable) -> Callable:
        return force_option(json_option(handle_errors(packed(where)(fn))))
    return decorate
