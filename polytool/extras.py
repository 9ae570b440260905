"""The optional dependencies: what each extra of pyproject.toml brings, and the one check that names the extra
to install when a command or API needs what is missing. A leaf module (imports nothing heavy).

The core (inspect, collapse, merge, check) needs numpy, safetensors, click and huggingface_hub only;
verify, `polytool adapt` and the PolyModel API need torch and transformers: `pip install 'polytool[torch]'`.
"""
from __future__ import annotations

import importlib

from .errors import PolytoolError

TORCH_EXTRA = ("torch", ("torch", "transformers"))  # the extra's name, the modules it brings


class MissingExtraError(PolytoolError, ImportError):
    """An optional dependency is not installed: exit 2 on the command line, an ImportError in Python."""


def require(what: str, extra: tuple[str, tuple[str, ...]] = TORCH_EXTRA) -> None:
    """Raise MissingExtraError naming the extra when any of its modules cannot be imported."""
    name, modules = extra
    missing = [m for m in modules if not _importable(m)]
    if missing:
        raise MissingExtraError(f"{what} needs {' and '.join(missing)}, not installed: pip install 'polytool[{name}]'")


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
