"""polytool: Poly / MHR adapters, inspected, collapsed into plain LoRA or dense weights, verified.

The model API mirrors PEFT's Poly tuner (`PolyConfig`, `PolyModel`, `get_poly_model`, ...). Names
that need torch are imported on first use, so `import polytool` (and the CLI) stays fast.
"""
from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("polytool")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

# where the documentation lives (pyproject.toml's [project.urls] says the same): an installed package has no docs/
DOCS_URL = "https://github.com/polytool/polytool/blob/main/docs/"

# public name -> module that defines it
_LAZY = {
    "PolyConfig": "polytool.poly.config",
    "PolyRouter": "polytool.poly.router",
    "PolyLayer": "polytool.poly.layer",
    "Linear": "polytool.poly.layer",
    "PolyModel": "polytool.poly.model",
    "get_poly_model": "polytool.poly.model",
    "load_adapter": "polytool.formats.adapter",
    "PolyAdapter": "polytool.formats.adapter",
    "collapse_factors": "polytool.core.collapse",
    "PolytoolError": "polytool.errors",
}

__all__ = ["__version__", "DOCS_URL", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        if _LAZY[name].startswith("polytool.poly.") and name != "PolyConfig":  # the torch model (its config is not)
            from .extras import require

            require(f"polytool.{name}")
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'polytool' has no attribute {name!r}")
