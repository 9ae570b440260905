"""Recognising what `verify --against` was given: a LoRA directory, a `collapse --task all` directory or
a dense model directory, each checked to come from this adapter; one Target per thing to compare."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..formats.adapter import PolyAdapter
from ..formats.base import require_dir
from ..formats.jsonfile import parse_json
from ..errors import AdapterError, CheckpointError, PolytoolError
from ..formats.provenance import RECIPE_KEY, REQUEST_KEY, SHA_KEY, TASK_KEY, TASKS_INDEX
from ..formats.lora import LoraArtifact, read_lora
from .models import stored_dtype, utf8_path, why
from .names import checkpoint_name
from .reference import ReferenceAdapter, routing_spec

Spec = Any  # a task spec under test, verify's own canonical form: an int, "uniform", "mean" or "1:0.7,3:0.3"


def spec_under_test(text: Any, n_tasks: int) -> Spec:
    """A task spec as the user wrote it, parsed by verify's own parser (the reference's, never the product's):
    an int, "uniform", "mean", or a mix as canonical text "t:c,t:c" (coefficients normalised, tasks ascending)."""
    try:
        spec = routing_spec(str(text), n_tasks)
    except PolytoolError:
        raise PolytoolError(f"task {text!r} is not a task spec of this adapter: expected a task id in [0, {n_tasks}), "
                            "uniform, mean or a mix such as 1:0.7,3:0.3") from None
    if isinstance(spec, dict):
        return ",".join(f"{t}:{c!r}" for t, c in spec.items())
    return spec


def _same_spec(a: Spec, b: Spec, n_tasks: int) -> bool:
    """Two specs give the same routing (a mix's coefficients compared to within float rounding)."""
    if isinstance(a, str) and isinstance(b, str) and ":" in a and ":" in b:
        x, y = routing_spec(a, n_tasks), routing_spec(b, n_tasks)
        return x.keys() == y.keys() and all(abs(x[t] - y[t]) <= 1e-12 for t in x)
    return a == b


@dataclass
class Target:
    """One thing to compare with the routed model for one task spec."""

    spec: Spec
    kind: str  # "lora" or "dense"
    label: str  # the artifact's path, or "<in memory>" for the self-check
    dtype: str  # the dtype the artifact stores its weights in
    path: Path | None = None  # a dense model directory
    lora: LoraArtifact | None = None
    notes: list[str] = field(default_factory=list)
    weights: dict[str, Any] | None = None  # a dense artifact's weight-space check (weights.py)
    recipe: dict | None = None  # a `polytool merge` output: its recipe (spec is then "merge:<hash>")
    ideal: bool | None = None  # the self-check's dense weights all equal the ideal rounding (compared as made)
    problem: str | None = None  # a reason it fails whatever its outputs (a recorded task that was not asked)
    whole: bool = False  # a dense artifact loaded as itself (its config differs from the base's), not swapped in
    truncation: dict | None = None  # a truncated merge LoRA: per module its error beside the optimum (truncation.py)
    reference: Any = None  # a merge's recomputed recipe (reference_merge.ReferenceRecipe), built once
    proof: str = ""  # which proof applies to it, for the report

    def __post_init__(self):
        if not self.proof:
            self.proof = proof_of(self)


def proof_of(target: "Target") -> str:
    """The line of the report that says how this artifact is proven."""
    if target.label == "<in memory>":
        return ("self-check: the product's collapse in memory, forward against the reference"
                + (" (weights compared with the ideal rounding)" if target.kind == "dense" else ""))
    if target.recipe is None:
        return ("weight space (every tensor, 1 ulp) + forward against the routed reference" if target.kind == "dense"
                else "forward: the LoRA applied as PEFT applies it, against the routed reference")
    method = target.recipe.get("method")
    head = f"merge recipe recomputed ({method}; sources re-read, sha256 checked)"
    if target.kind == "dense":
        return head + " + weight space (every tensor) + forward"
    if target.recipe.get("rank") is not None or target.recipe.get("energy") is not None:
        return head + " + rank optimality per module (error vs the Eckart-Young optimum) + forward against the best rank-k"
    return head + " + forward: the LoRA applied as PEFT applies it"




def _recipe_spec(where: Path, metadata: dict) -> tuple[str, dict] | None:
    """("merge:<hash>", recipe) for a `polytool merge` artifact, else None."""
    import hashlib

    text = metadata.get(RECIPE_KEY)
    if text is None:
        return None
    try:
        recipe = parse_json(text)
    except ValueError:
        recipe = None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("sources"), list):
        raise PolytoolError(f"its {RECIPE_KEY} metadata is not a merge recipe", where)
    _check_recipe(where, recipe)
    return "merge:" + hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8], recipe


