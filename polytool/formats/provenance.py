"""Where an artifact came from: the keys polytool stamps into what it writes, and how they are computed.

    safetensors metadata (LoRA file, every dense shard, GGUF key-values):
        polytool.version         the polytool that wrote it
        polytool.source_sha256   SHA-256 of the Poly adapter's weights file (SHA_KEY)
        polytool.task            the task spec collapsed, canonical (TASK_KEY)
        polytool.n_tasks, polytool.routing (per module mixing weights, JSON)
        polytool.truncation      rank control asked for and kept per module (TRUNCATION_KEY)
        polytool.recipe          a `polytool merge` recipe: sources (with sha256), weights, method (RECIPE_KEY)
    polytool_tasks.json          the index of a `--task all` output (TASKS_INDEX)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .. import __version__
from ..core.lowrank import Truncation
from ..core.taskspec import TaskSpec
from .jsonfile import write_json

RECIPE_KEY = "polytool.recipe"
REQUEST_KEY = "polytool.request"


def sha256_file(file: str | Path) -> str:
    """SHA-256 of a file, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


TASKS_INDEX = "polytool_tasks.json"


# provenance keys in an artifact's safetensors metadata (LoRA file, every dense shard)
SHA_KEY, TASK_KEY = "polytool.source_sha256", "polytool.task"


TRUNCATION_KEY = "polytool.truncation"  # JSON: the rank control asked for, and per module what was kept


def provenance(adapter: Any, spec: TaskSpec, routing: bool = True, request: str | None = None) -> dict[str, str]:
    """safetensors metadata: format pt, and where these factors came from (routing: per-module weights)."""
    meta = {
        "format": "pt",
        "polytool.version": __version__,
        SHA_KEY: adapter.sha256,
        TASK_KEY: str(spec),
        "polytool.n_tasks": str(adapter.n_tasks),
    }
    if request is not None:  # the --task text as given, before any parsing: what verify checks the task against
        meta[REQUEST_KEY] = request
    if routing:
        weights = {m.name: adapter.spec_weights(m.name, spec).tolist() for m in adapter.modules}  # (q, s) each
        meta["polytool.routing"] = json.dumps(weights, separators=(",", ":"))
    return meta


def truncation_record(rank: int | None, energy: float | None, kept: dict[str, Truncation]) -> str:
    """TRUNCATION_KEY's value: {"rank": K, "energy": E, "modules": {module: [rank, energy, error]}}."""
    modules = {m: [t.rank, t.energy, t.error] for m, t in kept.items()}
    return json.dumps({"rank": rank, "energy": energy, "modules": modules}, separators=(",", ":"))


def write_tasks_index(directory: Path, adapter: Any, tasks: dict[str, str], **extra: str) -> None:
    """TASKS_INDEX of a `--task all` output: {task id: the file or directory written for it}."""
    write_json(directory / TASKS_INDEX, {"polytool_version": __version__, "source": str(adapter.directory),
                                         "source_sha256": adapter.sha256, "n_tasks": adapter.n_tasks, **extra,
                                         "tasks": tasks})
