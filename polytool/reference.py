"""The routed model that `verify` trusts: a second implementation of Poly/MHR, written plainly from the
definition and sharing no code with what writes artifacts.

It reads the adapter on its own (json, and the safetensors library's own loader), routes on its own
(sigmoid of the task's logits, normalised per split: w / (w.sum() + 1e-12)), mixes on its own (per
split, in float64, with explicit sums), and applies the update through forward hooks on an unmodified
transformers model:

    A_q = sum_s w[q, s] * poly_lora_A[q, s]        (in/q, r)   stacked along the input rows  -> A (in, r)
    B_q = sum_s w[q, s] * poly_lora_B[q, s]        (r, out/q)  stacked along output columns  -> B (r, out)
    y   = base(x) + (x @ A) @ B / r                computed in float64, returned in y's dtype

Every other tensor of the adapter file (a trained head of modules_to_save, an embedding layer PEFT saved
whole) replaces the model's tensor of that name, as PEFT loads it. No cache: every call recomputes.

Nothing here imports polytool's adapter, routing, collapse, poly, lora, merge or export modules; a test
checks that, and tests prove this module equal to PEFT's PolyModel on every architecture of the
compatibility matrix. A wrong formula in the shared product code therefore makes verify fail.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

import torch

from .errors import AdapterError, CheckpointError

PREFIX = "base_model.model."
POLY_SUFFIXES = (".poly_lora_A", ".poly_lora_B", ".poly_router.module_logits")
EPS = 1e-12  # PEFT's per-split normalisation: w / (w.sum() + 1e-12)

# a task id, "uniform" (every logit 0, MHR-mu), "mean" (the tasks' weights averaged), or {task: coefficient}
RoutingSpec = Union[int, str, dict]


class ReferenceAdapter:
    """A Poly/MHR adapter directory read into float64 tensors, with nothing derived ahead of time."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        config = json.loads((self.directory / "adapter_config.json").read_text(encoding="utf-8"))
        self.r = int(config["r"])
        self.n_tasks, self.n_skills, self.n_splits = (int(config[k]) for k in ("n_tasks", "n_skills", "n_splits"))
        self.tensors = _load_tensors(self.directory)
        self.modules = [k[len(PREFIX):-len(".poly_lora_A")] for k in self.tensors if k.endswith(".poly_lora_A")]
        # everything else PEFT saved: model tensor name -> tensor (a tied lm_head's `base_layer` is its weight)
        self.replaced = {k[len(PREFIX):].replace(".base_layer.", "."): v for k, v in self.tensors.items()
                         if not k.endswith(POLY_SUFFIXES)}

    def _tensor(self, module: str, suffix: str) -> torch.Tensor:
        return self.tensors[PREFIX + module + suffix].double()

    def task_weights(self, module: str, task: int) -> torch.Tensor:
        """(q, s): sigmoid of the task's logits, each split divided by its sum (+ 1e-12)."""
        logits = self._tensor(module, ".poly_router.module_logits")[task]  # (q*s,), split-major
        return _normalise(torch.sigmoid(logits).reshape(self.n_splits, self.n_skills))

    def weights(self, module: str, spec: RoutingSpec) -> torch.Tensor:
        """(q, s) mixing weights of a routing spec."""
        if isinstance(spec, bool):
            raise ValueError(f"not a routing spec: {spec!r}")
        if isinstance(spec, int):
            return self.task_weights(module, spec)
        if spec == "uniform":  # all logits 0: sigmoid 1/2 everywhere, then normalised as any task
            return _normalise(torch.full((self.n_splits, self.n_skills), 0.5, dtype=torch.float64))
        if spec == "mean":
            return sum(self.task_weights(module, t) for t in range(self.n_tasks)) / self.n_tasks
        if isinstance(spec, dict):
            return sum(float(c) * self.task_weights(module, int(t)) for t, c in spec.items())
        raise ValueError(f"not a routing spec: {spec!r}")

    def factors(self, module: str, spec: RoutingSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """A (in, r) and B (r, out) in float64, mixed split by split."""
        w = self.weights(module, spec)  # (q, s)
        poly_A = self._tensor(module, ".poly_lora_A")  # (q, s, in/q, r)
        poly_B = self._tensor(module, ".poly_lora_B")  # (q, s, r, out/q)
        A_blocks, B_blocks = [], []
        for q in range(self.n_splits):
            A_q = torch.zeros_like(poly_A[q, 0])  # (in/q, r)
            B_q = torch.zeros_like(poly_B[q, 0])  # (r, out/q)
            for s in range(self.n_skills):
                A_q = A_q + w[q, s] * poly_A[q, s]
                B_q = B_q + w[q, s] * poly_B[q, s]
            A_blocks.append(A_q)
            B_blocks.append(B_q)
        return torch.cat(A_blocks, dim=0), torch.cat(B_blocks, dim=1)  # (in, r), (r, out)

    def delta(self, module: str, spec: RoutingSpec) -> torch.Tensor:
        """The (out, in) float64 update of a Linear's weight: (A @ B / r).T."""
        A, B = self.factors(module, spec)
        return (A @ B / self.r).T


def _normalise(w: torch.Tensor) -> torch.Tensor:
    """(q, s): each split's weights divided by their sum plus 1e-12."""
    return torch.stack([w[q] / (w[q].sum() + EPS) for q in range(w.shape[0])])


def _load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    file = directory / "adapter_model.safetensors"
    if file.is_file():
        from safetensors.torch import load_file

        return load_file(str(file))
    file = directory / "adapter_model.bin"
    if file.is_file():
        return torch.load(file, map_location="cpu", weights_only=True)
    raise AdapterError("no adapter_model.safetensors (or .bin) in the adapter directory", directory)


def _named_tensor(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    """(owning module, attribute) of a parameter or buffer by its dotted name."""
    path, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(path) if path else model
    except AttributeError:
        owner = None
    if owner is None or not isinstance(getattr(owner, attr, None), torch.Tensor):
        raise CheckpointError(f"the adapter holds {name!r}, which this model does not have: wrong base model?")
    return owner, attr


@contextmanager
def routed(model: torch.nn.Module, adapter: ReferenceAdapter, spec: RoutingSpec) -> Iterator[torch.nn.Module]:
    """Inside the block `model` (a plain transformers model) computes the routed Poly model for `spec`."""
    handles, swapped = [], []
    try:
        for module in adapter.modules:
            try:
                layer = model.get_submodule(module)
            except AttributeError:
                raise CheckpointError(f"module {module!r} of the adapter is not in this model: wrong base model?") from None
            A, B = adapter.factors(module, spec)
            A, B = A.to(_device(layer)), B.to(_device(layer))

            def hook(_layer, args, out, A=A, B=B):
                update = (args[0].double() @ A) @ B / adapter.r  # (..., in) @ (in, r) @ (r, out) -> (..., out)
                return (out.double() + update).to(out.dtype)

            handles.append(layer.register_forward_hook(hook))
        for name, tensor in adapter.replaced.items():
            owner, attr = _named_tensor(model, name)
            old = getattr(owner, attr)
            if tuple(old.shape) != tuple(tensor.shape):
                raise CheckpointError(f"the adapter's {name} has shape {list(tensor.shape)}, the model's "
                                      f"{list(old.shape)}: wrong base model?")
            swapped.append((owner, attr, old.detach().clone()))
            with torch.no_grad():
                old.copy_(tensor.to(old.dtype))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for owner, attr, saved in reversed(swapped):
                getattr(owner, attr).copy_(saved)


def _device(layer: torch.nn.Module) -> torch.device:
    weight = getattr(layer, "weight", None)
    return weight.device if isinstance(weight, torch.Tensor) and not weight.is_meta else torch.device("cpu")