def _check_recipe(where: Path, recipe: dict) -> None:
    """The recipe's fields, as `polytool merge` writes them: an artifact's metadata is untrusted input."""
    import math

    sources, weights = recipe["sources"], recipe.get("weights")
    fields_ok = all(isinstance(s, dict) and isinstance(s.get("path"), str) and isinstance(s.get("sha256"), str)
                    and s.get("kind") in ("poly", "lora") and isinstance(s.get("task"), (str, type(None)))
                    for s in sources)
    if not sources or not fields_ok:
        raise PolytoolError(f"its {RECIPE_KEY} metadata: sources must be a non-empty list of objects with a path, "
                            "a sha256, a kind (poly or lora) and a task", where)
    numbers = isinstance(weights, list) and all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                and math.isfinite(w) for w in weights)
    if not numbers or len(weights) != len(sources):
        raise PolytoolError(f"its {RECIPE_KEY} metadata: weights must be {len(sources)} finite numbers, one per "
                            "source", where)
    if not isinstance(recipe.get("method"), str):
        raise PolytoolError(f"its {RECIPE_KEY} metadata: method must be a name", where)


def _check_source(where: Path, sha: Any, adapter: PolyAdapter) -> None:
    """An artifact whose provenance names another adapter's sha256 does not belong here."""
    if sha is not None and sha != adapter.sha256:
        raise PolytoolError(f"was collapsed from another adapter (provenance sha256 {str(sha)[:12]}, this adapter's "
                            f"{adapter.weights_file.name} has {adapter.sha256[:12]})", where)


def _task_of(where: Path, metadata: dict, adapter: PolyAdapter, override: str | None,
             given_by: str = "--task") -> tuple[Spec, list[str], str | None]:
    """The task an artifact is checked as, and a problem if its provenance disagrees: the task the user asked
    for (--task, else the request polytool recorded as the user typed it, before parsing), parsed by verify's
    own parser; the recorded task only where neither is there. The artifact must come from `adapter`."""
    _check_source(where, metadata.get(SHA_KEY), adapter)
    recorded, request = metadata.get(TASK_KEY), metadata.get(REQUEST_KEY)
    if request == "all":  # one file of a --task all output: its folder's index says which task it is
        request = None
    asked, notes = (override, given_by) if override is not None else (request, "the request it records")
    if asked is None:
        if recorded is None:
            raise PolytoolError("has no polytool provenance (made elsewhere?): pass --task to say which task it holds",
                                where)
        asked, notes = recorded, "its provenance (pass --task to check it holds the task you asked for)"
    try:
        spec = spec_under_test(asked, adapter.n_tasks)
        held = None if recorded is None else spec_under_test(recorded, adapter.n_tasks)
    except PolytoolError as exc:
        raise PolytoolError(f"task: {exc.message}", where) from None
    problem = None
    if held is not None and not _same_spec(spec, held, adapter.n_tasks):
        problem = f"its provenance says it holds task {recorded}, but task {asked} was asked ({notes})"
    return spec, [f"task {spec} from {notes}"] if override is None and request is None else [], problem


