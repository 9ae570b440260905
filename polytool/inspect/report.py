"""`polytool inspect`: a validated adapter -> one report dict (numpy only, no torch import).

The report is plain JSON-able data (its schema is in docs/inspect.md); `render_report` turns it
into the human text. Every number comes from core/routing.py: eval mixing weights (sigmoid, per-split
normalisation) and the routing statistics of Ponti et al. 2022.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..core import routing
from ..core.taskspec import TaskSpec, spec_label
from ..formats.adapter import PolyAdapter
from .views import routing_views, short_names


def _module_statistics(name: str, alloc: np.ndarray) -> dict[str, Any]:
    """Statistics of one module's (t, q, s) allocation: per split, and the mean over splits."""
    disc, spars, usage = routing.discreteness(alloc), routing.sparsity(alloc), routing.skill_usage(alloc)
    unused = routing.unused_skills(alloc)
    splits = [
        {"discreteness": float(d), "sparsity": float(sp), "skill_usage": float(u), "unused_skills": un}
        for d, sp, u, un in zip(disc, spars, usage, unused)
    ]
    return {"name": name, "discreteness": float(disc.mean()), "sparsity": float(spars.mean()),
            "skill_usage": float(usage.mean()), "splits": splits}


def _statistics(adapter: PolyAdapter, alloc: np.ndarray) -> dict[str, Any]:
    """Routing statistics of the (t, m, q, s) allocation: per module, overall and the unused skills."""
    modules = [_module_statistics(m.name, alloc[:, i]) for i, m in enumerate(adapter.modules)]
    overall = {key: float(np.mean([m[key] for m in modules])) for key in ("discreteness", "sparsity", "skill_usage")}
    unused = [{"module": m["name"], "split": q, "skills": split["unused_skills"]}
              for m in modules for q, split in enumerate(m["splits"]) if split["unused_skills"]]
    slots = len(modules) * adapter.n_splits * adapter.n_skills
    overall["unused_skill_slots"] = sum(len(u["skills"]) for u in unused)
    overall["skill_slots"] = slots
    return {"overall": overall, "modules": modules, "unused_skills": unused}


def _tasks(weights: np.ndarray) -> list[dict[str, Any]]:
    """(t, m, q, s) mixing weights -> per task: skill weights averaged over modules and splits."""
    per_skill = weights.mean(axis=(1, 2))  # (t, s)
    effective = routing.effective_skills(per_skill)  # (t,)
    return [
        {"task": t, "skill_weights": row.tolist(), "effective_skills": float(effective[t]),
         "top_skill": int(row.argmax()), "top_weight": float(row.max())}
        for t, row in enumerate(per_skill)
    ]


def _base_facts(adapter: PolyAdapter, base_dir: Path | None) -> tuple[Any, str | None]:
    """(the base checkpoint or None, why it is not at hand); --base must work, a recorded base may be absent."""
    from ..formats.base import open_base, resolve_base_dir
    from ..errors import CheckpointError

    try:
        directory = resolve_base_dir(base_dir, adapter.base_model_name_or_path, adapter.config.get("revision"),
                                     download=base_dir is not None)
        return open_base(directory, renamer=None), None  # names as they are: inspect stays torch-free
    except CheckpointError as exc:
        if base_dir is not None:
            raise
        return None, exc.message


def _extras(adapter: PolyAdapter, base: Any) -> dict[str, Any]:
    """The tensors beside the Poly layers: modules_to_save copies and embedding layers saved whole."""
    from ..formats.base import find_tensor
    from ..formats.safetensors import SafetensorsFile

    def tensor(key: str) -> dict[str, Any]:
        shape = adapter.tensor_shape(key)
        return {"key": key, "shape": list(shape), "parameters": int(np.prod(shape))}

    saved = [{"module": module, "tensors": [dict(tensor(key), name=param) for param, key in params.items()]}
             for module, params in adapter.saved_modules.items()]
    embeddings = []
    for module, key in adapter.saved_embeddings.items():
        entry = dict(tensor(key), module=module, equals_base=None)
        found = None if base is None else find_tensor(key[len("base_model.model."):].replace(".base_layer.", "."),
                                                      base.tensors)
        if found is None and base is not None and base.tie_word_embeddings:
            found = next((k for k, i in base.tensors.items() if k.endswith("embed_tokens.weight")
                          and list(i.shape) == entry["shape"]), None)
        if found is not None:
            with SafetensorsFile(base.directory / base.tensors[found].shard) as st:
                entry["equals_base"] = bool(list(st.shape(found)) == entry["shape"] and np.array_equal(
                    st.float_array(found, np.float32), adapter.tensor(key, np.float32)))
            entry["base_key"] = found
            rows = base.tensors[found].shape[0] if base.tensors[found].shape else None
            if len(entry["shape"]) == 2 and rows != entry["shape"][0]:
                entry["resized_from"] = rows  # a resized vocabulary: the base's row count
        embeddings.append(entry)
    return {"saved_modules": saved, "saved_embeddings": embeddings}


