"""`verify --reference peft`: PEFT's own Poly model as the reference, PEFT's own loader for LoRA artifacts.

polytool imports PEFT here only, and only when this is asked for; without PEFT, `require_peft` says how
to install it. The API mirrors polytool/verify/reference.py, so verify drives both the same way:

    peft_poly(model, adapter_dir)        -> PeftModel: PeftModel.from_pretrained on `model` (a fresh base,
                                            loaded with the adapter's class; PEFT wraps it in place)
    routed(peft_model, spec)             context manager -> the transformers model inside the PeftModel
                                            (module paths as the adapter's), computing the routed model
                                            for `spec` when called plainly: model(input_ids=...)
    peft_lora(model, lora_dir)           -> the transformers model with PEFT's LoRA layers (its loader)

Task ids: PEFT's Poly layers need `task_ids` of the batch size; a forward pre-hook on each Poly layer
passes them, sized by that layer's input, so any batch works and every task type (even none) behaves
the same. uniform, mean and mixes rewrite every router's logits for the block to logit(w / 2), whose
eval weights are w (the per-split normalisation undoes the / 2; w from polytool/verify/reference.py's routing).

GPT-2's Conv1D: PEFT's Poly accepts only nn.Linear (TypeError), so `peft_poly` replaces each Conv1D the
adapter targets by the equal nn.Linear (weight transposed, bias kept) before PEFT wraps it. PEFT's LoRA
takes Conv1D itself (fan_in_fan_out), so `peft_lora` changes nothing.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import PolytoolError
from .reference import ReferenceAdapter, routing_spec

INSTALL_HINT = "--reference peft needs PEFT: pip install peft"


def require_peft():
    """The peft module, or PolytoolError with the install hint."""
    try:
        import peft
    except ImportError:
        raise PolytoolError(INSTALL_HINT) from None
    return peft


def _conv1d_as_linear(model: Any, paths: list[str]) -> None:
    """Swap each transformers Conv1D at `paths` (y = x @ W + b, W (in, out)) for the equal nn.Linear (W.T)."""
    import torch

    for path in paths:
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            continue  # PEFT reports a missing target itself
        if type(layer).__name__ != "Conv1D":
            continue
        d_in, d_out = layer.weight.shape
        linear = torch.nn.Linear(d_in, d_out, dtype=layer.weight.dtype, device=layer.weight.device)
        with torch.no_grad():
            linear.weight.copy_(layer.weight.T)  # (out, in)
            linear.bias.copy_(layer.bias)
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, linear)


def _quiet(load, *args):
    """Call a PEFT loader with its warnings and log lines held back (its findings are raised below)."""
    import logging

    logger = logging.getLogger("peft")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load(*args)
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise PolytoolError(f"PEFT cannot load {args[1]} onto this base ({type(exc).__name__}: {first})") from None
    finally:
        logger.setLevel(level)


def peft_poly(model: Any, adapter_dir: str | Path) -> Any:
    """PEFT's routed Poly model of the adapter on `model` (consumed: PEFT injects its layers into it)."""
    peft = require_peft()
    _conv1d_as_linear(model, ReferenceAdapter(adapter_dir).modules)
    return _quiet(peft.PeftModel.from_pretrained, model, str(adapter_dir)).eval()


def peft_lora(model: Any, lora_dir: str | Path) -> Any:
    """A LoRA directory applied by PEFT's own loader: the transformers model with PEFT's LoRA layers."""
    peft = require_peft()
    return _quiet(peft.PeftModel.from_pretrained, model, str(lora_dir)).eval().base_model.model


def _spec_logits(logits: Any, spec: Any, n_splits: int, n_skills: int) -> Any:
    """(t, q*s) logits whose eval weights are the spec's for every task row: uniform 0, else logit(w / 2)."""
    import torch

    from .reference import EPS

    if spec == "uniform":
        return torch.zeros_like(logits)
    w = torch.sigmoid(logits.detach().double()).view(-1, n_splits, n_skills)  # (t, q, s)
    w = w / (w.sum(-1, keepdim=True) + EPS)
    mixed = w.mean(0) if spec == "mean" else sum(c * w[t] for t, c in spec.items())  # (q, s)
    return torch.logit(mixed / 2).flatten().expand_as(logits).to(logits.dtype)


@contextmanager
def routed(peft_model: Any, spec: Any) -> Iterator[Any]:
    """Inside the block, the PeftModel's inner transformers model computes PEFT's routed model for `spec`."""
    import torch
    from peft.tuners.poly.layer import Linear as PolyLinear

    config = peft_model.peft_config[peft_model.active_adapter]
    spec = routing_spec(spec, config.n_tasks)
    task = spec if isinstance(spec, int) else 0
    inner = peft_model.base_model.model
    layers = [m for m in inner.modules() if isinstance(m, PolyLinear)]
    routers = [p for name, p in inner.named_parameters() if name.endswith("module_logits")]
    saved = [p.detach().clone() for p in routers]

    def pass_task_ids(_layer, args, kwargs):
        x = args[0] if args else kwargs["x"]  # (batch, seq, in): PEFT's Poly takes 3-D inputs only
        return args, {**kwargs, "task_ids": torch.full((x.shape[0],), task, device=x.device)}

    handles = [layer.register_forward_pre_hook(pass_task_ids, with_kwargs=True) for layer in layers]
    try:
        if not isinstance(spec, int):
            with torch.no_grad():
                for p in routers:
                    p.copy_(_spec_logits(p, spec, config.n_splits, config.n_skills))
        yield inner
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for p, old in zip(routers, saved):
                p.copy_(old)