def _lora_target(path: Path, adapter: PolyAdapter, override: str | None, given_by: str = "--task") -> Target:
    lora = read_lora(path)
    merged = _recipe_spec(path, lora.metadata)
    if merged is not None:  # modules and shapes are checked against the base and the config when applied
        recipe = merged[1]
        notes = [f"truncated (--rank {recipe.get('rank')} / --energy {recipe.get('energy')}): each module's error from "
                 "the exact merge is judged against the best any LoRA of its rank can do, and the forward against that "
                 "best rank-k approximation"] if recipe.get("rank") is not None or recipe.get("energy") is not None else []
        return Target(merged[0], "lora", str(path), lora.dtype, lora=lora, recipe=recipe, notes=notes)
    spec, notes, problem = _task_of(path, lora.metadata, adapter, override, given_by)
    modules = {m.name: m for m in adapter.modules}
    if set(lora.weights) != set(modules):
        extra, missing = sorted(set(lora.weights) - set(modules)), sorted(set(modules) - set(lora.weights))
        raise AdapterError(f"targets other modules than the adapter (extra: {extra[:2]}, missing: {missing[:2]})", path)
    for name, (A, B) in lora.weights.items():
        want = ((A.shape[0], modules[name].in_features), (modules[name].out_features, A.shape[0]))
        if (A.shape, B.shape) != want:
            raise AdapterError(f"module {name!r}: lora_A {list(A.shape)} / lora_B {list(B.shape)}, but the adapter "
                               f"collapses to {list(want[0])} / {list(want[1])}", path)
    return Target(spec, "lora", str(path), lora.dtype, lora=lora, notes=notes, problem=problem)


def _dense_target(path: Path, adapter: PolyAdapter, base_dir: Path, override: str | None) -> Target:
    from ..formats.base import match_targets, open_base

    dense, base = open_base(path, checkpoint_name), open_base(base_dir, checkpoint_name)
    if dense.model_type != base.model_type:
        raise CheckpointError(f"is a {dense.model_type!r} model, the base a {base.model_type!r} one", path)
    carried = ReferenceAdapter(adapter.directory)  # the gate's own reading of what the adapter carries whole
    for key, info in base.tensors.items():
        got = dense.tensors.get(key)
        resized = got is not None and carried.whole_shape(key) == tuple(got.shape)  # a resized vocabulary
        if (got is None or got.shape != info.shape) and not resized:
            shown = "missing" if got is None else f"of shape {list(got.shape)}"
            raise CheckpointError(f"does not belong to this base: tensor {key!r} is {shown}, "
                                  f"the base's is {list(info.shape)}", path)
    written = {t.key for t in match_targets(dense, adapter.modules, untie=True)}  # every adapted weight, its shape
    extra = sorted(set(dense.tensors) - set(base.tensors) - written)
    if extra:
        raise CheckpointError(f"holds tensor {extra[0]!r}, which the base does not have: not a merge into this "
                              "base", path)
    config_notes = _config_differences(dense, base, written - set(base.tensors))
    metadata = {}
    for shard in dense.shards:
        metadata.update({k: v for k, v in dense.shard_metadata[shard].items() if k.startswith("polytool.")})
    merged = _recipe_spec(path, metadata)
    whole = bool(config_notes)
    if merged is not None:
        return Target(merged[0], "dense", str(path), stored_dtype(path), path=utf8_path(path), recipe=merged[1],
                      notes=config_notes, whole=whole)
    spec, notes, problem = _task_of(path, metadata, adapter, override)
    return Target(spec, "dense", str(path), stored_dtype(path), path=utf8_path(path), notes=config_notes + notes,
                  problem=problem, whole=whole)


# config.json fields a dense merge may change (and what they must then say)
MERGE_MAY_CHANGE = ("tie_word_embeddings", "dtype", "torch_dtype")


def _config_differences(dense: Any, base: Any, untied: set[str]) -> list[str]:
    """Notes where the artifact's config.json is not the base's: fields a merge may change must say what the
    artifact holds (tie_word_embeddings false only where a tied weight was written apart; the dtype its weights
    are stored in); any other difference means the base's model is not the artifact's, so it is loaded as
    itself (the notes say so) instead of having its weights swapped into the base."""
    def flat(config: dict) -> dict:
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        return {**{k: v for k, v in config.items() if k != "text_config"},
                **{f"text_config.{k}": v for k, v in text.items()}}

    a, b = flat(dense.config), flat(base.config)
    changed = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    may = {k for k in changed if k.rpartition(".")[2] in MERGE_MAY_CHANGE}
    bad = [k for k in changed if k not in may]
    stored = stored_dtype(dense.directory)
    for key in may:
        value = a.get(key)
        if key.endswith("tie_word_embeddings") and not (value is False and untied):
            bad.append(key)
        elif key.endswith("dtype") and value != stored:
            bad.append(key)
    if not bad:
        return []
    return [f"config.json differs from the base's in {', '.join(sorted(bad))}: loaded as itself, not swapped into "
            "the base"]


