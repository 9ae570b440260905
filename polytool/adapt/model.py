"""The model `polytool adapt` trains: the base with polytool's PolyModel, one task appended, and only what
`--train` names left trainable.

The new task's routing row is its own parameter (a torch parametrization of each router's
module_logits: the frozen table with its last row replaced), so the old rows get no gradient and no
optimizer state: with `--train routing` the trainable parameters are n_modules * n_splits * n_skills
numbers. `--train all` also trains the skills (poly_lora_A, poly_lora_B), which changes every old task.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..architectures import TASK_CLASSES
from ..errors import CheckpointError, PolytoolError
from ..formats.adapter import PolyAdapter
from ..formats.base import require_dir

SEQ2SEQ_BY_TASK = {"CAUSAL_LM": False, "SEQ_2_SEQ_LM": True}  # task type -> seq2seq


class NewTaskRow(nn.Module):
    """Parametrization of a (t + 1, q * s) logits table: the frozen table with its last row from `row`."""

    def __init__(self, row: torch.Tensor):
        super().__init__()
        self.row = nn.Parameter(row.detach().clone().reshape(1, -1))  # (1, q*s)

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        return torch.cat([table[:-1], self.row], dim=0)  # (t, q*s) + (1, q*s) -> (t+1, q*s)


@dataclass
class AdaptModel:
    """The model under training, what it is, and the tensors that train."""

    poly: Any  # polytool.poly.model.PolyModel
    tokenizer: Any
    seq2seq: bool
    task: int  # the new task's id
    trainable: dict[str, nn.Parameter]  # name -> parameter given to the optimizer
    max_length: int | None


def _family(adapter: PolyAdapter, config: Any, base_dir: Path) -> bool:
    """True for an encoder-decoder base; PolytoolError for a model adapt cannot train (not a language model)."""
    task_type = adapter.task_type
    if task_type in SEQ2SEQ_BY_TASK:
        return SEQ2SEQ_BY_TASK[task_type]
    archs = list(getattr(config, "architectures", None) or [])
    if task_type is None and any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return False
    if task_type is None and getattr(config, "is_encoder_decoder", False):
        return True
    raise PolytoolError(f"adapt trains language models (task_type CAUSAL_LM or SEQ_2_SEQ_LM); this adapter's "
                        f"task_type is {task_type!r}", adapter.directory)


def load_base(adapter: PolyAdapter, base_dir: Path) -> tuple[nn.Module, Any, bool]:
    """(model, tokenizer, seq2seq) of the base at `base_dir`, loaded in float32 on the CPU."""
    import transformers

    require_dir(base_dir, "base model directory")
    try:
        config = transformers.AutoConfig.from_pretrained(base_dir)
    except Exception as exc:  # transformers raises many types for a bad config
        raise CheckpointError(f"cannot read config.json ({type(exc).__name__})", base_dir) from None
    seq2seq = _family(adapter, config, base_dir)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)
    except Exception as exc:
        raise CheckpointError(f"cannot load the base's tokenizer ({type(exc).__name__}): adapt tokenises --data "
                              "with it", base_dir) from None
    name = TASK_CLASSES["SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM"]
    with _quiet(transformers):
        try:
            model, info = getattr(transformers, name).from_pretrained(base_dir, dtype=torch.float32,
                                                                      output_loading_info=True)
        except Exception as exc:
            raise CheckpointError(f"cannot load the base with {name} ({type(exc).__name__})", base_dir) from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise CheckpointError(f"incomplete checkpoint: {len(missing)} weights missing (e.g. {missing[0]})", base_dir)
    return model, tokenizer, seq2seq


@contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """No loading bar or load report from transformers (adapt shows its own progress)."""
    logs = transformers.utils.logging
    bars, verbosity = logs.is_progress_bar_enabled(), logs.get_verbosity()
    logs.disable_progress_bar()
    logs.set_verbosity_error()
    try:
        yield
    finally:
        logs.set_verbosity(verbosity)
        if bars:
            logs.enable_progress_bar()


def initial_row(table: torch.Tensor, init: str | int) -> torch.Tensor:
    """The new task's logits row (q*s,) from the existing (t, q*s) table: zeros, the mean row, or a copy."""
    if init == "uniform":
        return torch.zeros(table.shape[1], dtype=table.dtype)  # sigmoid(0) everywhere: MHR-mu
    if init == "mean":
        return table.mean(dim=0)  # (t, q*s) -> (q*s,)
    return table[int(init)].clone()


def parse_init(text: str, n_tasks: int) -> str | int:
    """--init: 'uniform', 'mean' or an existing task id."""
    value = str(text).strip().lower()
    if value in ("uniform", "mean"):
        return value
    if value.isdigit() and int(value) < n_tasks:
        return int(value)
    raise PolytoolError(f"--init must be uniform, mean or a task id 0..{n_tasks - 1}, got {text!r}")


def append_task(poly: Any, init: str | int) -> int:
    """Give every router of `poly` one more task (its row from `initial_row`, trainable); returns its id.
    Everything else is frozen (requires_grad False)."""
    poly.requires_grad_(False)
    config = poly.peft_config[poly.active_adapter]
    task = config.n_tasks
    for _, layer in poly._poly_layers():
        router = layer.poly_router[poly.active_adapter]
        table = router.module_logits.detach()  # (t, q*s)
        grown = torch.cat([table, initial_row(table, init)[None]], dim=0)  # (t+1, q*s)
        router.module_logits = nn.Parameter(grown, requires_grad=False)
        router.n_tasks = task + 1
        parametrize.register_parametrization(router, "module_logits", NewTaskRow(grown[-1]))
    config.n_tasks = task + 1
    return task


def trainable_parameters(poly: Any, mode: str) -> dict[str, nn.Parameter]:
    """What trains: the new routing rows; with mode 'all' also every skill (poly_lora_A, poly_lora_B)."""
    out = {}
    for path, layer in poly._poly_layers():
        router = layer.poly_router[poly.active_adapter]
        out[f"{path}.poly_router.module_logits[new]"] = router.parametrizations.module_logits[0].row
        if mode == "all":
            out[f"{path}.poly_lora_A"] = layer.poly_lora_A[poly.active_adapter]
            out[f"{path}.poly_lora_B"] = layer.poly_lora_B[poly.active_adapter]
    for p in out.values():
        p.requires_grad_(True)
    return out


def build(adapter: PolyAdapter, base_dir: Path, init: str | int, mode: str) -> AdaptModel:
    """Load base and adapter into polytool's PolyModel, append the new task, set what trains."""
    from ..poly.model import PolyModel

    base, tokenizer, seq2seq = load_base(adapter, base_dir)
    poly = PolyModel.from_pretrained(base, adapter.directory)
    task = append_task(poly, init)
    limit = getattr(base.config, "max_position_embeddings", None) or getattr(base.config, "n_positions", None)
    return AdaptModel(poly, tokenizer, seq2seq, task, trainable_parameters(poly, mode), limit)


def trained_tensors(model: AdaptModel, mode: str) -> dict[str, torch.Tensor]:
    """Module path -> what training produced: 'logits' (the new row, (q*s,)); with 'all' also 'A' and 'B'."""
    out = {}
    for path, layer in model.poly._poly_layers():
        router = layer.poly_router[model.poly.active_adapter]
        out[f"{path}:logits"] = router.parametrizations.module_logits[0].row.detach().reshape(-1)
        if mode == "all":
            out[f"{path}:A"] = layer.poly_lora_A[model.poly.active_adapter].detach()
            out[f"{path}:B"] = layer.poly_lora_B[model.poly.active_adapter].detach()
    return out