def build_report(adapter: PolyAdapter, base_dir: Path | None = None) -> dict[str, Any]:
    """Everything `polytool inspect` shows, as JSON-able data (schema: docs/inspect.md). The base (--base,
    or the adapter's recorded one when found locally) tells Conv1D layers apart and checks saved embeddings."""
    from ..formats.base import CONV1D_MODEL_TYPES

    base, no_base = _base_facts(adapter, base_dir)
    conv1d = base is not None and base.model_type in CONV1D_MODEL_TYPES
    short = short_names([m.name for m in adapter.modules])
    weights = np.stack([adapter.mixing_weights(m.name) for m in adapter.modules], axis=1)  # (t, m, q, s)
    alloc = np.stack([routing.allocation(adapter.logits(m.name), adapter.n_splits, adapter.n_skills)
                      for m in adapter.modules], axis=1)  # (t, m, q, s)
    n_tasks = weights.shape[0]
    similarity = routing.cosine_similarity(weights.reshape(n_tasks, -1))  # (t, m*q*s) -> (t, t)
    return {
        "adapter_dir": str(adapter.directory),
        "weights_file": adapter.weights_file.name,
        "poly_type": adapter.poly_type,
        "r": adapter.r,
        "n_tasks": adapter.n_tasks,
        "n_skills": adapter.n_skills,
        "n_splits": adapter.n_splits,
        "target_modules": adapter.target_modules,
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "task_type": adapter.task_type,
        "base": None if base is None else str(base.directory),
        "base_not_at_hand": no_base,
        "modules": [{"name": m.name, "short_name": short[m.name], "layer": "Conv1D" if conv1d else "Linear",
                     "in_features": m.in_features, "out_features": m.out_features} for m in adapter.modules],
        **_extras(adapter, base),
        "parameters": adapter.parameter_counts(),
        "routing": {
            "weights": weights.tolist(),
            "task_split_skill_weights": weights.mean(axis=1).tolist(),  # (t, q, s)
            "tasks": _tasks(weights),
            "similarity": similarity.tolist(),
            "statistics": _statistics(adapter, alloc),
            **routing_views([m.name for m in adapter.modules], weights, alloc, similarity),
        },
    }


# ---- human rendering -------------------------------------------------------------------------
MAX_SKILL_COLUMNS = 16  # wider adapters show each task's top skills instead of every weight
MAX_SIMILARITY_TASKS = 12  # more tasks show each task's nearest neighbour instead of the matrix


def _shape_groups(modules: list[dict]) -> list[str]:
    """'q_proj  1024 -> 1024  x8' per (short name, in, out), in order of first appearance."""
    counts: dict[tuple[str, int, int], int] = {}
    for m in modules:
        key = (m["short_name"], m["in_features"], m["out_features"])
        counts[key] = counts.get(key, 0) + 1
    width = max(len(leaf) for leaf, _, _ in counts)
    return [f"{leaf:<{width}}  {i} -> {o}  x{n}" for (leaf, i, o), n in counts.items()]


def _render_extras(rep: dict) -> list[str]:
    """The tensors beside the Poly layers, if any."""
    lines = []
    for m in rep["saved_modules"]:
        params = sum(t["parameters"] for t in m["tensors"])
        names = ", ".join(f"{t['name']} {t['shape']}" for t in m["tensors"])
        lines.append(f"  trained     {m['module']} (modules_to_save, {params:,} parameters): {names}")
    for e in rep["saved_embeddings"]:
        same = {True: "equal to the base's", False: "DIFFERS from the base's", None: "not compared: base not at hand"}
        what = (f"a resized vocabulary: the base has {e['resized_from']} rows; written whole by collapse"
                if e.get("resized_from") is not None else same[e["equals_base"]])
        lines.append(f"  embedding   {e['module']} {e['shape']} saved whole by PEFT ({what})")
    return lines


def _layer_kind(modules: list[dict]) -> str:
    return "/".join(dict.fromkeys(m["layer"] for m in modules)) or "Linear"


def _render_header(rep: dict) -> list[str]:
    mhr = f" (MHR, {rep['n_splits']} splits)" if rep["n_splits"] > 1 else ""
    targets = rep["target_modules"]
    targets = ", ".join(targets) if isinstance(targets, list) else str(targets)
    params = rep["parameters"]
    lines = [
        f"Poly adapter  {rep['adapter_dir']}  ({rep['weights_file']})",
        f"  config      r={rep['r']}  n_tasks={rep['n_tasks']}  n_skills={rep['n_skills']}  "
        f"n_splits={rep['n_splits']}{mhr}",
        f"  targets     {targets}",
        f"  base model  {rep['base_model_name_or_path'] or '(not recorded)'}",
        f"  modules     {len(rep['modules'])} adapted {_layer_kind(rep['modules'])} layers (name  in -> out  count):",
    ]
    lines += [f"                {g}" for g in _shape_groups(rep["modules"])]
    lines += _render_extras(rep)
    lines.append(f"  parameters  Poly adapter {params['poly']:,}   one collapsed task LoRA {params['lora_per_task']:,}")
    return lines