def _task_dirs(path: Path, adapter: PolyAdapter, override: str | None) -> list[Target]:
    """A `collapse --task all` directory: one LoRA per task of the adapter, every one of them present and
    listed in its index file, each holding the task the index gives it; the serving manifest names them all."""
    index_file = path / TASKS_INDEX
    try:
        index = parse_json(index_file.read_text(encoding="utf-8"))
        tasks = {int(k): str(v) for k, v in index["tasks"].items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AdapterError(f"cannot read the task index ({why(exc)})", index_file) from None
    outside = [sub for sub in tasks.values() if Path(sub).name != sub or sub in ("", ".", "..")]
    if outside:
        raise AdapterError(f"the task index names {outside[0]!r}, not a subdirectory of its own", index_file)
    _check_source(index_file, index.get("source_sha256"), adapter)
    missing = sorted(set(range(adapter.n_tasks)) - set(tasks))
    if missing or len(tasks) != adapter.n_tasks:
        raise AdapterError(f"the task index lists tasks {sorted(tasks)}, but the adapter has tasks 0..{adapter.n_tasks - 1}"
                           f"{f' (task {missing[0]} is missing)' if missing else ''}: an incomplete --task all output",
                           index_file)
    _check_served(path, tasks)
    if override is not None:
        task = spec_under_test(override, adapter.n_tasks)
        if task not in tasks:
            raise PolytoolError(f"holds no LoRA for task {override} (it has tasks {sorted(tasks)})", path)
        tasks = {task: tasks[task]}
    return [_lora_target(path / sub, adapter, str(task), "the task index") for task, sub in tasks.items()]


def _served(manifest: Any) -> list[list[tuple[str, str]]]:
    """[(name, path), ...] per serving line that names LoRAs: vLLM's --lora-modules NAME=PATH and TGI's
    LORA_ADAPTERS=NAME=PATH,... (read as a shell and as TGI read them)."""
    import re
    import shlex

    found = []
    for line in (manifest.get("vllm") or {}).get("lines", [])[:1]:
        words = shlex.split(line)
        start = words.index("--lora-modules") + 1 if "--lora-modules" in words else len(words)
        found.append([tuple(w.split("=", 1)) for w in words[start:]])
    for line in (manifest.get("tgi") or {}).get("lines", []):
        body = line.partition("LORA_ADAPTERS=")[2]
        found.append([tuple(e.split("=", 1)) for e in re.split(r",(?=task-\d+=)", body) if e])
    return found


def _check_served(path: Path, tasks: dict[int, str]) -> None:
    """serving.json (where present) serves every task, each as task-<id> from that task's own LoRA."""
    file = path / "serving.json"
    if not file.is_file():
        return
    try:
        lines = _served(parse_json(file.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, TypeError) as exc:
        raise AdapterError(f"cannot read the serving manifest ({why(exc)})", file) from None
    want = {f"task-{t}": sub for t, sub in tasks.items()}
    for entries in lines:
        got = {e[0]: e[1] for e in entries if len(e) == 2}
        wrong = sorted(n for n in set(got) | set(want) if n not in got or n not in want
                       or Path(got[n]).name != want[n])
        if wrong:
            shown = got.get(wrong[0], "nothing")
            raise AdapterError(f"serves {wrong[0]} from {shown}, which is not that task's LoRA in the task index", file)


def artifact_targets(path: Path, adapter: PolyAdapter, base_dir: Path, override: str | None) -> list[Target]:
    """Recognise an artifact by its contents: a task-all dir, a LoRA dir or a dense model dir."""
    require_dir(path, "artifact directory")
    if (path / TASKS_INDEX).is_file():
        return _task_dirs(path, adapter, override)
    if (path / "adapter_config.json").is_file():
        return [_lora_target(path, adapter, override)]
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return [_dense_target(path, adapter, base_dir, override)]
    raise PolytoolError("not a collapsed artifact: expected a LoRA adapter (adapter_config.json), a `collapse --task all` "
                        f"directory ({TASKS_INDEX}) or a dense model (config.json + *.safetensors)", path)
