"""Exceptions the library raises; the CLI maps them to exit codes in one place (output.py).

No torch import here: every command, including the torch-free ones, needs these.
"""
from __future__ import annotations

from pathlib import Path


class PolytoolError(Exception):
    """A problem with the user's input or request: exit code 2, one line, no traceback."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class AdapterError(PolytoolError):
    """An adapter directory that is missing, malformed or inconsistent."""


class CheckpointError(PolytoolError):
    """A base model directory or safetensors file that cannot be used."""


class ConvertedWeightError(CheckpointError):
    """A module's weight that transformers builds from the checkpoint in a way a dense merge cannot place (experts
    stacked from many keys, rows permuted): the module is in the model, so a LoRA still adapts it."""


class OutputExistsError(PolytoolError):
    """The output path exists and --force was not given."""


class VerificationError(Exception):
    """A verification ran and found a mismatch: exit code 1."""