def _render_tasks(rep: dict) -> list[str]:
    n_skills = rep["n_skills"]
    wide = n_skills > MAX_SKILL_COLUMNS
    columns = "  (top 5 skills)" if wide else "".join(f" {'s' + str(s):>5}" for s in range(n_skills))
    lines = ["", "Tasks: eval-time mixing weights per skill, averaged over modules and splits",
             f"  {'task':>4}  {'eff.skills':>10}  {'top skill':<9}" + columns]
    for t in rep["routing"]["tasks"]:
        w = t["skill_weights"]
        top = f"s{t['top_skill']} {t['top_weight']:.2f}"
        if wide:
            best = sorted(range(n_skills), key=lambda s: -w[s])[:5]
            values = "  " + ", ".join(f"s{s} {w[s]:.2f}" for s in best)
        else:
            values = "".join(f" {x:5.2f}" for x in w)
        lines.append(f"  {t['task']:>4}  {t['effective_skills']:>10.2f}  {top:<9}" + values)
    return lines


def _render_statistics(rep: dict) -> list[str]:
    stats = rep["routing"]["statistics"]
    o = stats["overall"]
    per = "per module (mean over splits)" if rep["n_splits"] > 1 else "per module"
    lines = [
        "",
        "Routing statistics (Ponti et al. 2022; allocation = sigmoid(logits); see docs/inspect.md)",
        f"  all modules   discreteness {o['discreteness']:.3f}   sparsity {o['sparsity']:.3f}   "
        f"skill usage {o['skill_usage']:.3f}",
        f"  {per}:",
    ]
    width = max(len(m["name"]) for m in stats["modules"])
    lines.append(f"    {'module':<{width}}  discr.  sparsity  usage  unused skills")
    for m in stats["modules"]:
        unused = [(f"q{q}:" if rep["n_splits"] > 1 else "") + ",".join(f"s{s}" for s in sp["unused_skills"])
                  for q, sp in enumerate(m["splits"]) if sp["unused_skills"]]
        lines.append(f"    {m['name']:<{width}}  {m['discreteness']:6.3f}  {m['sparsity']:8.3f}  "
                     f"{m['skill_usage']:5.3f}  {' '.join(unused) or '-'}")
    lines.append(f"  unused skills (rounded allocation 0 for every task): {o['unused_skill_slots']} of "
                 f"{o['skill_slots']} (module, split, skill) slots")
    return lines


def _render_similarity(rep: dict) -> list[str]:
    sim = np.asarray(rep["routing"]["similarity"])
    n = sim.shape[0]
    lines = ["", "Task similarity: cosine of the tasks' mixing weights over all modules and splits"]
    if n == 1:
        return lines + ["  (one task)"]
    if n <= MAX_SIMILARITY_TASKS:
        lines.append("        " + " ".join(f"{t:>5}" for t in range(n)))
        lines += [f"  {t:>4}  " + " ".join(f"{x:5.2f}" for x in row) for t, row in enumerate(sim)]
    off = sim - 2 * np.eye(n)  # mask the diagonal
    nearest = off.argmax(axis=1)
    if n > MAX_SIMILARITY_TASKS:
        lines += [f"  task {t:>3}: most similar task {nearest[t]} ({sim[t, nearest[t]]:.2f})" for t in range(n)]
    i, j = np.unravel_index(off.argmax(), off.shape)
    k, m = np.unravel_index((sim + 2 * np.eye(n)).argmin(), sim.shape)
    lines.append(f"  most similar pair: tasks {min(i, j)} and {max(i, j)} ({sim[i, j]:.3f}); "
                 f"least similar: tasks {min(k, m)} and {max(k, m)} ({sim[k, m]:.3f})")
    return lines


def render_report(rep: dict) -> str:
    """The report as compact human text."""
    return "\n".join(_render_header(rep) + _render_tasks(rep) + _render_statistics(rep) + _render_similarity(rep))


def spec_report(adapter, spec: TaskSpec) -> dict:
    """`inspect --task`: one spec's eval weights per module (n_splits, n_skills), and per skill their mean
    over modules and splits. `adapter` is a PolyAdapter (anything with .modules and .spec_weights)."""
    modules = {m.name: adapter.spec_weights(m.name, spec) for m in adapter.modules}  # (q, s) each
    per_skill = np.mean([w.mean(axis=0) for w in modules.values()], axis=0)  # (s,)
    return {"task": spec if isinstance(spec, int) else spec_label(spec), "skill_weights": per_skill.tolist(),
            "effective_skills": float(routing.effective_skills(per_skill)),
            "modules": {name: w.tolist() for name, w in modules.items()}}
