"""Sizes in bytes, read from the command line and shown to people (one parser, one formatter)."""
from __future__ import annotations

import re

from ..errors import PolytoolError


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'100MB', '2GB', '500MiB', or a number of bytes -> bytes (decimal units, as transformers)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(text).upper())
    if not match or float(match.group(1)) <= 0:
        raise PolytoolError(f"invalid size {text!r}: expected e.g. 500MB, 2GB, 1GiB or a number of bytes")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2) or ""])


def human_size(n: int) -> str:
    """Bytes as text: KB under 0.1 MB, MB under 1 GB, else GB."""
    if n < 100_000:
        return f"{n / 1e3:.1f} KB"
    return f"{n / 1e6:.1f} MB" if n < 10**9 else f"{n / 1e9:.2f} GB"


def plural(n: int, word: str) -> str:
    """'1 file', '7 files': a count and its noun, as people write them."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
