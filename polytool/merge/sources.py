"""The sources of a merge: `DIR:TASK` (a Poly/MHR adapter's task, collapsed through the one formula) or `DIR`
(a plain PEFT LoRA, read by formats/lora.py: rank_pattern, alpha_pattern and rslora resolved). Each gives,
per module, factors B (out, r) and A (r, in) in float64 with the scale folded in: D = B @ A."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.collapse import collapse_factors
from ..core.taskspec import parse_task_spec, spec_label
from ..errors import AdapterError, PolytoolError
from ..formats.hub import is_repo_id, local_or_hub, split_revision
from ..formats.adapter_dir import WEIGHTS_NAME, peft_type
from ..formats.provenance import sha256_file


@dataclass(frozen=True)
class Module:
    """One adapted module, as match_targets wants it."""

    name: str
    in_features: int
    out_features: int


@dataclass
class Source:
    """One source: per module, factors B (out, r) and A (r, in), float64, with D = B @ A (scale folded in)."""

    text: str  # as given
    kind: str  # "poly" or "lora"
    directory: Path
    sha256: str
    task: str | None  # a Poly source's task spec, canonical
    modules: dict[str, tuple[int, int]]  # name -> (in, out)
    config: dict
    factors: Callable[[str], tuple[np.ndarray, np.ndarray]] = field(repr=False)

    def record(self) -> dict:
        """The recipe's record of this source: `path` is absolute, so `from_recipe` finds it from anywhere."""
        return {"source": self.text, "kind": self.kind, "path": str(Path(self.directory).resolve()),
                "sha256": self.sha256, "task": self.task}


def _open_poly(directory: Path, cache: dict) -> tuple:
    """(adapter, module -> (poly_A, poly_B)): one adapter read once however many of its tasks are sources,
    and the last module's skills kept, since sources are combined module by module."""
    from ..formats.adapter import load_adapter
    from ..collapse.fit import check_collapsible

    key = directory.resolve()
    if key not in cache:
        adapter = load_adapter(directory)
        check_collapsible(adapter)
        last: dict = {}

        def skills(name: str) -> tuple[np.ndarray, np.ndarray]:
            if name not in last:
                last.clear()
                last[name] = (adapter.poly_A(name), adapter.poly_B(name))  # (q, s, in/q, r), (q, s, r, out/q)
            return last[name]

        cache[key] = (adapter, skills)
    return cache[key]


def _poly_source(text: str, directory: Path, task: str, cache: dict) -> Source:

    adapter, skills = _open_poly(directory, cache)
    spec = parse_task_spec(task, adapter.n_tasks)

    def factors(name: str) -> tuple[np.ndarray, np.ndarray]:
        A, B = collapse_factors(*skills(name), adapter.spec_weights(name, spec))  # (in, r), (r, out)
        return B.T / adapter.r, A.T  # (out, r), (r, in): the update x @ A @ B / r

    label = str(spec) if isinstance(spec, int) else spec_label(spec)
    return Source(text, "poly", adapter.directory, adapter.sha256, label,
                  {m.name: (m.in_features, m.out_features) for m in adapter.modules}, adapter.config, factors)


def _lora_source(text: str, directory: Path) -> Source:
    from ..formats.lora import read_lora

    if peft_type(directory) == "POLY":
        raise AdapterError("is a Poly/MHR adapter: name a task, e.g. DIR:0 or DIR:1:0.7,3:0.3", directory)
    lora = read_lora(directory)
    if lora.biases or lora.saved:
        raise AdapterError("carries lora_bias or modules_to_save tensors: a merge combines the LoRA deltas only", directory)

    def factors(name: str) -> tuple[np.ndarray, np.ndarray]:
        A, B = lora.weights[name]  # (r, in), (out, r)
        return B.astype(np.float64) * lora.scalings[name], A.astype(np.float64)

    modules = {m: (A.shape[1], B.shape[0]) for m, (A, B) in lora.weights.items()}
    return Source(text, "lora", directory, sha256_file(directory / WEIGHTS_NAME), None, modules, lora.config, factors)


def parse_source(text: str, cache: dict | None = None) -> Source:
    """'DIR' (a LoRA directory) or 'DIR:TASK' (a Poly/MHR adapter and a task spec) -> Source.
    DIR is the longest prefix before a ':' that is a directory, so paths may hold ':' too; else a hub id
    (`org/name`, `org/name@rev`, then `:TASK`), read from the Hugging Face cache or downloaded."""
    if Path(text).is_dir():
        return _lora_source(text, Path(text))
    cuts = [i for i, c in enumerate(text) if c == ":"]
    for cut in reversed(cuts):
        if Path(text[:cut]).is_dir():
            return _poly_source(text, Path(text[:cut]), text[cut + 1 :], {} if cache is None else cache)
    repo, colon, task = text.partition(":")  # a hub id holds no ':'; here it names its owner (org/name)
    if "/" in repo and is_repo_id(split_revision(repo)[0]):
        directory = local_or_hub(repo, None, "adapter directory")  # org/name[@rev]: its cached or downloaded snapshot
        return _poly_source(text, directory, task, {} if cache is None else cache) if colon else _lora_source(text, directory)
    raise PolytoolError(f"source {text!r}: no such directory (a source is a LoRA directory, "
                        "or a Poly/MHR adapter directory and a task, ADAPTER_DIR:TASK)")
