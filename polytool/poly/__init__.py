"""Poly / MHR as a torch model, file-compatible with PEFT 0.21: config, router, layer, model.

Names are imported on first use, so `polytool.poly.config` (no torch) stays cheap to import.
"""
from __future__ import annotations

from importlib import import_module

_LAZY = {
    "PolyConfig": "config",
    "PolyRouter": "router",
    "PolyLayer": "layer",
    "Linear": "layer",
    "PolyModel": "model",
    "get_poly_model": "model",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
