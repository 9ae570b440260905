"""`polytool merge`'s outputs: the merged delta as a LoRA (exact, or rank-controlled) or added to the base's
weights (the streaming dense writer of collapse/dense.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import __version__
from ..collapse.dense import DenseOptions, dense_rows, factored_delta, plan_dense, write_planned
from ..collapse.lora import LORA_DTYPES, lora_pair, truncation_report, write_factors
from ..core.lowrank import Truncation, check_rank_options, truncate_dense, truncate_factored
from ..errors import PolytoolError
from ..formats.atomic import atomic_output_dir, check_output
from ..formats.base import open_base
from ..formats.cards import merge_card
from ..formats.adapter_dir import CONFIG_NAME, WEIGHTS_NAME
from ..formats.provenance import RECIPE_KEY, TRUNCATION_KEY, truncation_record
from .recipe import Merge
from .recipe_file import RECIPE_FILE


def _lora_config(merge: Merge) -> dict:
    """adapter_config.json of the merged LoRA (r, lora_alpha, rank_pattern are set by write_factors)."""
    first = lambda key: next((s.config.get(key) for s in merge.sources if s.config.get(key) is not None), None)
    return {"peft_type": "LORA", "task_type": first("task_type"), "base_model_name_or_path": first("base_model_name_or_path"),
            "revision": first("revision"), "lora_dropout": 0.0, "use_rslora": False, "use_dora": False, "bias": "none",
            "fan_in_fan_out": any(bool(s.config.get("fan_in_fan_out")) for s in merge.sources if s.kind == "lora"),
            "target_modules": sorted(m.name for m in merge.modules), "exclude_modules": None, "modules_to_save": None,
            "inference_mode": True}


def _metadata(merge: Merge, **output) -> dict[str, str]:
    return {"format": "pt", "polytool.version": __version__,
            RECIPE_KEY: json.dumps(merge.recipe(**output), separators=(",", ":"))}


def _card(merge: Merge, meta: dict[str, str], config: dict, truncated: bool = False, base: Path | None = None) -> str:
    return merge_card(merge, config, truncated, json.loads(meta[RECIPE_KEY]), base)


def _inputs(merge: Merge) -> list[Path]:
    return [s.directory for s in merge.sources]


def write_lora_merge(merge: Merge, out: Path, rank: int | None = None, energy: float | None = None,
                     dtype: str = "F32", force: bool = False, recipe: str | None = None) -> dict:
    """The merged delta as a LoRA at `out`: exact for linear without rank control (the factors side by side),
    else per module the best rank-`rank` (or `energy`) approximation, its error reported."""

    if dtype not in LORA_DTYPES:
        raise PolytoolError(f"LoRA dtype {dtype!r} is not allowed: {', '.join(LORA_DTYPES)}")
    check_rank_options(rank, energy)
    truncate = rank is not None or energy is not None
    if merge.method != "linear" and not truncate:
        raise PolytoolError(f"--method {merge.method} gives a full-rank delta: a LoRA output needs --rank K or "
                            "--energy E (or write --to dense)")
    check_output(out, force, inputs=_inputs(merge))
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    kept: dict[str, Truncation] = {}
    for m in merge.modules:  # one module's deltas at a time
        if merge.method == "linear" and not truncate:
            B, A = merge.linear_factors(m.name)  # (out, R), (R, in): exact
        elif merge.method == "linear":
            B, A, kept[m.name] = truncate_factored(*merge.linear_factors(m.name), rank, energy)  # D never formed
        else:
            B, A, kept[m.name] = truncate_dense(merge.delta(m.name), rank, energy)
        factors[m.name] = lora_pair(B, A, dtype)  # (k, in), (out, k), rounded once
    meta = _metadata(merge, to="lora", rank=rank, energy=energy)
    if truncate:
        meta[TRUNCATION_KEY] = truncation_record(rank, energy, kept)
    with atomic_output_dir(out, force) as tmp:
        config = write_factors(tmp, factors, dtype, meta, _lora_config(merge))
        (tmp / "README.md").write_text(_card(merge, meta, config, truncate), encoding="utf-8", errors="backslashreplace")
        files = [CONFIG_NAME, WEIGHTS_NAME, "README.md"]
        if recipe is not None:  # the recipe that was run, re-runnable: polytool merge recipe.yml --out OUT
            (tmp / RECIPE_FILE).write_text(recipe, encoding="utf-8", errors="backslashreplace")
            files.append(RECIPE_FILE)
        nbytes = sum((tmp / f).stat().st_size for f in files)
    data = {"files": files, "tensors": 2 * len(factors), "bytes": nbytes, "r": config["r"],
            "rank_pattern": config["rank_pattern"]}
    if truncate:
        data["truncation"] = truncation_report(kept)
    return data


def write_dense_merge(merge: Merge, base_dir: Path, out: Path, options: DenseOptions = DenseOptions(),
                      progress=None, recipe: str | None = None) -> dict:
    """The merged delta added to the base's weights, streamed shard by shard (collapse/dense.py's streaming merge)."""

    base = open_base(base_dir)
    check_output(out, options.force, inputs=_inputs(merge) + [base.directory])
    meta = _metadata(merge, to="dense")
    plan = plan_dense(base, merge.modules, meta, options)
    texts = {"README.md": _card(merge, meta, _lora_config(merge), base=base.directory)}
    if recipe is not None:
        texts[RECIPE_FILE] = recipe

    def deltas(module: str, wide: type):
        if merge.method == "linear":  # by blocks of rows from the factors: never formed whole
            B, A = merge.linear_factors(module)  # (out, R), (R, in)
            return factored_delta(A.T, B.T, 1.0, wide)  # x @ A.T @ B.T: (in, R), (R, out)
        return dense_rows(merge.delta(module), wide)  # (out, in), one module at a time

    return write_planned(plan, deltas, out, options, progress, texts)
