"""Multi-LoRA serving manifests for `collapse --task all`: the lines users paste into each stack.

Written as OUT/serving.json (machine-readable) and OUT/SERVING.md, and returned so the command
prints them. Adapters are named task-<id>, paths are absolute (the final OUT, not the temporary
directory being written). The syntax of each line is documented in docs/serving.md with the
version it was read from:

    vLLM       vllm serve BASE --enable-lora --max-lora-rank R --max-loras N --lora-modules task-0=PATH ...
               (and the JSON form --lora-modules '{"name": ..., "path": ..., "base_model_name": ...}')
    TGI        LORA_ADAPTERS=task-0=PATH,task-1=PATH     (request: "parameters": {"adapter_id": "task-0"})
    llama.cpp  llama-server -m BASE.gguf --lora PATH.gguf ... --lora-init-without-apply
    Ollama     one Modelfile per task: FROM BASE / ADAPTER PATH.gguf
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from .. import DOCS_URL
from .adapter import PolyAdapter
from .jsonfile import write_json

MANIFEST_JSON, MANIFEST_MD = "serving.json", "SERVING.md"
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's MaxLoRARanks (vllm/config/lora.py)


def vllm_max_lora_rank(r: int) -> int | None:
    """The smallest --max-lora-rank vLLM accepts that fits rank r (None: above every allowed value)."""
    return next((v for v in VLLM_RANKS if v >= r), None)


def build_manifest(out: Path, adapter: PolyAdapter, tasks: dict[str, str], kind: str) -> dict:
    """{stack: {"lines": [...], ...}} for `tasks` ({task id: file or directory name under out})."""
    root = out.absolute()
    base = adapter.base_model_name_or_path or "BASE_MODEL"
    named = {f"task-{t}": str(root / sub) for t, sub in tasks.items()}
    if kind == "gguf":
        loras = " ".join(f"--lora {shlex.quote(p)}" for p in named.values())
        ids = ", ".join(f"{i}={name}" for i, name in enumerate(named))
        return {
            "llama.cpp": {"lines": [f"llama-server -m BASE.gguf {loras} --lora-init-without-apply"],
                          "note": f"select one per request: \"lora\": [{{\"id\": N, \"scale\": 1.0}}] with {ids}"},
            "ollama": {"lines": [f"FROM BASE\nADAPTER {p}" for p in named.values()],
                       "note": "one Modelfile per task; `ollama create <name> -f Modelfile`"},
        }
    rank = vllm_max_lora_rank(adapter.r)
    modules = " ".join(f"{name}={shlex.quote(p)}" for name, p in named.items())
    as_json = " ".join(shlex.quote(json.dumps({"name": name, "path": p, "base_model_name": base}))
                       for name, p in named.items())
    flags = f"--enable-lora --max-lora-rank {rank} --max-loras {len(named)}"
    return {
        "vllm": {"lines": [f"vllm serve {shlex.quote(base)} {flags} --lora-modules {modules}",
                           f"vllm serve {shlex.quote(base)} {flags} --lora-modules {as_json}"],
                 "note": "request with \"model\": \"task-<id>\""},
        "tgi": {"lines": ["LORA_ADAPTERS=" + ",".join(f"{name}={p}" for name, p in named.items())],
                "note": "request with \"parameters\": {\"adapter_id\": \"task-<id>\"}"},
    }


def render_manifest(manifest: dict) -> str:
    lines = []
    for stack, entry in manifest.items():
        lines.append(f"{stack}:")
        lines += [f"  {line}" for text in entry["lines"] for line in text.splitlines()]
        lines.append(f"  ({entry['note']})")
    return "\n".join(lines)


def write_manifest(directory: Path, out: Path, adapter: PolyAdapter, tasks: dict[str, str], kind: str) -> dict:
    """Write serving.json and SERVING.md into `directory` (the output being written, later `out`)."""
    manifest = build_manifest(out, adapter, tasks, kind)
    write_json(directory / MANIFEST_JSON, manifest)
    text = f"# Serving these LoRAs\n\nWritten by polytool; {DOCS_URL}serving.md explains each line.\n\n```\n"
    (directory / MANIFEST_MD).write_text(text + render_manifest(manifest) + "\n```\n", encoding="utf-8",
                                         errors="backslashreplace")
    return manifest
