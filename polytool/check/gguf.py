"""`polytool check X.gguf --for llama.cpp`: preflight of a GGUF LoRA file for llama.cpp (and Ollama).

What llama.cpp's adapter loader (src/llama-adapter.cpp, as vendored by llama-cpp-python 0.3.36) refuses or
does with a GGUF LoRA, one finding per rule (the statuses of rules.py): the file type, the alpha, every
lora_a with its lora_b of the same rank, the tensor types it reads, and with a base (`--base BASE.gguf`, or a
transformers directory for its architecture only) the architecture and each adapted tensor's shape.
Reads headers only, through llama.cpp's gguf package (polytool[gguf]). No torch.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..architectures import GGUF_ARCHITECTURES
from ..errors import PolytoolError
from ..formats.base import read_config, require_dir
from ..formats.gguf import import_gguf, read_gguf_lora
from .rules import SOURCES, Finding, _ok

TYPES = ("F32", "F16", "BF16", "Q8_0")  # what llama.cpp's converter writes for a LoRA (--outtype)


def _pairs(tensors: dict[str, tuple[int, ...]]) -> Finding:
    behaviour = "every <tensor>.lora_a needs its .lora_b of the same rank: llama.cpp refuses the adapter otherwise"
    bad = []
    for name, a in tensors.items():
        if name.endswith(".lora_a"):
            b = tensors.get(name[: -len("a")] + "b")
            if b is None or len(a) != 2 or len(b) != 2 or a[0] != b[1]:
                bad.append(f"{name} {list(a)} / lora_b {list(b) if b else 'missing'}")
    orphans = [n for n in tensors if n.endswith(".lora_b") and n[: -len("b")] + "a" not in tensors]
    if bad or orphans or not tensors:
        what = "; ".join(bad + [f"{n} has no lora_a" for n in orphans]) or "no tensors"
        return Finding("pairs", "problem", behaviour, what, "rewrite it: polytool collapse ... --to gguf")
    return _ok("pairs", behaviour, f"{len(tensors) // 2} lora_a/lora_b pairs")


def _alpha(alpha) -> Finding:
    behaviour = "scale = alpha / r when adapter.lora.alpha is set; without it the LoRA is applied unscaled"
    if alpha is None:
        return Finding("alpha", "warning", behaviour, "no adapter.lora.alpha", "set it to the LoRA's lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        return Finding("alpha", "problem", behaviour, f"adapter.lora.alpha {alpha!r}", "set a finite number")
    return _ok("alpha", behaviour, f"adapter.lora.alpha {alpha:g}")


def _types(types: dict[str, str]) -> Finding:
    behaviour = f"llama.cpp's converter writes LoRAs as {', '.join(TYPES)}; other types are untested here"
    odd = sorted({t for t in types.values() if t not in TYPES})
    if odd:
        return Finding("dtype", "warning", behaviour, f"tensor types {', '.join(odd)}", "convert with --outtype f16")
    return _ok("dtype", behaviour, f"stored {', '.join(sorted(set(types.values())))}")


def _base_gguf(path: Path) -> tuple[str | None, dict[str, tuple[int, ...]]]:
    gguf = import_gguf()
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, KeyError, struct errors for a bad file
        raise PolytoolError(f"cannot read the GGUF file ({exc.__class__.__name__}: {exc})", path) from None
    field = reader.fields.get("general.architecture")
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}  # numpy order
    return (None if field is None else field.contents()), shapes


def _base_facts(base: Path) -> tuple[str | None, dict[str, tuple[int, ...]] | None]:
    """(llama.cpp architecture, tensor shapes or None) of --base: a GGUF file, or a transformers directory."""
    if base.is_file():
        return _base_gguf(base)
    config = read_config(require_dir(base, "base model directory"))
    classes = config.get("architectures") if isinstance(config.get("architectures"), list) else [None]
    entry = GGUF_ARCHITECTURES.get(classes[0] if classes else None)  # HF class -> (MODEL_ARCH name, permute)
    gguf = import_gguf()
    return (gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, entry[0])] if entry else None), None


def _against_base(header: dict, base: Path | None) -> list[Finding]:
    arch_behaviour = "the adapter's general.architecture must be the base model's: llama.cpp refuses a mismatch"
    shape_behaviour = "each adapted tensor must exist in the base with shape (out, in) = (lora_b rows, lora_a columns)"
    if base is None:
        return [Finding("architecture", "skipped", arch_behaviour, f"{header['arch']}; pass --base BASE.gguf to compare"),
                Finding("shapes", "skipped", shape_behaviour, "pass --base BASE.gguf")]
    arch, shapes = _base_facts(base)
    found = [Finding("architecture", "ok" if arch == header["arch"] else "problem", arch_behaviour,
                     f"adapter {header['arch']}, base {arch}")]
    if shapes is None:
        return found + [Finding("shapes", "skipped", shape_behaviour, "the base is not a GGUF file")]
    tensors, bad = header["tensors"], []
    for name, a in tensors.items():
        if name.endswith(".lora_a") and (b := tensors.get(name[: -len("a")] + "b")):
            target = shapes.get(name[: -len(".lora_a")])
            if target != (b[0], a[1]):
                bad.append(f"{name[: -len('.lora_a')]}: base {list(target) if target else 'missing'}, LoRA {[b[0], a[1]]}")
    status, detail = ("problem", "; ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")) if bad \
        else ("ok", "every adapted tensor fits the base")
    return found + [Finding("shapes", status, shape_behaviour, detail)]


def check_gguf(path: str | Path, stack: str, base: str | Path | None = None) -> dict:
    """The report (rules.py's shape) for the GGUF LoRA file `path` served by llama.cpp."""
    path = Path(path)
    if stack != "llama.cpp":
        raise PolytoolError(f"a GGUF LoRA is for llama.cpp (and Ollama): --for llama.cpp, not --for {stack}", path)
    header = read_gguf_lora(path)
    findings = [_alpha(header["alpha"]), _pairs(header["tensors"]), _types(header["types"])]
    findings += _against_base(header, None if base is None else Path(base))
    counts = {s: sum(x.status == s for x in findings) for s in ("problem", "flag", "warning", "skipped")}
    return {"adapter": str(path), "stack": stack, "base": None if base is None else str(base),
            "ready": counts["problem"] == 0, "source": SOURCES[stack],
            "findings": [vars(x) for x in findings], "summary": counts}
