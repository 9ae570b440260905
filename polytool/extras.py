"""The optional dependencies: what each extra of pyproject.toml brings, and the one check that names the extra
to install when a command or API needs what is missing. A leaf module (imports nothing heavy).

The core (inspect, collapse, merge, check) needs numpy, safetensors, click and huggingface_hub only;
verify, `polytool adapt` and the PolyModel API need torch and transformers: `pip install 'polytool[torch]'`.
"""
from __future__ import annotations

import gc
import importlib
import sys
from contextlib import contextmanager
from typing import Iterator

from .errors import PolytoolError

TORCH_EXTRA = ("torch", ("torch", "transformers"))  # the extra's name, the modules it brings


class MissingExtraError(PolytoolError, ImportError):
    """An optional dependency is not installed: exit 2 on the command line, an ImportError in Python."""


def require(what: str, extra: tuple[str, tuple[str, ...]] = TORCH_EXTRA) -> None:
    """Raise MissingExtraError naming the extra when any of its modules cannot be imported."""
    name, modules = extra
    with collector_paused():  # the check imports them: torch and transformers, the first time
        missing = [m for m in modules if not _importable(m)]
    if missing:
        raise MissingExtraError(f"{what} needs {' and '.join(missing)}, not installed: pip install 'polytool[{name}]'")


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


# modules whose first import inside `collector_paused` freezes what it made (gc.freeze), where FREEZE
FROZEN_AFTER = ("torch", "transformers")
# set where polytool is the program (cli/__init__.py, not in-process calls): the process is its own, so what the
# imports made may be frozen; a library call leaves its host process's collector as it found it
FREEZE = False


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused inside: for the imports of torch and transformers (and a model's
    module), which make about a million objects that live until exit. With the collector on, each full
    collection on the way scans every object made so far: 6 of them took 1.2 s of a 4.5 s import on the
    benchmark box (docs/performance.md). Where polytool is the program (FREEZE) and torch or transformers was
    first imported inside, what exists then is frozen after (gc.freeze: later collections skip it; it is the
    modules' for the rest of the run). Reference counting frees everything else as usual; a no-op where the
    collector is already off."""
    if not gc.isenabled():
        yield
        return
    new = [name for name in FROZEN_AFTER if name not in sys.modules]
    gc.disable()
    try:
        yield
    finally:
        if FREEZE and any(name in sys.modules for name in new):
            gc.freeze()
        gc.enable()
