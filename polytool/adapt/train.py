"""The training loop of `polytool adapt`: AdamW on the trainable tensors only, PEFT's stochastic routing
(RelaxedBernoulli, the model in train mode), seeded shuffles; and the held-out loss (eval routing).

Deterministic for a seed on one machine: the shuffles come from their own generator, the routing
draws from torch's global one, seeded here.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..errors import PolytoolError
from .data import Tokenized, collate, loss_tokens
from .model import AdaptModel


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    lr: float
    batch_size: int
    seed: int


def _pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def _batches(items: list[Tokenized], size: int, generator: torch.Generator) -> Iterator[list[Tokenized]]:
    """Endless batches of `size`: one seeded shuffle per pass over the data."""
    while True:
        order = torch.randperm(len(items), generator=generator).tolist()
        for start in range(0, len(order) - size + 1 if len(order) >= size else 1, size):
            yield [items[i] for i in order[start: start + size]]


def _loss(model: AdaptModel, items: list[Tokenized]) -> torch.Tensor:
    batch = collate(items, _pad_id(model.tokenizer))
    return model.poly(**batch, task_ids=model.task).loss  # mean over the batch's target tokens


def evaluate(model: AdaptModel, items: list[Tokenized], batch_size: int) -> float | None:
    """Mean loss per target token of `items` under the eval routing (sigmoid); None without items."""
    if not items:
        return None
    was_training = model.poly.training
    model.poly.eval()
    total = count = 0.0
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            chunk = items[start: start + batch_size]
            n = loss_tokens(chunk, model.seq2seq)
            total += _loss(model, chunk).item() * n
            count += n
    model.poly.train(was_training)
    return total / count


def optimizer_state_numel(optimizer: torch.optim.Optimizer) -> int:
    """Numbers the optimizer keeps (moments, step counts): only for the tensors it trains."""
    return sum(v.numel() for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


def train(model: AdaptModel, items: list[Tokenized], settings: TrainSettings,
          progress: Callable[[dict], None] | None = None) -> dict:
    """Train `model.trainable` for `settings.steps` steps; returns losses, speed and optimizer state size."""
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    params = list(model.trainable.values())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    batches = _batches(items, min(settings.batch_size, len(items)), generator)
    model.poly.train()
    losses, seen, start = [], 0, time.perf_counter()
    try:
        for step in range(1, settings.steps + 1):
            chunk = next(batches)
            loss = _loss(model, chunk)
            if not math.isfinite(loss.item()):
                raise PolytoolError(f"training diverged at step {step} (loss {loss.item()}): lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            seen += len(chunk)
            if progress is not None:
                elapsed = time.perf_counter() - start
                progress({"step": step, "steps": settings.steps, "loss": losses[-1],
                          "examples_per_s": seen / elapsed if elapsed > 0 else 0.0})
    finally:
        model.poly.eval()
    seconds = time.perf_counter() - start
    return {"losses": losses, "seconds": seconds, "examples_per_s": seen / seconds if seconds > 0 else 0.0,
            "optimizer_state_numel": optimizer_state_numel(optimizer),
            "trainable_parameters": sum(p.numel() for p in params)}
