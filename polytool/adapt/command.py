"""`polytool adapt`: teach an adapter a new task from a few examples by learning its routing (MHR-z).

`adapt(options)` checks everything it can before loading a model (adapter, data file, output path),
appends a task, trains, measures the held-out loss before and after, and writes the grown adapter
atomically; it returns the result the CLI renders (keys: docs/adapt.md). Nothing is written when
anything fails or the run is interrupted.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import __version__
from ..errors import PolytoolError
from ..formats.adapter import load_adapter
from ..formats.atomic import check_output
from ..formats.base import resolve_base_dir
from ..formats.provenance import sha256_file
from .data import read_examples

TRAIN_MODES = ("routing", "all")
CHANGED_ALL = ("--train all trained the skills (poly_lora_A, poly_lora_B) that every task mixes: "
               "the existing tasks' outputs changed too")


@dataclass(frozen=True)
class AdaptOptions:
    """Everything `polytool adapt` takes (the CLI's options, one field each)."""

    adapter_dir: Path
    data: Path
    out: Path
    base_dir: Path | None = None
    train: str = "routing"  # routing (the new task's logits only) or all (also the skills)
    steps: int = 100
    lr: float = 0.05
    batch_size: int = 8
    seed: int = 0
    init: str = "uniform"  # uniform, mean or an existing task id
    eval_split: float = 0.2
    force: bool = False


def _check(o: AdaptOptions) -> None:
    if o.train not in TRAIN_MODES:
        raise PolytoolError(f"--train must be one of {', '.join(TRAIN_MODES)}, got {o.train!r}")
    for name, value, low in (("--steps", o.steps, 1), ("--batch-size", o.batch_size, 1)):
        if value < low:
            raise PolytoolError(f"{name} must be >= {low}, got {value}")
    if not o.lr > 0 or o.lr == float("inf"):
        raise PolytoolError(f"--lr must be a finite number > 0, got {o.lr!r}")
    if not 0 <= o.eval_split < 1:
        raise PolytoolError(f"--eval-split must be in [0, 1), got {o.eval_split!r}")


def adapt(o: AdaptOptions, progress: Callable[[dict], None] | None = None) -> dict:
    """Learn a new task from `o.data`, write the adapter with it to `o.out`; returns the report."""
    from ..extras import require

    require("polytool adapt")  # torch and transformers: the torch extra, named in one line when missing
    import torch

    from .data import split, tokenize
    from .model import build, parse_init, trained_tensors
    from .train import TrainSettings, evaluate, train
    from .write import check_source, write_adapter

    _check(o)
    adapter = load_adapter(o.adapter_dir)
    check_source(adapter)
    init = parse_init(o.init, adapter.n_tasks)
    examples = read_examples(o.data)
    base = resolve_base_dir(o.base_dir, adapter.base_model_name_or_path, adapter.config.get("revision"))
    check_output(o.out, o.force, inputs=[adapter.directory, base, o.data])
    data_sha = sha256_file(o.data)
    model = build(adapter, base, init, o.train)
    items = tokenize(examples, model.tokenizer, model.seq2seq, model.max_length, Path(o.data))
    train_items, eval_items = split(items, o.eval_split, o.seed)
    settings = TrainSettings(o.steps, o.lr, o.batch_size, o.seed)
    before = evaluate(model, eval_items, o.batch_size)
    stats = train(model, train_items, settings, progress)
    after = evaluate(model, eval_items, o.batch_size)
    trained = {k: v.to(torch.float64).numpy() for k, v in trained_tensors(model, o.train).items()}
    record = _record(o, adapter, model.task, data_sha, (len(train_items), len(eval_items)), (before, after))
    files = write_adapter(adapter, trained, record, o.out, o.force)
    return {"out": str(o.out), "adapter": str(adapter.directory), "base": str(base), "task": model.task,
            "n_tasks": adapter.n_tasks + 1, "train": o.train, "changed_tasks": record["changed_tasks"],
            "examples": {"train": len(train_items), "eval": len(eval_items)},
            "eval_loss": {"before": before, "after": after}, "train_loss": {"first": stats["losses"][0],
            "last": stats["losses"][-1]}, "steps": o.steps, "examples_per_s": stats["examples_per_s"],
            "seconds": stats["seconds"], "trainable_parameters": stats["trainable_parameters"],
            "optimizer_state_numel": stats["optimizer_state_numel"], "files": files}


def _record(o: AdaptOptions, adapter, task: int, data_sha: str, sizes: tuple[int, int],
            losses: tuple[float | None, float | None]) -> dict:
    """The provenance record written beside and inside the output (write.py)."""
    changed = list(range(adapter.n_tasks)) if o.train == "all" else []
    record = {"polytool_version": __version__, "source": str(adapter.directory), "source_sha256": adapter.sha256,
              "data": str(o.data), "data_sha256": data_sha, "task": task, "n_tasks": adapter.n_tasks + 1,
              "train": o.train, "trained": "routing row of the new task" if o.train == "routing" else
              "routing row of the new task and every skill (poly_lora_A, poly_lora_B)",
              "changed_tasks": changed, "init": str(o.init), "steps": o.steps, "lr": o.lr,
              "batch_size": o.batch_size, "seed": o.seed, "eval_split": o.eval_split,
              "examples": {"train": sizes[0], "eval": sizes[1]},
              "eval_loss": {"before": losses[0], "after": losses[1]}}
    if changed:
        record["note"] = CHANGED_ALL
    return record
