"""JSON files as transformers and PEFT read and write them (one parser, one writer for every format)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def parse_json(text: str | bytes) -> Any:
    """json.loads, with nesting too deep for Python's parser raised as a JSONDecodeError, not a RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text if isinstance(text, str) else "", 0) from None


def write_json(path: str | Path, obj: object) -> None:
    """JSON as transformers and PEFT write it (indent 2, sorted keys, trailing newline)."""
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
