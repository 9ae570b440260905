"""GGUF LoRA files (llama.cpp's format), through llama.cpp's own `gguf` package (the extra `polytool[gguf]`).

    general.architecture   the base's llama.cpp architecture ("llama", "qwen2", "phi3", ...)
    general.type           "adapter";  adapter.type "lora";  adapter.lora.alpha
    adapter.lora.task_name "task-<id>" (or uniform / mean)
    polytool.*             provenance (formats/provenance.py)
    <gguf name>.lora_a     (r, in)   numpy order; ggml shape [in, r]
    <gguf name>.lora_b     (out, r)  numpy order; ggml shape [r, out]

collapse/gguf.py writes them; `read_gguf_lora` reads a header back.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import PolytoolError

GGUF_DTYPES = ("F32", "F16", "BF16", "Q8_0")


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise PolytoolError("GGUF output needs llama.cpp's gguf package: pip install 'polytool[gguf]'") from None
    return gguf


# ---- reading a header back -----------------------------------------------------------------------


def read_gguf_lora(path: Path) -> dict:
    """A GGUF LoRA's header: {"arch", "alpha", "metadata": {polytool.* strings}, "tensors": {name: shape}}."""
    gguf = import_gguf()
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, KeyError, struct errors for a bad file
        raise PolytoolError(f"cannot read the GGUF file ({exc.__class__.__name__}: {exc})", path) from None

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    if value("general.type") != "adapter" or value("adapter.type") != "lora":
        raise PolytoolError(f"is not a GGUF LoRA adapter (general.type {value('general.type')!r}, "
                            f"adapter.type {value('adapter.type')!r})", path)
    metadata = {k: value(k) for k in reader.fields if k.startswith("polytool.")}
    tensors = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}  # numpy order
    return {"arch": value("general.architecture"), "alpha": value("adapter.lora.alpha"), "metadata": metadata,
            "tensors": tensors, "types": {t.name: t.tensor_type.name for t in reader.tensors}}

